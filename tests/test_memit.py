"""MEMIT and AlphaEdit (methods/mass_editing.py) on the tiny real model: the least-squares algebra, the
null-space property, the end-to-end write of a value, reset, resumable state, the statistics cache."""
from pathlib import Path

import pytest
import torch

from core import general_text
from core.types import EditSpec, KBenchError, Knowledge, Query
from methods.alphaedit import AlphaEditMethod
from methods.mass_editing import alphaedit_update, layer_indices, memit_update, nullspace_projector
from methods.memit import MemitMethod
from runners.experiment import Experiment
from tests.conftest import compose_config, read_record

EDIT = Knowledge(id="e0", context="Velmora was founded by Orvane",
                 edit=EditSpec("Question: Who founded Velmora?\nAnswer:", " Orvane", subject="Velmora"))
OTHER = Knowledge(id="e1", context="The copper clocks are old",
                  edit=EditSpec("Question: How old are the copper clocks?\nAnswer:", " old", subject="copper clocks"))
TEXT = [f"The town of Velmora {i} has a river, a bridge near the old mill and a market square where "
        f"{['bakers', 'clockmakers', 'weavers', 'potters'][i % 4]} sell their goods on day {i % 7}." for i in range(60)]
# small and quick: two layers, a few value steps, one context template
FAST = dict(layers=[0, 1], v_num_grad_steps=4, n_context_templates=1, context_template_tokens=4,
            stats_tokens=1000, stats_chunk_tokens=32, stats_batch_size=8)


