"""The prepared GPU check (issue 17): one command, one JSON, one short text summary.

    python scripts/gpu_check.py             # on a CUDA machine: parts a, b, c (about 5-8 min on one H200)
    python scripts/gpu_check.py --dry-run   # on CPU with tiny shapes: parts b and c (< 2 min): tests the script

Written for a machine that cannot install anything and has torch, transformers, peft, accelerate,
sentence-transformers, numpy, pandas, tqdm and scipy, but not hydra-core / omegaconf / antlr4 / pydantic /
pytest (carried as wheels in `.gpu-wheels/`, put on the path by this script), nor wandb, faiss, rank-bm25,
bm25s, rapidfuzz, gguf or submitit (never needed: logger=none, BM25 without bm25s's stop words, dense RAG
through NumPy when faiss is absent). No weights travel: `model=tiny` and random-initialised Llama-shaped
models built from a config; the sentence encoder (dense RAG, RECIPE) is a random tiny BERT built here.
Wheels (downloaded on a connected machine; the same command is in README "GPUs"):

    python -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
        --abi none --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform any -d .gpu-wheels \
        hydra-core==1.3.8 omegaconf==2.3.1 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 \
        typing-inspection==0.4.5 typing-extensions==4.16.0 pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1 pygments==2.21.0
    python -m pip wheel --no-deps --no-build-isolation -w .gpu-wheels antlr4-python3-runtime==4.9.3   # sdist only

Parts:
  a. the tests marked `cuda` (tests/test_cuda.py) and the CPU policy tests, through pytest;
  b. every method x {synthetic, editing} on `model=tiny` on the GPU, each run must end `done`;
  c. random-init Llama models of ~1B and ~8B shape in bf16: SELF-PARAM vs FT(S) optimiser step time on
     the same sentences (ratio; target <= 1.2), greedy generation tokens/s at batch 1 and 32 (target
     >= 10x at 32 on 8B), MEMOIR and RECIPE seconds per edit, peak GPU memory of each, and the model
     FLOPs utilisation (MFU) of the LoRA training step.
Output: `<out>/gpu_check.json` and `<out>/gpu_check.txt` (default out: outputs/gpu_check).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import time
import traceback
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WHEELS = ROOT / ".gpu-wheels"

METHODS = ["base", "context", "ft_context", "ft_sentences", "selfparam", "rag_bm25", "rag_dense", "memoir", "recipe"]
TASKS = ["synthetic", "editing"]

# Llama-3.2-1B and Llama-3-8B shapes; the dry run's stand-ins are tiny
SHAPES = {
    "1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
               intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True),
    "8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
               intermediate_size=14336, vocab_size=128256, tie_word_embeddings=False),
}
DRY_SHAPES = {
    "1b": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               intermediate_size=128, vocab_size=1024, tie_word_embeddings=True),
    "8b": dict(hidden_size=96, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
               intermediate_size=192, vocab_size=2048, tie_word_embeddings=False),
}
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12}  # dense, no sparsity


# ---------------------------------------------------------------------------------------------- setup
def use_wheels(folder: Path) -> list[str]:
    """Unpack the carried wheels (once) and put them first on sys.path and PYTHONPATH: no pip needed."""
    if not folder.is_dir():
        return []
    from packaging.tags import sys_tags
    from packaging.utils import parse_wheel_filename

    site = folder / "site"
    here = set(sys_tags())
    unpacked = []
    for wheel in sorted(folder.glob("*.whl")):
        if not parse_wheel_filename(wheel.name)[3] & here:  # e.g. pydantic_core's cp312 build on another Python
            continue
        marker = site / f".{wheel.name}.done"
        if not marker.exists():
            site.mkdir(parents=True, exist_ok=True)
            with zipfile.ZipFile(wheel) as archive:
                archive.extractall(site)
            marker.touch()
        unpacked.append(wheel.name)
    if unpacked:
        sys.path.insert(0, str(site))
        os.environ["PYTHONPATH"] = os.pathsep.join([str(site), str(ROOT), os.environ.get("PYTHONPATH", "")])
    return unpacked


def environment(device: str) -> dict:
    import torch
    import transformers

    info = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "device": device, "cuda": torch.version.cuda, "gpus": torch.cuda.device_count()}
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    for name in ("peft", "accelerate", "sentence_transformers", "hydra", "omegaconf", "pydantic", "faiss", "bm25s"):
        try:
            module = __import__(name)
            info[name] = getattr(module, "__version__", "present")
        except ImportError:
            info[name] = None
    return info


class Clock:
    """Wall time of a block, synchronising the GPU on both ends (CUDA work is asynchronous)."""

    def __init__(self, device: str) -> None:
        self.device, self.seconds = device, 0.0

    @contextlib.contextmanager
    def __call__(self):
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        yield self
        if self.device == "cuda":
            torch.cuda.synchronize()
        self.seconds = time.perf_counter() - start


@contextlib.contextmanager
def peak_memory(device: str, into: dict, key: str):
    """Peak GPU memory allocated inside the block, GiB (None on CPU)."""
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    yield
    into[key] = round(torch.cuda.max_memory_allocated() / 2**30, 2) if device == "cuda" else None


def tiny_sentence_encoder(folder: Path) -> str:
    """A random tiny BERT + mean pooling as a sentence-transformers folder (no weights to download)."""
    target = folder / "tiny_encoder"
    if (target / "modules.json").is_file():
        return str(target)
    from sentence_transformers import SentenceTransformer, models
    from transformers import BertConfig, BertModel, BertTokenizerFast

    raw = folder / "tiny_bert"
    raw.mkdir(parents=True, exist_ok=True)
    words = sorted({w for w in ("the a an of in on is was by to and who what which when where how many "
                                "question answer capital city river founded year born wrote made company "
                                "velmora quill ada paris france").split()})
    letters = list("abcdefghijklmnopqrstuvwxyz0123456789.,?:;'!-")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words + letters + [f"##{c}" for c in letters]
    (raw / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab_file=str(raw / "vocab.txt")).save_pretrained(raw)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=512)
    BertModel(config).save_pretrained(raw)
    transformer = models.Transformer(str(raw), max_seq_length=256)
    SentenceTransformer(modules=[transformer, models.Pooling(32, "mean")]).save(str(target))
    return str(target)


# ---------------------------------------------------------------------------------------------- part a
def part_a(out: Path, dry_run: bool) -> dict:
    """pytest -m cuda on tests/test_cuda.py (+ the CPU policy tests); on a dry run the cuda tests run on CPU."""
    junit = out / "a_junit.xml"
    env = os.environ | {"TQDM_DISABLE": "1"} | ({"KBENCH_CUDA_TESTS_ON": "cpu"} if dry_run else {})
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=",
               "tests/test_cuda.py", "tests/test_gpu_policy.py", f"--junitxml={junit}"]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=420)
    result = {"command": " ".join(command[1:]), "returncode": done.returncode,
              "seconds": round(time.perf_counter() - started, 1), "tail": done.stdout[-1500:] + done.stderr[-1500:]}
    if junit.is_file():
        import xml.etree.ElementTree as ET

        suite = ET.parse(junit).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        cases = suite.findall("testcase")
        failed = [f"{c.get('classname')}::{c.get('name')}" for c in cases if c.find("failure") is not None
                  or c.find("error") is not None]
        skipped = [c.get("name") for c in cases if c.find("skipped") is not None]
        result |= {"tests": len(cases), "failed": failed, "skipped": len(skipped),
                   "passed": len(cases) - len(failed) - len(skipped)}
    result["ok"] = done.returncode == 0
    return result


# ---------------------------------------------------------------------------------------------- part b
def shrink(method: str, task: str, encoder: str) -> list[str]:
    """Overrides that keep each run to seconds: same code paths, less data and fewer steps."""
    overrides = {
        "synthetic": ["task.n_contexts=1", "task.facts_per_context=2", "task.n_train_contexts=4"],
        "editing": ["task.n_edits=2", "task.n_train=4"],
    }[task]
    local = ["method/sentences=local", "method.sentences.n_sentences=3", "method.sentences.max_attempts=1"]
    train = ["method.epochs=2"]  # two epochs: the divergence check needs a falling loss
    overrides += {
        "ft_context": train,
        "ft_sentences": train + (local if task == "editing" else []),
        "selfparam": train + ["method.regularisation.n_texts=4", "method.regularisation.max_tokens=8"]
                     + (local if task == "editing" else []),
        "rag_bm25": ["method.stopwords=none"],  # bm25s (its stop-word list) is not on the GPU machine
        "rag_dense": [f"method.encoder={encoder}"],
        "memoir": ["method.iterations=3", "method.n_background=4", "method.background_tokens=4"],
        "recipe": [f"method.encoder={encoder}", "method.epochs=1", "method.retrieval_epochs=2", "method.cache=false"],
    }.get(method, [])
    return overrides + ["resume.checkpoint=false"]


def part_b(out: Path, device: str, encoder: str, methods=METHODS, tasks=TASKS) -> dict:
    """Every method x {synthetic, editing} on model=tiny, in this process (one import, one tiny model cache)."""
    from hydra import compose, initialize_config_dir

    from runners.experiment import Experiment

    runs = {}
    for task in tasks:
        for method in methods:
            overrides = [f"method={method}", f"task={task}", "model=tiny", "logger=none", "resume.search_dir=null",
                         f"hardware={'gpu' if device == 'cuda' else 'cpu'}", f"model.device={device}",
                         *shrink(method, task, encoder)]
            run_dir = out / "b" / f"{method}_{task}"
            started = time.perf_counter()
            entry = {"overrides": overrides}
            try:
                with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
                    cfg = compose(config_name="config", overrides=overrides)
                Experiment(cfg, run_dir, names={"method": method, "task": task, "model": "tiny"}).run()
            except Exception as err:  # the record says what happened; keep going with the other runs
                entry["error"] = f"{type(err).__name__}: {err}"[:600]
                entry["traceback"] = traceback.format_exc()[-2000:]
            record_file = run_dir / "record.json"
            record = json.loads(record_file.read_text()) if record_file.is_file() else {}
            entry |= {"status": record.get("status", "no record"), "seconds": round(time.perf_counter() - started, 1),
                      "metrics": {k: v for k, v in (record.get("metrics") or {}).items()
                                  if isinstance(v, (int, float)) and "/" not in k}}
            runs[f"{method}/{task}"] = entry
            print(f"  b {method:>12} / {task:<9} {entry['status']:<8} {entry['seconds']:6.1f} s"
                  + (f"  {entry['error'][:120]}" if "error" in entry else ""), flush=True)
    return {"runs": runs, "ok": all(r["status"] == "done" for r in runs.values()),
            "done": sum(r["status"] == "done" for r in runs.values()), "total": len(runs)}


# ---------------------------------------------------------------------------------------------- part c
def random_lm(shape: dict, device: str, dtype):
    """A random-init Llama of `shape`, built directly on the device, wrapped with the tiny BPE tokenizer
    (its ids are < 384, inside any vocabulary; the head still has the full vocabulary's cost)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from core.lm import LM
    try:
        from core.tiny import build_tiny_tokenizer
    except ImportError:
        from core.models import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer(384)
    config = LlamaConfig(**shape, max_position_embeddings=4096, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, dtype=dtype)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return LM(model, tokenizer, name="random-llama", batch_size=32, max_length=4096)


def sentences(n: int) -> tuple[str, ...]:
    return tuple(f"Question: What is the {i}th fact about the town of Velmora?\nAnswer: It was founded in {1700 + i}.\n"
                 for i in range(n))


def lora_step_flops(lm, examples) -> float:
    """Model FLOPs of one LoRA step on `examples` ((prefix, target) pairs): forward 2·N·T through the
    body, backward 2·N·T (gradients of activations only: the base weights are frozen), the head on the
    target positions forward and backward (4·V·H per target token). Attention scores and the LoRA
    matrices themselves are left out (short sequences; rank 8)."""
    causal = lm.causal_lm
    embed, head = causal.get_input_embeddings(), causal.get_output_embeddings()
    skip = {id(p) for p in (*embed.parameters(), *head.parameters())}
    body = sum(p.numel() for n, p in causal.named_parameters() if id(p) not in skip and "lora_" not in n)
    tokens = sum(len(p) + len(t) for p, t in examples)
    targets = sum(len(t) for _, t in examples)
    return 4.0 * body * tokens + 4.0 * head.weight.shape[0] * head.weight.shape[1] * targets


def time_training(method, examples, steps: int, batch_size: int, clock) -> tuple[float, list]:
    """Seconds per optimiser step of `method.loss` on `examples` (after one warm-up step)."""
    from core.training import train

    params = method.weights.begin()
    try:
        train(params, examples[:batch_size], method.loss, epochs=1, lr=1e-4, batch_size=batch_size)  # warm-up
        epochs = max(1, steps * batch_size // len(examples))
        with clock():
            history = train(params, examples, method.loss, epochs=epochs, lr=1e-4, batch_size=batch_size)
    finally:
        method.weights.end()
        method.weights.reset()
    return clock.seconds / len(history), history


def part_c(out: Path, device: str, dry_run: bool, encoder: str) -> dict:
    import torch

    from core.types import EditSpec, GenerationSpec, Knowledge
    from methods.finetune import FineTuneSentences
    from methods.memoir import MemoirMethod
    from methods.selfparam import SelfParam
    from methods.sentences import TaskSentences

    from core.models import apply_backend_settings, dtype_policy

    dtype = torch.float32 if dry_run else torch.bfloat16
    apply_backend_settings(dtype_policy("auto", device))  # TF32 for the fp32 adapters, as load_lm would on CUDA
    clock = Clock(device)
    lora = {"mode": "lora", "lora": {"r": 8, "alpha": 32, "dropout": 0.0,
                                      "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                         "up_proj", "down_proj"]}}
    peak = next((v for k, v in PEAK_BF16_FLOPS.items() if device == "cuda" and k in torch.cuda.get_device_name(0)), None)
    item = Knowledge(id="velmora", context="The town of Velmora was founded in 1742 by Ada Quill on the Orvane river. "
                     "It has 12000 inhabitants and its mayor is Tomas Veld.", train_sentences=sentences(16))
    results = {}
    for name, shape in (DRY_SHAPES if dry_run else SHAPES).items():
        entry: dict = {"shape": shape, "dtype": str(dtype)}
        print(f"  c {name}: building a random {shape['num_hidden_layers']}-layer model", flush=True)
        try:
            lm = random_lm(shape, device, dtype)
            entry["parameters"] = sum(p.numel() for p in lm.model.parameters())
            batch_size, steps = 4, 3 if dry_run else 8

            # SELF-PARAM vs FT(S): the same 16 QA sentences, the same LoRA, the same batch size
            ft = FineTuneSentences(lm, sentences=TaskSentences(), update=lora, batch_size=batch_size)
            ft_examples = ft.training_examples([item])
            with peak_memory(device, entry, "ft_sentences_peak_gib"):
                ft_step, _ = time_training(ft, ft_examples, steps, batch_size, clock)
            sp = SelfParam(lm, sentences=TaskSentences(), update=lora, batch_size=batch_size,
                           continuation_per_sentence=0, regularisation_per_sentence=0, teacher_batch_size=16)
            with peak_memory(device, entry, "selfparam_peak_gib"):
                with clock():
                    sp_examples = sp.training_examples([item])
                entry["selfparam_teacher_cache_s"] = round(clock.seconds, 3)
                sp_step, _ = time_training(sp, sp_examples, steps, batch_size, clock)
            flops = lora_step_flops(lm, ft_examples[:batch_size])
            entry |= {"ft_sentences_step_s": round(ft_step, 4), "selfparam_step_s": round(sp_step, 4),
                      "selfparam_over_ft_step": round(sp_step / ft_step, 3),
                      "lora_step_model_tflops": round(flops / 1e12, 3),
                      "lora_step_mfu": round(flops / ft_step / peak, 4) if peak else None,
                      "peak_bf16_tflops_assumed": peak / 1e12 if peak else None}

            # batched greedy generation: tokens/s at batch 1 and batch 32
            new_tokens = 8 if dry_run else 64
            spec = GenerationSpec(max_new_tokens=new_tokens, stop=())
            prompts = [lm.start_ids + lm.encode(s.split("\n")[0] + " Answer:") for s in sentences(32)]
            lm.generate_until(prompts[:2], GenerationSpec(max_new_tokens=2, stop=()))  # warm-up
            for rows in (1, 32):
                lm.batch_size = rows
                with peak_memory(device, entry, f"generate_b{rows}_peak_gib"):
                    with clock():
                        lm.generate_until(prompts[:rows], spec)
                entry[f"generate_b{rows}_tokens_per_s"] = round(rows * new_tokens / clock.seconds, 1)
            entry["generate_b32_over_b1"] = round(entry["generate_b32_tokens_per_s"] / entry["generate_b1_tokens_per_s"], 2)
            lm.batch_size = 32

            # MEMOIR: seconds per edit (30 SGD iterations on the memory's columns, or fewer on early stop)
            edits = [Knowledge(id=f"e{i}", context=f"The mayor of Velmora is Tomas Veld{i}.",
                               edit=EditSpec(f"The mayor of town {i} is", f" Tomas Veld{i}")) for i in range(3)]
            memoir = MemoirMethod(lm, iterations=5 if dry_run else 30, background_source="model", n_background=16,
                                  background_tokens=16, stop_loss=0.0)
            memoir.prepare([])
            with peak_memory(device, entry, "memoir_peak_gib"):
                with clock():
                    memoir.inject(edits)
            entry["memoir_s_per_edit"] = round(clock.seconds / len(edits), 3)
            entry["memoir_iterations_per_edit"] = [n for _, _, n in memoir.edit_losses]
            memoir.remove()

            # RECIPE: trained once (briefly: the numbers are per-edit costs, not quality), then seconds per edit
            entry |= recipe_timing(lm, device, encoder, clock, dry_run)
            del lm, ft, sp, memoir
        except Exception as err:
            entry["error"] = f"{type(err).__name__}: {err}"[:600]
            entry["traceback"] = traceback.format_exc()[-2500:]
            print(f"  c {name}: {entry['error'][:200]}", flush=True)
        if device == "cuda":
            torch.cuda.empty_cache()
        results[name] = entry
        print(f"  c {name}: " + ", ".join(f"{k}={v}" for k, v in entry.items()
                                          if k.endswith(("_s", "_over_ft_step", "_over_b1", "_mfu", "_per_s", "_gib"))),
              flush=True)
    big = results.get("8b", {})
    results["targets"] = {
        "selfparam_over_ft_step_le_1.2": {name: r.get("selfparam_over_ft_step") is not None
                                          and r["selfparam_over_ft_step"] <= 1.2 for name, r in results.items()},
        "generate_b32_over_b1_ge_10_on_8b": big.get("generate_b32_over_b1") is not None and big["generate_b32_over_b1"] >= 10,
    }
    results["ok"] = not any("error" in r for r in results.values() if isinstance(r, dict) and "shape" in r)
    return results


def recipe_timing(lm, device: str, encoder: str, clock, dry_run: bool) -> dict:
    """RECIPE on the editing task's synthetic edits: a short `prepare` (its one-off training), then the
    seconds per injected edit (encode the statement, make its prompt, append)."""
    from hydra import compose, initialize_config_dir

    from methods.recipe import Recipe
    from runners.build import build

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["task=editing", "task.n_edits=4", f"task.n_train={8 if dry_run else 16}",
                                                       "logger=none"])
    task = build(cfg.task, "task")
    recipe = Recipe(lm, encoder=encoder, epochs=1, retrieval_epochs=1 if dry_run else 2, batch_size=8, cache=False)
    entry: dict = {}
    with peak_memory(device, entry, "recipe_prepare_peak_gib"):
        with clock():
            recipe.prepare(task.training_knowledge())
    entry["recipe_prepare_s"] = round(clock.seconds, 3)
    edits = [k for step in task.steps() for k in step.knowledge][:4]
    with peak_memory(device, entry, "recipe_peak_gib"):
        with clock():
            for edit in edits:
                recipe.inject([edit])
    entry["recipe_s_per_edit"] = round(clock.seconds / max(len(edits), 1), 4)
    return entry


# ---------------------------------------------------------------------------------------------- main
def summary(report: dict) -> str:
    lines = [f"kbench GPU check ({'dry run on CPU' if report['dry_run'] else report['env'].get('gpu', 'cuda')}), "
             f"{report['seconds']:.0f} s"]
    a = report.get("a")
    if a and "seconds" not in a:
        lines.append(f"a. ERROR {a.get('error', '')[:300]}")
    elif a:
        lines.append(f"a. cuda tests: {a.get('passed', '?')} passed, {len(a.get('failed', []))} failed, "
                     f"{a.get('skipped', '?')} skipped ({a['seconds']} s)" + (f"; failed: {a['failed']}" if a.get("failed") else ""))
    b = report.get("b")
    if b:
        if "runs" not in b:
            lines.append(f"b. ERROR {b.get('error', '')[:300]}")
        else:
            bad = [f"{k}: {v['status']} {v.get('error', '')[:80]}" for k, v in b["runs"].items() if v["status"] != "done"]
            lines.append(f"b. runs on model=tiny: {b['done']}/{b['total']} done" + ("; " + "; ".join(bad) if bad else ""))
    c = report.get("c")
    if c and "targets" not in c:
        lines.append(f"c. ERROR {c.get('error', '')[:300]}")
    elif c:
        for name, r in c.items():
            if not isinstance(r, dict) or "shape" not in r:
                continue
            if "error" in r:
                lines.append(f"c. {name}: ERROR {r['error'][:200]}")
                continue
            lines.append(
                f"c. {name} ({r['parameters'] / 1e9:.2f}B params, {r['dtype']}): step FT(S) {r['ft_sentences_step_s']} s, "
                f"SELF-PARAM {r['selfparam_step_s']} s (x{r['selfparam_over_ft_step']}; teacher cache "
                f"{r['selfparam_teacher_cache_s']} s), MFU {r['lora_step_mfu']}; generation {r['generate_b1_tokens_per_s']} "
                f"tok/s at batch 1, {r['generate_b32_tokens_per_s']} at 32 (x{r['generate_b32_over_b1']}); MEMOIR "
                f"{r['memoir_s_per_edit']} s/edit, RECIPE {r['recipe_s_per_edit']} s/edit (prepare {r['recipe_prepare_s']} s); "
                f"peak GiB: FT {r['ft_sentences_peak_gib']}, SELF-PARAM {r['selfparam_peak_gib']}, gen b32 "
                f"{r['generate_b32_peak_gib']}, MEMOIR {r['memoir_peak_gib']}, RECIPE {r['recipe_peak_gib']}")
        lines.append(f"c. targets: {c['targets']}")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, parts b and c (tests the script)")
    parser.add_argument("--parts", default=None, help="which parts, e.g. 'bc' (default: abc; dry run: bc)")
    parser.add_argument("--out", default=str(ROOT / "outputs" / "gpu_check"))
    parser.add_argument("--methods", default=",".join(METHODS), help="part b: comma-separated methods")
    parser.add_argument("--tasks", default=",".join(TASKS), help="part b: comma-separated tasks")
    parser.add_argument("--wheels", default=str(WHEELS), help="folder of carried wheels (unpacked onto the path)")
    args = parser.parse_args()
    parts = args.parts or ("bc" if args.dry_run else "abc")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(ROOT))
    wheels = use_wheels(Path(args.wheels))

    import torch

    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("no CUDA GPU here: run with --dry-run to test the script on CPU", file=sys.stderr)
        return 2
    if args.dry_run:
        torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    started = time.perf_counter()
    report: dict = {"dry_run": args.dry_run, "parts": parts, "wheels": wheels, "env": environment(device)}
    encoder = tiny_sentence_encoder(out) if set(parts) & {"b", "c"} else ""
    for part in parts:
        print(f"part {part}", flush=True)
        t0 = time.perf_counter()
        try:
            if part == "a":
                report["a"] = part_a(out, args.dry_run)
            elif part == "b":
                report["b"] = part_b(out, device, encoder, args.methods.split(","), args.tasks.split(","))
            elif part == "c":
                report["c"] = part_c(out, device, args.dry_run, encoder)
        except Exception as err:
            report[part] = {"ok": False, "error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-3000:]}
        report[part]["part_seconds"] = round(time.perf_counter() - t0, 1)
    report["seconds"] = round(time.perf_counter() - started, 1)
    report["ok"] = all(report[p].get("ok") for p in parts)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    text = summary(report)
    (out / "gpu_check.txt").write_text(text)
    print(text + f"written: {out / 'gpu_check.json'}, {out / 'gpu_check.txt'}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
