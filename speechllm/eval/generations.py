"""The answer cache: every answer of one system, saved as soon as its batch finishes.

    generations/NAME.jsonl   {"key", "answer"} per line ("task:ID", "if:ID", "text:KEY")
    generations/NAME.json    the identity of what produced them (model, fingerprint, settings)

A run whose identity differs from the saved one (another checkpoint, model or setting) moves the
old answers aside and starts afresh; an interrupted run resumes where it stopped. An answer saved
with a digest of what was asked (`fill(asked=...)`) is kept only while the key still asks that:
items redrawn under the same key (other constraints, phrasings or seed) are answered anew.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Callable

from ..io.jsonl import ResumableJsonl, iter_lines, write_jsonl_atomic


CHUNK_BATCHES = 4
"""Batches' worth of keys answered (and saved) together: the rows a finished answer frees are
filled from the same chunk, so a longer chunk keeps decoding's rows busier and an interrupted
run loses more."""

STALE_SUFFIX = ".stale-%Y%m%d-%H%M%S"
"""Appended (as a `time.strftime` format) to answers moved aside."""


def kept_finished(drop_finished: bool) -> dict:
    """What an answer cache's identity adds for `eval.drop_finished`: nothing by default (caches
    made before the setting stay valid), {"drop_finished": False} when finished answers were kept
    in their batch (in bf16 the two round some near-ties apart)."""
    return {} if drop_finished else {"drop_finished": False}


class Generations:
    """The saved answers of one system (generations/NAME.jsonl) with what produced them
    (generations/NAME.json). A run with another identity moves the old answers aside."""

    def __init__(self, folder: Path, name: str, identity: dict):
        self.name = name
        folder.mkdir(parents=True, exist_ok=True)
        self.path, meta = folder / f"{name}.jsonl", folder / f"{name}.json"
        if meta.exists() and json.loads(meta.read_text()) != identity:
            stale = time.strftime(STALE_SUFFIX)
            for p in (self.path, meta):
                if p.exists():
                    p.rename(p.with_name(p.name + stale))
            print(f"[speechllm] {name}: the saved answers came from another model or setting; moved aside "
                  f"({self.path.name}{stale})", file=sys.stderr)
        meta.write_text(json.dumps(identity, indent=2) + "\n")
        self.answers: dict[str, str] = {}
        self.asked: dict[str, str] = {}
        """Digest of what each key asked when it was answered (answers saved with one)."""
        if self.path.exists():
            for line in iter_lines(self.path):
                if line.record is not None:
                    self.answers[line.record["key"]] = line.record["answer"]
                    if "asked" in line.record:
                        self.asked[line.record["key"]] = line.record["asked"]

    def fill(self, keys: list[str], length: Callable[[str], int], answer: Callable[[list[str], int], list[str]],
             batch_size: int, desc: str, progress: bool, asked: Callable[[str], str] | None = None) -> None:
        """Answer the keys not answered yet in order of `length` (similar lengths together),
        `CHUNK_BATCHES` batches' worth at a time, saving each chunk as it finishes:
        `answer(chunk, batch_size)` answers a chunk of keys at most `batch_size` at once (greedy
        decoding fills the rows of finished answers with the chunk's next keys). `asked(key)`: the
        text a key asks (prompt pieces joined); a saved answer to other text is dropped from the
        file and answered anew."""
        from tqdm import tqdm

        digest = {k: hashlib.sha256(asked(k).encode()).hexdigest()[:16] for k in keys} if asked else {}
        stale = [k for k in keys if k in self.answers and digest and self.asked.get(k) != digest[k]]
        if stale:
            for k in stale:
                del self.answers[k]
            write_jsonl_atomic(self.path, [self._line(k) for k in self.answers])
            print(f"[speechllm] {self.name}: {len(stale)} saved answers were to other questions (the items under "
                  "their keys changed); answering them anew", file=sys.stderr)
        todo = sorted((k for k in keys if k not in self.answers), key=lambda k: (length(k), k))
        if not todo:
            return
        bar = tqdm(total=len(todo), desc=f"{self.name}: {desc}", unit="answer", disable=not progress,
                   file=sys.stderr)
        with ResumableJsonl(self.path, key="key") as w:
            step = batch_size * CHUNK_BATCHES
            for start in range(0, len(todo), step):
                chunk = todo[start: start + step]
                for k, text in zip(chunk, answer(chunk, batch_size)):
                    self.answers[k] = text
                    if k in digest:
                        self.asked[k] = digest[k]
                    w.write(self._line(k))
                bar.update(len(chunk))
        bar.close()

    def _line(self, key: str) -> dict:
        """The saved line of an answer: key, answer, and the digest of what it answered when known."""
        return {"key": key, "answer": self.answers[key], **({"asked": self.asked[key]} if key in self.asked else {})}
