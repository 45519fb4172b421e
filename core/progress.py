"""Progress for every step that can take more than a few seconds (issue 13: a fresh cache spent minutes
in silence).

- `progress(...)`: tqdm's bar on a terminal. Where tqdm draws nothing (stderr is not a terminal: a
  joblib worker, a SLURM log, `| tee`, or `TQDM_DISABLE=1`) the same progress goes to the log instead,
  at most one line per `every` seconds (default 10) and one when it ends, so run.log and cluster logs
  show it too. `disable=True` silences both (a caller's "too short to show").
- `heartbeat(desc)`: for one opaque call with no steps to count (converting a GGUF model inside
  transformers): a line when it starts, one every `every` seconds while it runs, one when it ends.
"""
from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any

from tqdm.auto import tqdm

log = logging.getLogger("kbench.progress")
EVERY_S = 10.0


class progress:  # noqa: N801 (used like tqdm, which it wraps)
    """`progress(iterable, desc=..., total=...)` or `bar = progress(total=..., desc=...); bar.update(1)`."""

    def __init__(self, iterable: Iterable | None = None, desc: str = "", total: int | None = None,
                 disable: bool | None = None, every: float = EVERY_S, **tqdm_kwargs: Any) -> None:
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.iterable, self.desc, self.total, self.every = iterable, desc, total, every
        self.bar = tqdm(iterable, desc=desc, total=total, disable=disable, leave=False, dynamic_ncols=True,
                        **tqdm_kwargs)
        self.to_log = bool(self.bar.disable) and disable is not True
        self.n, self.postfix, self.closed = 0, "", False
        self.started = self.last = time.monotonic()

    def __iter__(self) -> Iterator:
        if not self.to_log:
            yield from self.bar
            return
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        self.bar.update(n)
        now = time.monotonic()
        if self.to_log and now - self.last >= self.every:
            self.last = now
            log.info("%s", self._line(now))

    def set_postfix(self, **values: Any) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())
        self.bar.set_postfix(**values)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.bar.close()
        now = time.monotonic()
        if self.to_log and now - self.started >= self.every:  # short steps end quietly
            log.info("%s (finished)", self._line(now))

    def __enter__(self) -> progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _line(self, now: float) -> str:
        elapsed = now - self.started
        if self.total:
            left = elapsed / self.n * (self.total - self.n) if self.n else float("nan")
            eta = f", ~{left:.0f} s left" if self.n and self.n < self.total else ""
            done = f"{self.n}/{self.total} ({100 * self.n / self.total:.0f}%)"
        else:
            done, eta = f"{self.n}", ""
        extra = f" [{self.postfix}]" if self.postfix else ""
        return f"{self.desc or 'progress'}: {done} after {elapsed:.0f} s{eta}{extra}"


@contextlib.contextmanager
def heartbeat(desc: str, every: float = EVERY_S) -> Iterator[None]:
    """Log `desc` when it starts, every `every` seconds while it runs, and when it ends."""
    started, stop = time.monotonic(), threading.Event()
    log.info("%s ...", desc)

    def beat() -> None:
        while not stop.wait(every):
            log.info("%s: still running after %.0f s", desc, time.monotonic() - started)

    thread = threading.Thread(target=beat, name=f"heartbeat: {desc}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        log.info("%s: done in %.1f s", desc, time.monotonic() - started)
