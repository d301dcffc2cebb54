"""Text replay in training (LAMOL's experience replay): text chat examples (`train.replay.data`,
e.g. what `speechllm replay` writes) mixed into the same optimizer steps as the audio records,
through the text path (no audio), so that LoRA on the LLM keeps rehearsing what the LLM did before.

The replay stream, like the audio stream, is a pure function of the seed and the global
micro-batch index k (see `ReplayStream`): every process, and a run resumed after a kill, draws the
same replay examples for the same k.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..config import ConfigError, TrainConfig
from ..errors import SpeechLLMError
from ..io.jsonl import JsonlError, iter_lines
from ..records import MAX_INSTRUCTION_CHARS, RecordError, ReplayRecord
from .data import cut_text, file_digest

if TYPE_CHECKING:
    from ..model import Example, SpeechLLM

REPLAY_ORDER = 1
"""Version of the replay stream (`ReplayStream`); part of a run's settings when replay is on."""
REPLAY_STREAM = 0x5245504C
"""Mixed into the seed of the replay stream's draws, so they differ from the audio stream's."""
REPLAY_KEYS = ("train.replay.data", "train.replay.ratio")
"""The replay settings in a run's flat settings."""


class ReplayDataError(SpeechLLMError, ValueError):
    """A replay file that cannot be used (missing, malformed line, nothing usable)."""


def check_replay(cfg: TrainConfig) -> None:
    """Refuse replay settings that cannot work, before anything is loaded: a ratio without a file
    (or a file that is not there), and replay without LoRA (text-only examples never reach a
    trainable weight then)."""
    r = cfg.replay
    if r.ratio == 0:
        return
    if not r.data:
        raise ConfigError(f"train.replay.ratio={r.ratio:g}: no replay file given (train.replay.data=FILE.jsonl, "
                          "one {\"instruction\", \"answer\"} object a line, e.g. from `speechllm replay`)")
    path = Path(r.data)
    if not path.is_file():
        what = "is a folder, not a replay .jsonl file" if path.is_dir() else "no such replay file"
        raise ReplayDataError(f"train.replay.data: {path}: {what} (make one with `speechllm replay`)")
    if not cfg.lora.enabled:
        raise ConfigError(f"train.replay.ratio={r.ratio:g} with train.lora.enabled=false: replay examples are text "
                          "only, so they pass through the frozen LLM and never through the adapter, the only "
                          "trainable part; they would change no weight. Enable LoRA (train.lora.enabled=true) to "
                          "rehearse the LLM's text abilities, or set train.replay.ratio=0")


def replay_settings(cfg: TrainConfig) -> dict:
    """The replay part of a run's settings: the file as the sha256 of its bytes (a changed file is
    other data under the same name), the ratio and the stream's version; nothing when replay is
    off, so runs without replay keep the settings they always had."""
    if cfg.replay.ratio == 0:
        return {}
    return {"train.replay.data": file_digest(cfg.replay.data), "train.replay.ratio": cfg.replay.ratio,
            "train.replay_order": REPLAY_ORDER}


def read_replay(path: str | Path) -> list[tuple[str, ReplayRecord]]:
    """(where, record) for each line of a replay JSONL; a malformed line is a `JsonlError` naming
    the file and line, a missing file a `ReplayDataError`."""
    path = Path(path)
    if not path.is_file():
        what = "is a folder, not a replay .jsonl file" if path.is_dir() else "no such replay file"
        raise ReplayDataError(f"train.replay.data: {path}: {what} (make one with `speechllm replay`)")
    out = []
    for line in iter_lines(path, required=ReplayRecord.REQUIRED):
        if line.error:
            raise JsonlError(line.error)
        where = f"{path}:{line.number}"
        try:
            out.append((where, ReplayRecord.from_json(line.record, where)))
        except RecordError as err:
            raise JsonlError(str(err)) from None
    if not out:
        raise ReplayDataError(f"train.replay.data: {path}: holds no replay examples")
    return out


@dataclass
class ReplayReport:
    """What bounding the replay examples to the model changed or left out, counted."""
    kept: int = 0
    cut: int = 0
    """Answers longer than `train.max_target_tokens`, cut there (learned without an end-of-turn)."""
    left_out: int = 0
    """Examples left out: a truncated or over-long answer with `train.skip_truncated`, an answer cut to
    nothing, an instruction over `MAX_INSTRUCTION_CHARS`, or a sequence past the LLM's context."""

    def line(self) -> str:
        return f"{self.kept} kept, {self.cut} answers cut to train.max_target_tokens, {self.left_out} left out"


