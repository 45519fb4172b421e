"""What a run costs, measured the same way for every method: peak memory of the run's own process.

Peak RSS: Linux resets a process's high-water mark when "5" is written to /proc/self/clear_refs, so a
run measures its own peak (VmHWM) even in a joblib worker that ran other jobs before (`scope: run`);
where that is not possible, the process's lifetime peak from getrusage is reported (`scope: process`:
it includes earlier jobs of the same worker). Peak GPU memory: torch's allocator peak on CUDA, reset at
the start of the run (memory torch allocated for tensors; the CUDA context itself is not counted).
"""
from __future__ import annotations

import os
import resource
import sys
import threading
from pathlib import Path
from typing import Any

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def reset_peaks() -> str:
    """Start measuring: reset the peak RSS (and CUDA's peak) where possible. Returns the RSS scope."""
    cuda = _cuda()
    if cuda is not None:
        cuda.reset_peak_memory_stats()
    try:
        _CLEAR_REFS.write_text("5")
        return "run"
    except OSError:
        return "process"


def load_average() -> float | None:
    """The machine's 1-minute load average (runnable threads, all processes), or None where the OS has none."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


class LoadMonitor:
    """The highest 1-minute load average over a run, sampled every `interval` seconds by a daemon thread.

    Samples taken only between a run's steps miss other work that competes during a long injection (a test
    suite started and finished inside one step left the samples under the threshold while it slowed that
    step 3x), so the whole run is watched. `max` is None where the OS has no load average."""

    def __init__(self, interval: float = 10.0) -> None:
        self.interval = interval
        self.max: float | None = load_average()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sample(self) -> None:
        load = load_average()
        if load is not None:
            self.max = max(load, self.max or 0.0)

    def _watch(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> "LoadMonitor":
        self._stop.clear()
        self._thread = threading.Thread(target=self._watch, name="kbench-load", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.sample()


def machine_shared(parallel_jobs: int, max_load: float | None, cpus: int | None = None,
                   threads: int | None = None) -> bool | None:
    """Whether a run's timings were taken on a machine it did not have alone: the launcher ran several jobs
    at once, or the 1-minute load average sampled during the run exceeded the run's own compute threads
    (`threads`, torch's intra-op count; default: the CPU count, torch's default) by more than half the CPU
    count (the rest is other work competing for the cores; with every core its own, 1.5 × the CPU count).
    None when one job ran and no load was sampled (an OS without a load average): unknown, not "alone"."""
    if parallel_jobs != 1:
        return True
    if max_load is None:
        return None
    cpus = cpus or os.cpu_count() or 1
    return max_load > (threads or cpus) + 0.5 * cpus


def torch_threads() -> int | None:
    """torch's intra-op thread count (`torch.get_num_threads()`: OMP_NUM_THREADS or torch.set_num_threads,
    else the CPU count), the parallelism CPU timings were taken with; None when torch was never imported."""
    torch = sys.modules.get("torch")
    return None if torch is None else int(torch.get_num_threads())


def peaks(scope: str) -> dict[str, Any]:
    """`peak_rss_bytes`, `peak_rss_scope` and, on CUDA, `peak_gpu_bytes` since `reset_peaks`."""
    out: dict[str, Any] = {"peak_rss_bytes": _peak_rss(scope), "peak_rss_scope": scope}
    cuda = _cuda()
    if cuda is not None:
        out["peak_gpu_bytes"] = int(cuda.max_memory_allocated())
    return out


def _peak_rss(scope: str) -> int:
    if scope == "run":
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # bytes on macOS, kB on Linux


def _cuda() -> Any:
    """torch.cuda when torch is imported and CUDA is in use, else None (never imports torch itself)."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    return torch.cuda