@pytest.fixture()
def text_file(tmp_path, monkeypatch) -> Path:
    """A general-text file the tests write themselves (no ../shared), and a private statistics cache."""
    monkeypatch.setenv("KBENCH_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "general.txt"
    path.write_text("\n".join(TEXT) + "\n")
    return path


def weights(method) -> dict[int, torch.Tensor]:
    return {l: m.weight.detach().clone() for l, m in method.modules.items()}


@torch.no_grad()
def preserved_keys(method, layer: int, text_file: Path) -> torch.Tensor:
    """The down-projection inputs of `layer` at every token the statistics read, `[N, D_in]`."""
    room = method.stats_chunk_tokens - len(method.lm.start_ids)
    chunks = general_text.chunks(general_text.read_texts(text_file), method.lm.encode, room)
    chunks = [list(method.lm.start_ids) + c for c in chunks[: method.stats_info[str(layer)]["chunks"]]]
    captured = []
    handle = method.modules[layer].register_forward_pre_hook(lambda m, args: captured.append(args[0].detach()))
    try:
        for chunk in chunks:
            method.lm.causal_lm.get_decoder()(input_ids=torch.tensor([chunk]))
    finally:
        handle.remove()
    return torch.cat([c[0] for c in captured]).double()


def test_layer_choice_scales_memits_depth_fractions():
    assert layer_indices(32, None, (0.125, 0.25)) == [4, 5, 6, 7, 8]  # the reference's Llama layers
    assert layer_indices(18, None, (0.125, 0.25)) == [2, 3, 4, 5]  # Gemma 3 270M
    assert layer_indices(4, None, (0.125, 0.25)) == [1]
    assert layer_indices(4, [-1, 0], (0.125, 0.25)) == [0, 3]
    with pytest.raises(KBenchError, match="has 4 layers"):
        layer_indices(4, [4], (0.1, 0.2))


def test_memit_single_edit_solution_satisfies_its_normal_equations(tiny_lm, text_file):
    method = MemitMethod(tiny_lm, stats_paths=[str(text_file)], **FAST)
    method.prepare([])
    request = method.edit_requests(EDIT)[0]
    keys = method.keys([request], 1)  # a real key of the tiny model, [D_in, 1]
    resid = torch.randn(tiny_lm.hidden_size, 1, generator=torch.Generator().manual_seed(0))
    cov, lam = method.cov[1].double(), method.mom2_update_weight
    delta = memit_update(keys, resid, cov, lam)
    k, r = keys.double(), resid.double()
    # d/dΔ (‖Δ K − R‖² + λ tr(Δ C Δᵀ)) = 0  <=>  Δ (λ C + K Kᵀ) = R Kᵀ
    assert torch.allclose(delta @ (lam * cov + k @ k.T), r @ k.T, atol=1e-8 * float((r @ k.T).abs().max()))
    # and it is the minimiser: a perturbation raises the objective
    objective = lambda d: float((d @ k - r).pow(2).sum() + lam * torch.trace(d @ cov @ d.T))  # noqa: E731
    assert objective(delta) < objective(delta + 1e-3 * torch.randn_like(delta))


def test_memit_writes_the_value_into_the_residual(tiny_lm, text_file):
    """End to end (hooks, lookup token, value mapping): with a negligible preservation weight and the
    plain prompt as the only template, one layer's update moves the residual exactly onto z."""
    method = MemitMethod(tiny_lm, stats_paths=[str(text_file)], **FAST | dict(layers=[1], n_context_templates=0,
                                                                              mom2_update_weight=1e-4))
    method.prepare([])
    request = method.edit_requests(EDIT)[0]
    z = method.compute_z(request)
    before = method.residual_at([request])[0]
    method.compute_z = lambda r: z  # the same value, not a second optimisation
    method.apply([request])
    after = method.residual_at([request])[0]
    assert float((z - before).norm()) > 0.5
    assert float((z - after).norm()) < 1e-3 * float((z - before).norm())
    query = Query(id="q", prompt=EDIT.edit.prompt)
    method.reset()
    base = method.loglikelihood([query], [" Orvane\n"])[0].logprob
    method.compute_z = lambda r: z
    method.apply([request])
    assert method.loglikelihood([query], [" Orvane\n"])[0].logprob > base  # the value optimised for the target helps it


def test_alphaedit_leaves_preserved_keys_outputs_unchanged_while_memit_does_not(tiny_lm, text_file):
    """The preserved keys K₀: the general-text keys the statistics read, in the subspace AlphaEdit keeps
    (C's eigenvectors above the threshold; here the median eigenvalue, so half the directions are null,
    and K₀ still carries most of the keys' energy). AlphaEdit's ΔW K₀ vanishes to rounding (the algebra: the
    float32 projector's rounding; the float32 weights it writes: theirs); MEMIT's does not: its preservation is a
    penalty (λ = 15000) spread over every direction, not a constraint."""
    probe = AlphaEditMethod(tiny_lm, stats_paths=[str(text_file)], **FAST)
    probe.prepare([])
    width = probe.modules[0].in_features
    assert probe.stats_info["0"]["tokens"] > width  # full-rank statistics: no exact null space to hide in
    threshold = float(min(torch.linalg.eigvalsh(probe.cov[l].double()).median() for l in probe.layer_ids))
    alpha = AlphaEditMethod(tiny_lm, stats_paths=[str(text_file)], nullspace_threshold=threshold, **FAST)
    alpha.prepare([])
    assert all(0 < d < width for d in alpha.nullspace_dims.values())
    request = alpha.edit_requests(EDIT)[0]
    preserved = {}
    for layer in alpha.layer_ids:  # before any edit
        keys = preserved_keys(alpha, layer, text_file)
        kept = keys - keys @ alpha.projectors[layer].double()  # their component outside the null space
        assert float(kept.norm()) > 0.95 * float(keys.norm())
        preserved[layer] = kept
    relative = lambda delta, k0: float((delta @ k0.T).norm() / (delta.norm() * k0.norm()))  # noqa: E731

    for layer, k0 in preserved.items():  # the algebra, in float64, on the layers' real keys
        keys = alpha.keys([request], layer).double()
        resid = torch.randn(tiny_lm.hidden_size, 1, generator=torch.Generator().manual_seed(layer), dtype=torch.float64)
        alpha_delta = alphaedit_update(keys, resid, alpha.projectors[layer].double(), torch.zeros(width, width), 10.0)
        memit_delta = memit_update(keys, resid, alpha.cov[layer].double(), 15000.0)
        assert relative(alpha_delta, k0) < 1e-6, layer  # P is kept in float32, like the reference
        assert relative(memit_delta, k0) > 100 * max(relative(alpha_delta, k0), 1e-8), layer
        assert float((alpha_delta @ keys - resid).norm()) < float(resid.norm())  # and it still writes towards R

    original = weights(alpha)  # end to end: the float32 weights written
    alpha.inject([EDIT])
    for layer, k0 in preserved.items():
        update = alpha.modules[layer].weight.double() - original[layer].double()
        assert float(update.norm()) > 1e-3  # it did edit
        assert float((update @ k0.T).norm() / (original[layer].double() @ k0.T).norm()) < 1e-5, layer
    assert all(float(alpha.previous[l].norm()) > 0 for l in alpha.layer_ids)  # the edit's keys, kept for later edits


@pytest.mark.parametrize("cls", [MemitMethod, AlphaEditMethod])
def test_reset_restores_the_original_weights(tiny_lm, text_file, cls):
    method = cls(tiny_lm, stats_paths=[str(text_file)], **FAST)
    original = weights(method)
    method.inject([EDIT, OTHER])
    assert any(not torch.equal(original[l], m.weight) for l, m in method.modules.items())
    method.reset()
    assert all(torch.equal(original[l], m.weight) for l, m in method.modules.items())
    assert method.applied == [] and method.pending == []
    if isinstance(method, AlphaEditMethod):
        assert all(float(c.abs().sum()) == 0 for c in method.previous.values())


@pytest.mark.parametrize("cls", [MemitMethod, AlphaEditMethod])
def test_saved_state_continues_exactly(tiny_lm_factory, text_file, tmp_path, cls):
    """A killed run resumes: the state of a first method, loaded into a fresh one, gives the same weights
    after the next edit as the first method gets (batch of 2: the second edit also tests pending edits)."""
    first = cls(tiny_lm_factory(), stats_paths=[str(text_file)], batch_size=2, **FAST)
    first.prepare([])
    first.inject([EDIT, OTHER])
    first.inject([Knowledge(id="e2", context="Orvane is blue", edit=EditSpec("Question: What colour is Orvane?\nAnswer:",
                                                                               " blue", subject="Orvane"))])
    assert first.pending and len(first.applied) == 2
    state = tmp_path / "state"
    state.mkdir()
    assert first.save_state(state)
    assert sorted(p.name for p in state.iterdir()) == ["mass_editing.json", "mass_editing.safetensors"]

    second = cls(tiny_lm_factory(), stats_paths=[str(text_file)], batch_size=2, **FAST)
    second.prepare([])
    second.load_state(state)
    assert second.templates == first.templates and [r.id for r in second.pending] == ["e2"]
    last = Knowledge(id="e3", context="Velmora is old", edit=EditSpec("Question: How old is Velmora?\nAnswer:",
                                                                       " ancient", subject="Velmora"))
    for method in (first, second):
        method.inject([last])
    for l in first.layer_ids:
        assert torch.allclose(first.modules[l].weight, second.modules[l].weight, atol=1e-6)
    if cls is AlphaEditMethod:
        assert all(torch.allclose(first.previous[l], second.previous[l], atol=1e-5) for l in first.layer_ids)


def test_pending_edits_are_written_before_answering(tiny_lm, text_file):
    method = MemitMethod(tiny_lm, stats_paths=[str(text_file)], batch_size=5, **FAST)
    original = weights(method)
    method.inject([EDIT])
    assert method.pending and all(torch.equal(original[l], m.weight) for l, m in method.modules.items())
    method.loglikelihood([Query(id="q", prompt=EDIT.edit.prompt)], [" Orvane"])
    assert not method.pending and method.info()["edits_applied_at_scoring"] == 1
    assert any(not torch.equal(original[l], m.weight) for l, m in method.modules.items())


def test_statistics_are_cached_and_missing_text_is_a_clear_error(tiny_lm, text_file, tmp_path):
    first = AlphaEditMethod(tiny_lm, stats_paths=[str(text_file)], **FAST)
    first.prepare([])
    assert {i["source"] for i in first.stats_info.values()} == {"computed"}
    files = sorted((tmp_path / "cache" / "mass_editing").glob("*.safetensors"))
    assert len(files) == 2  # one per layer, safetensors (no pickles)
    second = MemitMethod(tiny_lm, stats_paths=[str(text_file)], **FAST)  # MEMIT reuses AlphaEdit's statistics
    second.prepare([])
    assert {i["source"] for i in second.stats_info.values()} == {"cache"}
    assert all(torch.equal(first.cov[l], second.cov[l]) for l in first.layer_ids)
    missing = MemitMethod(tiny_lm, stats_paths=[str(tmp_path / "nowhere.txt")], **FAST)
    with pytest.raises(KBenchError, match="method.stats_paths"):
        missing.prepare([])


@pytest.mark.parametrize("method", ["memit", "alphaedit"])
def test_runs_on_task_editing_and_records_its_deviations(tmp_path, text_file, method):
    overrides = [f"method={method}", "task=editing", "model=tiny", "logger=none", "task.n_edits=2", "task.n_train=0",
                 "task.max_new_tokens=3", f"method.stats_paths=[{text_file}]", "method.stats_tokens=500",
                 "method.stats_chunk_tokens=32", "method.v_num_grad_steps=3", "method.n_context_templates=1"]
    run = tmp_path / "run"
    Experiment(compose_config(*overrides), run, names={"method": method, "task": "editing", "model": "tiny"}).run()
    record = read_record(run)
    assert record["status"] == "done"
    info = record["method_info"]
    assert info["edits_applied"] == 2 and info["layers"] == [1] and info["value_mapping"] == "identity (reference)"
    assert record["extra_storage_bytes"] == (1 if method == "memit" else 2) * 128 * 128 * 4
    deviations = record["method_deviations"]
    assert {"batch_size", "v_num_grad_steps", "target_suffix", "stats_tokens"} <= set(deviations)
    assert "v_lr" not in deviations and "layer_span" not in deviations
    assert all("v_num_grad_steps=3 (reference: 25)" in p for p in record["metric_protocols"].values())