@dataclass
class ReplayExample:
    id: str
    instruction: str
    answer: str
    complete: bool
    """False: the answer was cut; learned without the end-of-turn."""


def bound_replay(records: list[tuple[str, ReplayRecord]], model: "SpeechLLM", cfg: TrainConfig
                 ) -> tuple[list[ReplayExample], ReplayReport]:
    """The examples within every limit that reaches the model (as `data.bound_records` does for
    audio records): answers over `train.max_target_tokens` cut there, or left out with
    `train.skip_truncated` (as are answers already flagged truncated); over-long instructions and
    sequences past the LLM's context left out; each counted."""
    report = ReplayReport()
    limit, context = cfg.max_target_tokens, model.context_length
    out = []
    for where, rec in records:
        complete, answer = not rec.truncated, rec.answer
        if len(rec.instruction) > MAX_INSTRUCTION_CHARS or (rec.truncated and cfg.skip_truncated):
            report.left_out += 1
            continue
        ids = model.prompt.text(answer)
        if len(ids) + (len(model.prompt.end_of_turn_ids) if complete else 0) > limit:
            if cfg.skip_truncated:
                report.left_out += 1
                continue
            answer, complete = cut_text(ids, limit, model), False
            if not answer.strip():
                report.left_out += 1
                continue
            report.cut += 1
        target = len(model.prompt.target(answer, complete=complete))
        if context is not None and model.prompt_length(rec.instruction, None, has_audio=False) + target > context:
            report.left_out += 1
            continue
        out.append(ReplayExample(rec.id or where, rec.instruction, answer, complete))
    report.kept = len(out)
    return out, report


class ReplayStream:
    """Which replay examples micro-batch k gets: a pure function of (number of examples, batch
    size, ratio, seed, k).

    Micro-batch k holds `batch_size` audio records and the replay positions
    [floor(k*x + u), floor((k+1)*x + u)) of an endless sequence, x = batch_size * ratio / (1 - ratio)
    and u in [0, 1) drawn from the seed: over any K micro-batches the replay count is K*x within one,
    so replay is `ratio` of all examples, spread evenly (no random bursts). The endless sequence
    runs through the examples in a new seeded order each pass (numpy's permutation from
    (seed, pass))."""

    def __init__(self, size: int, batch_size: int, ratio: float, seed: int):
        if size < 1 or not 0 < ratio < 1:
            raise ValueError(f"a replay stream needs examples and a ratio in (0, 1), got {size} and {ratio}")
        self.size, self.seed = size, seed
        self.per_batch = batch_size * ratio / (1 - ratio)
        """Replay examples per micro-batch, on average (x)."""
        self.offset = float(np.random.default_rng([seed, REPLAY_STREAM]).random())
        """u: where in [0, 1) the first micro-batch's share starts."""
        self._pass, self._order = -1, None

    def span(self, k: int) -> tuple[int, int]:
        """Positions [start, stop) of micro-batch k in the endless replay sequence."""
        return math.floor(k * self.per_batch + self.offset), math.floor((k + 1) * self.per_batch + self.offset)

    def count(self, k: int) -> int:
        """Replay examples in micro-batch k."""
        start, stop = self.span(k)
        return stop - start

    def positions(self, k: int) -> list[int]:
        """Indices (into the replay examples) of micro-batch k's replay examples."""
        out = []
        for p in range(*self.span(k)):
            n, i = divmod(p, self.size)
            if n != self._pass:
                self._pass, self._order = n, np.random.default_rng([self.seed, REPLAY_STREAM, n]).permutation(self.size)
            out.append(int(self._order[i]))
        return out


class ReplayMix:
    """The bounded replay examples of a run and their stream: `examples(k)` for micro-batch k."""

    def __init__(self, examples: list[ReplayExample], cfg: TrainConfig):
        self.items = examples
        self.stream = ReplayStream(len(examples), cfg.batch_size, cfg.replay.ratio, cfg.seed)

    def examples(self, k: int) -> list["Example"]:
        from ..model import Example

        return [Example(e.instruction, None, None, e.answer, id=e.id, target_complete=e.complete)
                for e in (self.items[i] for i in self.stream.positions(k))]


def load_replay(model: "SpeechLLM", cfg: TrainConfig) -> tuple[ReplayMix, ReplayReport]:
    """The run's replay mix from `cfg.replay.data`, bounded to the model's limits; a file left with
    no usable example is a `ReplayDataError`."""
    examples, report = bound_replay(read_replay(cfg.replay.data), model, cfg)
    if not examples:
        raise ReplayDataError(f"train.replay.data: {cfg.replay.data}: no example within the model's limits "
                              f"({report.line()})")
    return ReplayMix(examples, cfg), report
