"""Sweep overhead: the same 6-job sweep run serially (Hydra's basic launcher) and with 2 joblib workers.

    flock /tmp/kbench-cpu.lock python benchmarks/sweep_overhead.py                    # tiny model
    flock /tmp/kbench-cpu.lock python benchmarks/sweep_overhead.py --model gemma3_270m --sweep "method=base,context seed=0,1,2" task.limit=2

Times each whole `python run.py -m ...` command (interpreter start, imports, model loads, every job) and
prints joblib / serial; the target is <= 0.6 on 2 cores. Both sweeps run with `resume.search_dir=null`
(nothing is skipped) into a temporary folder, and every job's record is checked to be `done`.
Serial jobs use torch's default threads (all cores); joblib's workers get cores / n_jobs threads each.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def sweep(out_dir: Path, launcher: list[str], model: str, jobs: str, extra: list[str]) -> float:
    command = [sys.executable, str(ROOT / "run.py"), "-m", f"model={model}", "logger=none", *shlex.split(jobs),
               *extra, *launcher, "resume.search_dir=null", f"hydra.sweep.dir={out_dir}"]
    started = time.perf_counter()
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=os.environ | {"TQDM_DISABLE": "1"})
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        sys.exit(f"sweep failed ({' '.join(command)}):\n{result.stderr[-3000:]}")
    statuses = [json.loads(p.read_text())["status"] for p in out_dir.glob("*/record.json")]
    if not statuses or any(s != "done" for s in statuses):
        sys.exit(f"expected every job done in {out_dir}, got {statuses}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--sweep", default="method=ft_context,ft_sentences seed=0,1,2",
                        help="the swept overrides (6 jobs by default)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("extra", nargs="*", help="more overrides for every job, e.g. task.limit=2")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="kbench-sweep-") as tmp:
        serial = sweep(Path(tmp) / "serial", [], args.model, args.sweep, args.extra)
        parallel = sweep(Path(tmp) / "joblib", ["hydra/launcher=joblib", f"hydra.launcher.n_jobs={args.workers}"],
                         args.model, args.sweep, args.extra)
        n_jobs = len(list((Path(tmp) / "serial").glob("*/record.json")))
    print(f"sweep: model={args.model} {args.sweep} {' '.join(args.extra)} ({n_jobs} jobs)")
    print(f"serial (basic launcher):        {serial:7.1f} s")
    print(f"joblib ({args.workers} workers):              {parallel:7.1f} s")
    print(f"ratio joblib / serial:          {parallel / serial:7.2f}   (target <= 0.6)")


if __name__ == "__main__":
    main()
