"""Injection cost of SELF-PARAM against FT(S), measured in one process on the same context and sentences.

    python benchmarks/injection_cost.py                 # embedded Gemma 3 270M, one synthetic context
    python benchmarks/injection_cost.py --model tiny    # seconds; the ratios are then meaningless

Both arms are built from conf/method/selfparam.yaml as Hydra composes it (`method=selfparam`): its LoRA,
lr, epochs, batch size, weight decay, clipping, loss averaging and teacher cache; `--lr`, `--epochs`,
`--batch-size` override them. The context gets 100 unique pairs (`--pairs`), the default's count.
Arms (same LoRA, same sentences, same optimiser settings):
  ft_sentences      FT(S): cross-entropy on the sentences
  selfparam         kbench's SELF-PARAM on the same sentences (continuations and regularisation off, so the
                    data is identical): cached top-k teacher, one weight copy, batched steps
  reference_style   the same objective computed the way the reference does it: a deep copy of the model
                    as teacher, a teacher forward on every step, batch size 1 (one AdamW step per example)
Prints wall time and peak RSS (sampled every 5 ms by a background thread) per arm, and the ratios
selfparam / FT (targets: time <= 1.2x, peak RSS <= 1.1x) and reference_style / FT.
"""
from __future__ import annotations

import argparse
import copy
import gc
import inspect
import statistics
import sys
import threading
import time
from pathlib import Path

import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core.models import load_lm, tiny_lm  # noqa: E402
from core.training import train  # noqa: E402
from methods.finetune import FineTuneMethod, FineTuneSentences  # noqa: E402
from methods.selfparam import SelfParam, distill_kl  # noqa: E402
from methods.sentences import TaskSentences  # noqa: E402
from tasks.synthetic import SyntheticTask  # noqa: E402

CONF = Path(__file__).resolve().parent.parent / "conf"
# the knobs FT(S) shares with SELF-PARAM's default: every parameter of their common base class, read from its
# signature so a knob added there is passed to both arms without a list here to drift
TRAINING = tuple(name for name in inspect.signature(FineTuneMethod.__init__).parameters if name not in ("self", "lm"))
TEACHER = ("teacher", "teacher_top_k", "teacher_batch_size")  # SELF-PARAM's teacher cache, as the default sets it


def default_method(**overrides: object) -> dict:
    """conf/method/selfparam.yaml as `python run.py method=selfparam` resolves it (hardware=cpu, seed 0),
    with `overrides` (None values ignored) on top."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["method=selfparam", "seed=0"])
    method = OmegaConf.to_container(cfg.method, resolve=True)
    return method | {k: v for k, v in overrides.items() if v is not None}


class PeakRSS:
    """Highest resident set size of this process while the block runs."""

    def __enter__(self) -> "PeakRSS":
        self.process, self.peak, self.running = psutil.Process(), 0, True
        self.start = self.process.memory_info().rss
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while self.running:
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.005)

    def __exit__(self, *exc) -> None:
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)


def reference_style_inject(lm, sentences: list[str], context: str, epochs: int, lr: float, lora: dict) -> None:
    """SELF-PARAM's objective with the reference's cost structure (deep-copied teacher, batch 1)."""
    from core.training import WeightUpdate

    teacher_model = copy.deepcopy(lm.model)  # the reference keeps the copy on a second GPU
    teacher_lm = copy.copy(lm)
    teacher_lm.model = teacher_model
    weights = WeightUpdate(lm, lora=lora, seed=0)
    params = weights.begin()
    context_ids = lm.context_ids(context)
    examples = [lm.encode(s) for s in sentences]

    def loss_fn(batch):
        (target,) = batch
        with torch.inference_mode():
            teacher = torch.log_softmax(teacher_lm.target_logits(teacher_lm.collate([(lm.start_ids + context_ids, target)])), -1)
        kl = distill_kl(lm.target_logits(lm.collate([(lm.start_ids, target)])), teacher.clone())
        return kl.sum(), kl.numel()

    train(params, examples, loss_fn, epochs=epochs, lr=lr, batch_size=1, seed=0, desc="reference_style")
    weights.end()
    weights.reset()
    del teacher_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded:gemma3-270m", help="embedded name, local path, or 'tiny'")
    parser.add_argument("--pairs", type=int, default=100, help="unique QA pairs of the context (0: its 12 phrasings)")
    parser.add_argument("--epochs", type=int, default=None, help="default: the YAML's")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the YAML's")
    parser.add_argument("--lr", type=float, default=None, help="default: the YAML's")
    parser.add_argument("--repeats", type=int, default=2, help="timed repetitions per arm (median reported)")
    parser.add_argument("--no-reference-style", action="store_true")
    args = parser.parse_args()

    lm = tiny_lm() if args.model == "tiny" else load_lm(args.model)
    item = SyntheticTask(n_contexts=1, train_pairs_per_context=args.pairs).items[0]
    knowledge = item.knowledge
    sentences = list(knowledge.train_sentences)
    method = default_method(lr=args.lr, epochs=args.epochs, batch_size=args.batch_size)
    common = {k: method[k] for k in TRAINING}
    teacher = {k: method[k] for k in TEACHER}
    arms = {
        "ft_sentences": lambda: FineTuneSentences(lm, sentences=TaskSentences(), **common),
        "selfparam": lambda: SelfParam(lm, sentences=TaskSentences(), continuation_per_sentence=0.0,
                                       regularisation_per_sentence=0.0, **teacher, **common),
    }
    print(f"model {lm.name}; {len(sentences)} sentences; threads {torch.get_num_threads()}; "
          f"{', '.join(f'{k} {common[k]}' for k in TRAINING if k != 'update')}; {teacher}; lora {common['update']['lora']}")
    arms["ft_sentences"]().inject([knowledge])  # warm-up: allocator and kernels
    seconds: dict[str, list[float]] = {name: [] for name in arms}
    peaks: dict[str, list[int]] = {name: [] for name in arms}
    for repeat in range(args.repeats):
        for name in (list(arms) if repeat % 2 == 0 else list(reversed(arms))):  # alternate the order
            method = arms[name]()
            gc.collect()
            with PeakRSS() as rss:
                started = time.perf_counter()
                method.inject([knowledge])
                seconds[name].append(time.perf_counter() - started)
            peaks[name].append(rss.peak)
            method.reset()
    if not args.no_reference_style:
        gc.collect()
        with PeakRSS() as rss:
            started = time.perf_counter()
            reference_style_inject(lm, sentences, knowledge.context, common["epochs"], common["lr"], common["update"]["lora"])
            seconds["reference_style"] = [time.perf_counter() - started]
        peaks["reference_style"] = [rss.peak]

    base_time, base_peak = statistics.median(seconds["ft_sentences"]), max(peaks["ft_sentences"])
    print(f"{'arm':<16} {'seconds':>9} {'peak RSS MB':>12} {'time / FT':>10} {'RSS / FT':>9}")
    for name in seconds:
        t, p = statistics.median(seconds[name]), max(peaks[name])
        print(f"{name:<16} {t:9.2f} {p / 2**20:12.0f} {t / base_time:10.2f} {p / base_peak:9.2f}")
    t, p = statistics.median(seconds["selfparam"]) / base_time, max(peaks["selfparam"]) / base_peak
    print(f"selfparam / ft_sentences: time {t:.2f}x (target <= 1.2), peak RSS {p:.2f}x (target <= 1.1)")


if __name__ == "__main__":
    main()
