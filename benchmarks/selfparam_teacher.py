"""What SELF-PARAM's teacher puts on the gold answers of its own training sentences.

SELF-PARAM distils P_θ(s | context) into the student; FT(S) trains on s itself. On the answer tokens of
a QA sentence the two targets differ by how sure the teacher (the model reading the context) is of the
gold answer: a teacher that spreads its mass over "The", the subject's name or a near value teaches the
student that spread. This prints, over the task's training QA sentences ("Question: q\\nAnswer: a"):

  p(answer | context)       geometric-mean probability per gold answer token, with the context (teacher)
  p(answer)                 the same without the context (the untouched student)
  argmax = gold (context)   share of answers whose every token is the teacher's argmax

FT(S)'s target puts probability 1 on every gold token.

`--pairs N` (N > 0) measures instead what SELF-PARAM's own teacher pass records per injection
(`method_info.teacher_quality`): over every token of N unique world pairs per context, the share where the
untouched model's argmax (reading the context) is the gold token, and the geometric-mean gold probability.
A sequential run's teacher (`teacher: current`) is the updated model; this is the untouched model's value
on the same contexts and pairs, the baseline its decline is read against.

    python benchmarks/selfparam_teacher.py                 # embedded Gemma 3 270M, the default synthetic task
    python benchmarks/selfparam_teacher.py --pairs 100 --n-contexts 5   # the sequential task's 5 contexts
    python benchmarks/selfparam_teacher.py --model tiny
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core.models import load_lm, tiny_lm  # noqa: E402
from tasks.synthetic import SyntheticTask  # noqa: E402

ANSWER_MARKER = "\nAnswer:"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="embedded:gemma3-270m", help="a model path, or 'tiny'")
    parser.add_argument("--n-contexts", type=int, default=6)
    parser.add_argument("--pairs", type=int, default=0, help="N > 0: SELF-PARAM's teacher_quality on N world pairs "
                                                             "per context (the default method's sentences: 100)")
    args = parser.parse_args()
    lm = tiny_lm() if args.model == "tiny" else load_lm(args.model)
    if args.pairs:
        return teacher_quality(lm, args.n_contexts, args.pairs)
    task = SyntheticTask(n_contexts=args.n_contexts)
    with_context, without_context, prompts = [], [], []
    for item in (qa_item.knowledge for qa_item in task.items):
        for sentence in item.train_sentences:
            question, answer = sentence.split(ANSWER_MARKER, 1)
            target = lm.encode(" " + answer.strip())
            prompt = question + ANSWER_MARKER
            with_context.append((lm.prompt_ids(prompt, context=item.context), target))
            without_context.append((lm.prompt_ids(prompt), target))
            prompts.append(prompt)
    teacher, student = lm.loglikelihood(with_context), lm.loglikelihood(without_context)

    def per_token(scores) -> float:
        return statistics.fmean(math.exp(s.logprob / s.n_tokens) for s in scores)

    print(f"{len(prompts)} training QA sentences from {len(task.items)} contexts ({args.model})")
    print(f"p(answer | context) per token, geometric mean: {per_token(teacher):.3f}")
    print(f"p(answer) per token without context:           {per_token(student):.3f}")
    print(f"argmax = gold on every answer token (context):  {statistics.fmean(s.token_accuracy == 1.0 for s in teacher):.3f}")
    print(f"argmax = gold on every answer token (no ctx):   {statistics.fmean(s.token_accuracy == 1.0 for s in student):.3f}")


def teacher_quality(lm, n_contexts: int, pairs: int) -> None:
    """SELF-PARAM's teacher pass on the untouched model, QA sentences only, one context at a time."""
    from methods.selfparam import SelfParam
    from methods.sentences import AutoSentences, TaskSentences

    method = SelfParam(lm, sentences=AutoSentences(TaskSentences(), n_pairs=pairs), continuation_per_sentence=0.0,
                       regularisation_per_sentence=0.0)
    for item in SyntheticTask(n_contexts=n_contexts).items:
        method._teacher_cache(method._pairs(item.knowledge))  # appends to method.teacher_quality
        quality = method.teacher_quality[-1]
        print(f"{item.knowledge.id}: argmax = gold {quality['qa_token_acc']:.3f} of {quality['qa_tokens']} tokens, "
              f"geometric-mean gold probability {quality['qa_token_prob']:.3f}")


if __name__ == "__main__":
    main()
