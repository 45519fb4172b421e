"""File plumbing: JSONL reading with precise errors, atomic writes, strict JSON, the on-disk cache, and
the fingerprints of the files a run reads (its non-config inputs)."""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
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
    """The path of an input file that must exist; it is noted as an input of the current run."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"data file not found: {path} (absolute: {path.resolve()}). Expected {expected_format}.")
    note_input(path)
    return path


def _decode(path: Path, data: bytes, fmt: str) -> str:
    """UTF-8 text of a file; undecodable bytes raise `DataError` naming file:line (not a byte offset)."""
    try:
        return data.decode("utf-8").removeprefix("\ufeff")  # a BOM (Windows editors) is not content
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte {data[err.start:err.start + 1]!r}). "
                        f"Save the file as UTF-8. Expected {fmt}.") from None


def read_text(path: str | Path, expected_format: str) -> str:
    """The whole text of a UTF-8 file (see `_decode`)."""
    path = require_file(path, expected_format)
    return _decode(path, path.read_bytes(), expected_format)


def read_lines(path: str | Path, expected_format: str, comments: bool = False) -> list[tuple[int, str]]:
    """(line number, stripped line) of every non-empty line (and, with `comments`, not starting with '#')."""
    numbered = enumerate(read_text(path, expected_format).splitlines(), start=1)
    return [(n, line.strip()) for n, line in numbered
            if line.strip() and not (comments and line.strip().startswith("#"))]


def read_jsonl_numbered(
    path: str | Path, required: Sequence[str] = (), expected_format: str = ""
) -> Iterator[tuple[str, dict]]:
    """Yield ("file:line", object) for each line of a JSONL file; a bad line raises `DataError` naming
    file:line and the problem (invalid JSON, not an object, missing fields, not UTF-8)."""
    fmt = expected_format or f"JSON lines with fields {list(required)}"
    path = require_file(path, fmt)
    for line_no, line in enumerate(read_text(path, fmt).splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{line_no}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{where}: not valid JSON ({err.msg}). Expected {fmt}.") from None
        yield where, _check_record(row, required, where, fmt)


def read_jsonl(path: str | Path, required: Sequence[str] = (), expected_format: str = "") -> Iterator[dict]:
    """Yield the objects of a JSONL file; a bad line raises `DataError` naming file:line and the problem."""
    for _, row in read_jsonl_numbered(path, required, expected_format):
        yield row


def read_records(path: str | Path, required: Sequence[str], expected_format: str) -> list[tuple[str, dict]]:
    """("file:line", object) for every record of a JSON list or JSON-lines file (chosen by the first
    character). In a JSON list, the line is where the record starts, so two records can be named."""
    path = require_file(path, expected_format)
    text = read_text(path, expected_format)
    if text.lstrip()[:1] != "[":
        return list(read_jsonl_numbered(path, required, expected_format))
    decoder, records = json.JSONDecoder(), []
    position = text.index("[") + 1
    try:
        while True:
            position = _skip_space(text, position)
            if text[position] == "]":
                break
            where = f"{path}:{text.count(chr(10), 0, position) + 1}"
            record, position = decoder.raw_decode(text, position)
            records.append((where, _check_record(record, required, where, expected_format)))
            position = _skip_space(text, position)
            if text[position] == ",":
                position += 1
            elif text[position] != "]":
                raise json.JSONDecodeError("expected ',' or ']'", text, position)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}:{err.lineno}: not valid JSON ({err.msg}). Expected {expected_format}.") from None
    except IndexError:
        raise DataError(f"{path}: the JSON list is not closed. Expected {expected_format}.") from None
    return records


def _skip_space(text: str, position: int) -> int:
    while position < len(text) and text[position] in " \t\r\n":
        position += 1
    return position


def _check_record(row: Any, required: Sequence[str], where: str, fmt: str) -> dict:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {_json_type(row)}. Expected {fmt}.")
    missing = [key for key in required if key not in row]
    if missing:
        raise DataError(f"{where}: missing field(s) {missing}. Expected {fmt}.")
    return row


def _json_type(value: Any) -> str:
    names = {type(None): "null", bool: "a boolean", int: "a number", float: "a number", str: "a string",
             list: "a list", dict: "an object"}
    return names.get(type(value), type(value).__name__)


def text_field(row: dict, key: str, where: str, fmt: str, optional: bool = False) -> str | None:
    """A field that must hold a string: null, a number or a list is refused naming file:line, never
    turned into the text 'None' or '42'. With `optional`, a missing field or null gives None."""
    value = row.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise DataError(f"{where}: field {key!r} must be a string, got {_json_type(value)}. Expected {fmt}.")
    return value


def read_json(path: str | Path, expected_format: str) -> Any:
    path = require_file(path, expected_format)
    try:
        return json.loads(read_text(path, expected_format))
    except json.JSONDecodeError as err:
        raise DataError(f"{path}:{err.lineno}: not valid JSON ({err.msg}). Expected {expected_format}.") from None


def _umask() -> int:
    """The process umask, read without changing it where Linux allows (os.umask can only set it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    current = os.umask(0o022)
    os.umask(current)
    return current


def default_modes(root: str | Path) -> None:
    """Give `root` (a file, or a folder and everything in it) the modes `open()` / `mkdir()` would:
    0666 / 0777 minus the umask. safetensors' save_file and tempfile.mkdtemp create 0600 files and
    0700 folders, so a saved adapter or a converted model would be unreadable to colleagues who can
    read everything else (a shared cluster folder or $KBENCH_CACHE)."""
    root = Path(root)
    umask = _umask()
    paths = [root, *root.rglob("*")] if root.is_dir() else [root]
    for path in paths:
        if path.is_symlink() or not path.exists():
            continue
        wanted = (0o777 if path.is_dir() else 0o666) & ~umask
        if path.stat().st_mode & 0o777 != wanted:
            path.chmod(wanted)


@contextlib.contextmanager
def atomic_write(path: str | Path, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path beside `path` to write the file at; when the block ends without an error,
    it is synced and renamed onto `path`, so readers never see half a file (on an error it is removed).

    The temporary file is made by mkstemp (a unique name: two writers never share it), which makes it
    0600; it gets the mode `open()` would give it (0666 minus the umask), so a record or a cached file is
    as readable as every other file (colleagues on a cluster). `suffix` ends the temporary name (writers
    such as `np.save` insist on their own)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    tmp = Path(name)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        os.close(fd)
        yield tmp
        default_modes(tmp)  # a writer that recreated the file (safetensors: 0600) gets the default mode back
        with tmp.open("rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield an empty staging folder beside `path` to fill; when the block ends without an error, the folder
    replaces `path` whole (an older `path` is moved aside, then deleted), so a reader sees the old folder or
    the new one, never a mix. On an error the staging folder is deleted and `path` is left as it was.
    The folder and its files get the modes `open()` / `mkdir()` would give them (`default_modes`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield staging
        default_modes(staging)  # mkdtemp's 0700 and safetensors' 0600: a shared folder must be readable
        retired = None
        if path.exists():
            retired = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".old")) / path.name
            path.rename(retired)
        staging.rename(path)
        if retired is not None:
            shutil.rmtree(retired.parent, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already when it was renamed


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write `text` as UTF-8 through `atomic_write`."""
    with atomic_write(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


# ---------------------------------------------------------------------- strict JSON (RFC 8259)
# Python's json writes NaN / Infinity as bare words that strict parsers (JavaScript, jq, Go) reject.
# Every JSON kbench writes goes through `to_json`: a non-finite float becomes the string "NaN",
# "Infinity" or "-Infinity" (float() reads them back), and allow_nan=False makes a miss an error.


def json_safe(obj: Any) -> Any:
    """`obj` with every non-finite float replaced by its string name (docs/records.md)."""
    if isinstance(obj, float):  # numpy's float64 too (a float subclass)
        if math.isfinite(obj):
            return float(obj)
        return "NaN" if math.isnan(obj) else ("Infinity" if obj > 0 else "-Infinity")
    if isinstance(obj, dict):
        return {key: json_safe(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(value) for value in obj]
    if type(obj).__module__ == "numpy" and hasattr(obj, "item"):  # numpy scalars and arrays
        return json_safe(obj.item() if getattr(obj, "ndim", 0) == 0 else obj.tolist())
    return obj


def to_json(obj: Any, indent: int | None = None) -> str:
    return json.dumps(json_safe(obj), indent=indent, ensure_ascii=False, default=str, allow_nan=False)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, to_json(obj, indent=2) + "\n")


def write_jsonl(path: str | Path, rows: Sequence[dict]) -> None:
    atomic_write_text(path, "".join(to_json(r) + "\n" for r in rows))


def append_jsonl(path: str | Path, rows: Sequence[dict]) -> None:
    """Append lines (predictions after each step); a crash can tear only the last line."""
    with Path(path).open("a", encoding="utf-8") as handle:
        handle.writelines(to_json(r) + "\n" for r in rows)


# ---------------------------------------------------------------------- a run's non-config inputs
# A run's identity (run_id) is its config. The files it reads are not in it: a data file edited in
# place, a deleted cache of generated sentences, other model weights in the same folder. Readers note
# each file here (`require_file` does for every loader); the experiment records their digests
# (`record["inputs"]`) and a later launch re-hashes them before it skips or resumes (runners/resume.py).
_INPUTS: dict[str, None] = {}  # insertion-ordered set of absolute paths


def note_input(path: str | Path) -> None:
    _INPUTS.setdefault(str(Path(path).expanduser().resolve()), None)


def clear_inputs() -> None:
    """Forget the noted inputs (a new run in the same process: joblib workers run several)."""
    _INPUTS.clear()


def noted_inputs() -> list[str]:
    return list(_INPUTS)


def file_digest(path: str | Path) -> dict[str, Any] | None:
    """{"sha256", "bytes"} of a file's content, or None if it is gone. Hashing Gemma's weights takes
    seconds, so the digest is cached under $KBENCH_CACHE/hashes/ keyed by path, size and mtime."""
    path = Path(path).expanduser().resolve()
    try:
        stat = path.stat()
    except OSError:
        return None
    entry = cache_dir("hashes") / f"{stable_hash(str(path))}.json"
    try:
        cached = json.loads(entry.read_text(encoding="utf-8"))
        if cached["size"] == stat.st_size and cached["mtime_ns"] == stat.st_mtime_ns and cached["path"] == str(path):
            return {"sha256": cached["sha256"], "bytes": stat.st_size}
    except (OSError, ValueError, KeyError, TypeError):
        pass
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    atomic_write_json(entry, {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                              "sha256": digest.hexdigest()})
    return {"sha256": digest.hexdigest(), "bytes": stat.st_size}


class FirstSeen:
    """Where each id was first seen, so a repeat is refused naming both file:lines: two records with
    one id would otherwise alias (one overwriting the other's pre-edit reference, one row for two)."""

    def __init__(self, what: str) -> None:
        self.what, self.seen = what, {}

    def add(self, key: Any, where: str) -> None:
        if key in self.seen:
            raise DataError(f"{where}: duplicate {self.what} {key!r}, first at {self.seen[key]}; "
                            f"every {self.what} must be unique")
        self.seen[key] = where
