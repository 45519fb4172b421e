"""File plumbing: JSONL reading with precise errors, atomic writes, the on-disk cache."""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from core.types import DataError


def cache_dir(*parts: str) -> Path:
    """`$KBENCH_CACHE` (default `~/.cache/kbench`) joined with `parts`, created on demand."""
    root = Path(os.environ.get("KBENCH_CACHE", Path.home() / ".cache" / "kbench")).expanduser()
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def stable_hash(obj: Any, length: int = 16) -> str:
    """Hex digest of a JSON-serialisable object, independent of dict order."""
    blob = json.dumps(obj, sort_keys=True, ensure_ascii=False, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


def require_file(path: str | Path, expected_format: str) -> Path:
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"data file not found: {path} (absolute: {path.resolve()}). Expected {expected_format}.")
    return path


def read_jsonl(path: str | Path, required: Sequence[str] = (), expected_format: str = "") -> Iterator[dict]:
    """Yield the objects of a JSONL file; a bad line raises `DataError` naming file:line and the problem."""
    fmt = expected_format or f"JSON lines with fields {list(required)}"
    path = require_file(path, fmt)
    with path.open(encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{line_no}: not valid JSON ({err.msg}). Expected {fmt}.") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{line_no}: expected a JSON object, got {type(row).__name__}.")
            missing = [key for key in required if key not in row]
            if missing:
                raise DataError(f"{path}:{line_no}: missing field(s) {missing}. Expected {fmt}.")
            yield row


def read_json(path: str | Path, expected_format: str) -> Any:
    path = require_file(path, expected_format)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataError(f"{path}:{err.lineno}: not valid JSON ({err.msg}). Expected {expected_format}.") from None


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write via a temp file in the same directory and rename, so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")


def write_jsonl(path: str | Path, rows: Sequence[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in rows))
