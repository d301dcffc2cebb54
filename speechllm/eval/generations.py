"""The answer cache: every answer of one system, saved as soon as its batch finishes.

    generations/NAME.jsonl   {"key", "answer"} per line ("task:ID", "if:ID", "text:KEY")
    generations/NAME.json    the identity of what produced them (model, fingerprint, settings)

A run whose identity differs from the saved one (another checkpoint, model or setting) moves the
old answers aside and starts afresh; an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Callable

from ..io.jsonl import ResumableJsonl, iter_lines

STALE_SUFFIX = ".stale-%Y%m%d-%H%M%S"
"""Appended (as a `time.strftime` format) to answers moved aside."""


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
        if self.path.exists():
            for line in iter_lines(self.path):
                if line.record is not None:
                    self.answers[line.record["key"]] = line.record["answer"]

    def fill(self, keys: list[str], length: Callable[[str], int], answer: Callable[[list[str]], list[str]],
             batch_size: int, desc: str, progress: bool) -> None:
        """Answer the keys not answered yet, batch by batch (similar lengths together), saving
        each batch as it finishes."""
        from tqdm import tqdm

        todo = sorted((k for k in keys if k not in self.answers), key=lambda k: (length(k), k))
        if not todo:
            return
        bar = tqdm(total=len(todo), desc=f"{self.name}: {desc}", unit="answer", disable=not progress,
                   file=sys.stderr)
        with ResumableJsonl(self.path, key="key") as w:
            for start in range(0, len(todo), batch_size):
                chunk = todo[start: start + batch_size]
                for k, text in zip(chunk, answer(chunk)):
                    self.answers[k] = text
                    w.write({"key": k, "answer": text})
                bar.update(len(chunk))
        bar.close()
