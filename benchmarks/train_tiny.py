"""Build the tiny model's bundled weights (`core/data/tiny_reader.safetensors`) and measure what it reads.

    python benchmarks/train_tiny.py --stop-after 4000  # train as the bundled file was (about 45 min on a contended CPU)
    python benchmarks/train_tiny.py --measure-only  # context vs base QA-F1 of the bundled weights on task=synthetic

`model=tiny` must tell a method that uses the context from one that does not, in seconds, so its weights
are trained once here and shipped (about 400 kB) instead of on first use. The recipe (`core.tiny.pretrain`):
the default tiny architecture (4 layers, width 64, the 512-token byte-level BPE), causal-LM loss with the
answer weighted 5x, on a mix of
- 70 %: `task=synthetic`-shaped paragraphs generated with *held-out* data seeds 1000-1039 (never the
  evaluated `task.data_seed=0` nor RECIPE's `train_data_seed=1`), asked with both the training and the
  test phrasings; the names and values are random syllables and numbers, so nothing about the evaluated
  facts can be learned;
- 20 %: `core.tiny.reading_example` paragraphs (other templates, other names);
- 10 %: copy (induction) sequences of random tokens, so a unique earlier token is continued.
Seeded throughout (one thread for a reproducible reduction order); a rerun on the same torch version
should give the same weights, which was not verified bit for bit.
Scripts may import anything; `core` never imports `tasks`, so this data mix lives here.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from core import tiny  # noqa: E402
from core.types import GenerationSpec  # noqa: E402
from metrics.qa import qa_scores  # noqa: E402
from tasks.world.generate import generate_items  # noqa: E402

HELD_OUT_SEEDS = range(1000, 1040)


def synthetic_shaped(seeds=HELD_OUT_SEEDS) -> list[tuple[str, str, str]]:
    """(context, question, answer) from task=synthetic's generator on held-out data seeds."""
    examples = []
    for seed in seeds:
        for item in generate_items(40, 2 + seed % 4, 3, seed, "Question: {question}\nAnswer: {answer}\n"):
            examples += [(item.knowledge.context, question, answers[0]) for question, answers in item.questions]
            for sentence in item.knowledge.train_sentences:
                question, answer = sentence[len("Question: "):].rstrip("\n").split("\nAnswer: ")
                examples.append((item.knowledge.context, question, answer))
    return examples


def measure(lm, data_seed: int = 0, n_contexts: int = 6) -> dict[str, float]:
    """QA-F1 / exact match with the gold context in the prompt and without, on task=synthetic's data."""
    items = generate_items(n_contexts, 4, 3, data_seed, "Question: {question}\nAnswer: {answer}\n")
    spec = GenerationSpec(max_new_tokens=24, stop=("\n",))
    result = {}
    for name, with_context in (("context", True), ("base", False)):
        prompts, golds = [], []
        for item in items:
            for question, answers in item.questions:
                context = item.knowledge.context if with_context else None
                prompts.append(lm.prompt_ids(f"Question: {question}\nAnswer:", context=context))
                golds.append(answers)
        outputs = lm.generate_until(prompts, spec)
        scores = [qa_scores(output, gold) for output, gold in zip(outputs, golds)]
        for metric in ("qa_f1", "exact_match"):
            result[f"{name}/{metric}"] = round(sum(s[metric] for s in scores) / len(scores), 3)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=5000, help="length of the one-cycle schedule")
    parser.add_argument("--stop-after", type=int, default=None, help="stop at this step of the schedule")
    parser.add_argument("--out", default=str(tiny.BUNDLED))
    parser.add_argument("--measure-only", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.measure_only:
        started = time.perf_counter()
        lm = tiny.tiny_lm()
        print(f"built in {time.perf_counter() - started:.1f} s;", measure(lm))
        return
    torch.set_num_threads(1)
    tokenizer = tiny.build_tiny_tokenizer(512)
    pool = synthetic_shaped()
    sample = tiny.reading_examples(tokenizer, "{context}\n", extra=lambda rng: rng.choice(pool), p_extra=0.7, p_copy=0.1)
    config = tiny.tiny_config(tokenizer, 64, 4, 4)
    torch.manual_seed(0)
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(config)
    tiny.pretrain(model, sample, args.steps, seed=0, stop_after=args.stop_after)
    knobs = "hidden_size=64, num_layers=4, num_heads=4, vocab_size=512"
    model.half()  # half the file; loaded back as fp32
    tiny.save_weights(model, Path(args.out), {"fingerprint": tiny.weights_fingerprint(config, tokenizer), "knobs": knobs,
                                              "recipe": f"benchmarks/train_tiny.py --steps {args.steps} --stop-after "
                                                        f"{args.stop_after or args.steps}"})
    print(f"wrote {args.out}")
    print(measure(tiny.tiny_lm()))


if __name__ == "__main__":
    main()
