"""JSONL files that stages read and append to, resumably.

Every stage writes one record per line and flushes after each, so a killed run loses at most the
record in flight. `ResumableJsonl` opens an output for appending: it drops a torn last line (the
one being written when the process died), reports the ids already present, and never writes an id
twice.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

from ..errors import SpeechLLMError

T = TypeVar("T")


class JsonlError(SpeechLLMError, ValueError):
    """A JSONL line that cannot be parsed; names the file and the line."""


SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")
"""A JSON escape of a UTF-16 surrogate: valid in pairs (an emoji), not text when alone."""
MAX_REASON_CHARS = 200
"""A parser's own message is cut to this length."""


@dataclass
class Line:
    number: int
    """1-based line number in the file."""
    record: dict | None
    """The parsed object, or None when the line is malformed."""
    error: str | None
    """Why the line could not be used."""


def iter_lines(path: str | Path, required: tuple[str, ...] = ()) -> Iterator[Line]:
    """Each non-blank line of `path`, parsed; malformed lines (not UTF-8, not JSON, nested past
    the parser's depth, a number too long to convert) come back with `error` set instead of
    stopping the read (the caller decides whether that is fatal). A path that cannot be read is
    a `JsonlError`. A name ending in `.gz` is read through gzip (released response files often
    ship compressed); a damaged archive is a `JsonlError` naming the file."""
    path = Path(path)
    try:
        f = gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")
    except OSError as err:
        what = "is a folder, not a JSONL file" if path.is_dir() else f"cannot be read ({err.strerror or err})"
        raise JsonlError(f"{path}: {what}") from None
    with f:
        try:
            yield from _lines(f, path, required)
        except (OSError, EOFError, zlib.error) as err:  # gzip.BadGzipFile is an OSError
            what = "not a readable gzip file" if path.suffix == ".gz" else "read failed"
            raise JsonlError(f"{path}: {what} ({err})") from None


def _lines(f, path: Path, required: tuple[str, ...]) -> Iterator[Line]:
    """The parsed lines of the open binary file `f` (see `iter_lines`)."""
    for number, raw in enumerate(f, start=1):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            yield Line(number, None, f"{path}:{number}: not UTF-8 text (byte {err.start + 1})")
            continue
        if not text.strip():
            continue
        record, error = _parse(text, f"{path}:{number}")
        if error is not None:
            yield Line(number, None, error)
            continue
        missing = [k for k in required if k not in record]
        if missing:
            yield Line(number, None, f"{path}:{number}: missing field(s) {', '.join(missing)}")
            continue
        yield Line(number, record, None)


def _parse(text: str, where: str) -> tuple[dict | None, str | None]:
    """(the line's JSON object, None), or (None, why the line cannot be used)."""
    try:
        record = json.loads(text)
    except json.JSONDecodeError as err:
        return None, f"{where}: not valid JSON ({err.msg} at column {err.colno})"
    except (ValueError, RecursionError) as err:  # a number past int's digit limit, nesting too deep
        return None, f"{where}: not usable JSON ({type(err).__name__}: {str(err)[:MAX_REASON_CHARS]})"
    if not isinstance(record, dict):
        return None, f"{where}: expected a JSON object, got {type(record).__name__}"
    if SURROGATE_ESCAPE.search(text):
        try:
            json.dumps(record, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            return None, f"{where}: holds a lone surrogate escape (\\ud800-\\udfff), which is not text"
    return record, None


def read_jsonl(path: str | Path, required: tuple[str, ...] = ()) -> list[dict]:
    """All records of `path`; the first malformed line is a `JsonlError`."""
    out = []
    for line in iter_lines(path, required):
        if line.error:
            raise JsonlError(line.error)
        out.append(line.record)
    return out


def read_records(path: str | Path, parse: Callable[[dict, str], T], required: tuple[str, ...] = ()) -> list[T]:
    """All records of `path` as their record type (`parse(obj, "file:line")`, e.g.
    `TargetRecord.from_json`); the first malformed line is a `JsonlError`, a record `parse`
    refuses its error (a `SpeechLLMError` naming file:line, e.g. `RecordError`)."""
    out = []
    for line in iter_lines(path, required):
        if line.error:
            raise JsonlError(line.error)
        out.append(parse(line.record, f"{path}:{line.number}"))
    return out


def sibling_path(path: str | Path, suffix: str) -> Path:
    """`data/x.jsonl` -> `data/x<suffix>`, e.g. `.errors.jsonl` for a stage's error records."""
    path = Path(path)
    return path.with_name(path.name.removesuffix(".jsonl") + suffix)


def shard_path(path: str | Path, rank: int, world: int) -> Path:
    """`data/x.jsonl` -> `data/x.part<rank>-of-<world>.jsonl`: what process `rank` of `world`
    writes before the main process merges the parts in input order."""
    path = Path(path)
    return path.with_name(f"{path.stem}.part{rank}-of-{world}.jsonl")


def _truncate_torn_tail(path: Path) -> None:
    """Cut a last line that has no newline (a write interrupted mid-record)."""
    with open(path, "rb+") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        if size == 0:
            return
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return
        step = min(size, 1 << 16)
        pos = size
        while pos > 0:
            start = max(0, pos - step)
            f.seek(start)
            chunk = f.read(pos - start)
            idx = chunk.rfind(b"\n")
            if idx >= 0:
                f.truncate(start + idx + 1)
                return
            pos = start
        f.truncate(0)


class ResumableJsonl:
    """Append-only JSONL output keyed by `key` (default "id").

        with ResumableJsonl(out) as w:
            for rec in todo:
                if rec["id"] in w: continue
                w.write(rec)
    """

    def __init__(self, path: str | Path, key: str = "id", fsync: bool = False):
        self.path, self.key, self.fsync = Path(path), key, fsync
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.done: set[str] = set()
        if self.path.exists():
            _truncate_torn_tail(self.path)
            for line in iter_lines(self.path):
                if line.record is not None and key in line.record:
                    self.done.add(str(line.record[key]))
        self._f = open(self.path, "a", encoding="utf-8")

    def __contains__(self, key: Any) -> bool:
        return str(key) in self.done

    def __len__(self) -> int:
        return len(self.done)

    def write(self, record: dict) -> bool:
        """Append `record` unless its key is already present; returns whether it was written."""
        k = str(record[self.key])
        if k in self.done:
            return False
        self._f.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._f.flush()
        if self.fsync:
            os.fsync(self._f.fileno())
        self.done.add(k)
        return True

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> "ResumableJsonl":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_jsonl_atomic(path: str | Path, records: list[dict]) -> None:
    """Write a whole JSONL file at once (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def json_digest(obj: Any) -> str:
    """sha256 (hex) of `obj` as JSON with sorted keys: the identity digest of saved results."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def read_saved_json(path: str | Path, identity_key: str, identity: Any, others: list[Path] = ()) -> dict | None:
    """A result saved as one JSON object whose `identity_key` equals `identity` (made exactly as
    this run would make it): the one at `path`, else the first of `others` (e.g. the same result
    of a run beside it), copied to `path`. None when none matches; a missing, unreadable or
    foreign file counts as no match (the caller makes the result anew)."""
    path = Path(path)
    for candidate in [path, *(Path(o) for o in others if Path(o) != path)]:
        try:
            saved = json.loads(candidate.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(saved, dict) and saved.get(identity_key) == identity:
            if candidate != path:
                write_json_atomic(path, saved)
            return saved
    return None


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Write one JSON document at once (temp file + rename), indented for reading."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
