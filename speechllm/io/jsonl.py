"""JSONL files that stages read and append to, resumably.

Every stage writes one record per line and flushes after each, so a killed run loses at most the
record in flight. `ResumableJsonl` opens an output for appending: it drops a torn last line (the
one being written when the process died), reports the ids already present, and never writes an id
twice.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from ..errors import SpeechLLMError


class JsonlError(SpeechLLMError, ValueError):
    """A JSONL line that cannot be parsed; names the file and the line."""


@dataclass
class Line:
    number: int
    """1-based line number in the file."""
    record: dict | None
    """The parsed object, or None when the line is malformed."""
    error: str | None
    """Why the line could not be used."""


def iter_lines(path: str | Path, required: tuple[str, ...] = ()) -> Iterator[Line]:
    """Each non-blank line of `path`, parsed; malformed lines come back with `error` set instead of
    stopping the read (the caller decides whether that is fatal)."""
    path = Path(path)
    with open(path, encoding="utf-8") as f:
        for number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except json.JSONDecodeError as err:
                yield Line(number, None, f"{path}:{number}: not valid JSON ({err.msg} at column {err.colno})")
                continue
            if not isinstance(record, dict):
                yield Line(number, None, f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
                continue
            missing = [k for k in required if k not in record]
            if missing:
                yield Line(number, None, f"{path}:{number}: missing field(s) {', '.join(missing)}")
                continue
            yield Line(number, record, None)


def read_jsonl(path: str | Path, required: tuple[str, ...] = ()) -> list[dict]:
    """All records of `path`; the first malformed line is a `JsonlError`."""
    out = []
    for line in iter_lines(path, required):
        if line.error:
            raise JsonlError(line.error)
        out.append(line.record)
    return out


def sibling_path(path: str | Path, suffix: str) -> Path:
    """`data/x.jsonl` -> `data/x<suffix>`, e.g. `.errors.jsonl` for a stage's error records."""
    path = Path(path)
    return path.with_name(path.name.removesuffix(".jsonl") + suffix)


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
