"""Training data: targets.jsonl records, bounded to what the model can take (every length that
reaches it), a held-out split, and a deterministic length-grouped batch order that a resumed
run can replay exactly.

Files of millions of rows (DeSTA2.5 trains on 5M) open through a row index (`speechllm.io.rows`):
byte offsets and the few columns batching needs (clip seconds from the records' `duration`,
text characters, an id hash for the held-out split, lengths and flags for the limits) as memory-mapped arrays; a
record is parsed when its batch is drawn. No audio header is read (the metadata gave each clip's
duration) and no Python object is kept per row."""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from ..config import TrainConfig
from ..io.audio import MIN_SECONDS, AudioError, audio_seconds
from ..io.jsonl import JsonlError
from ..io.rows import RowIndex
from ..records import MAX_INSTRUCTION_CHARS, RecordError, TargetRecord

if TYPE_CHECKING:
    from ..model import SpeechLLM

MEGABATCH = 32
"""Batches per length-sorting window: batches hold clips of similar length, order stays random."""
DATA_ORDER = 3
"""Version of the batch order (`epoch_batches`); part of a run's settings, so a run is resumed
only with the order it was trained with (1: Python's random, before row indexes; 2: sorted by
clip seconds; 3: sorted by estimated LLM positions)."""
CHARS_PER_TOKEN = 4.0
"""Characters of English text per LLM token, roughly (BPE vocabularies): estimates an example's
text positions from the index's character count without tokenizing millions of rows."""


@dataclass
class TrainRecord:
    id: str
    audio: Path
    """Absolute path of the clip."""
    seconds: float
    transcript: str | None
    instruction: str
    target: str
    description: str
    """The text description the target was generated from (token masking scores against it)."""
    truncated: bool = False
    """The target was cut at `train.max_target_tokens` (learned without an end-of-turn)."""


@dataclass
class DataReport:
    """What loading and bounding the targets changed or left out, counted (`train` prints it)."""
    kept: int = 0
    """Records kept (trained on or held out)."""
    truncated: int = 0
    """Targets flagged truncated by `speechllm targets` (left out or kept, as `skip_truncated` says)."""
    cut: int = 0
    """Targets longer than `train.max_target_tokens`, cut there (learned without an end-of-turn)."""
    too_long_target: int = 0
    """Targets longer than `train.max_target_tokens`, left out (`skip_truncated`)."""
    empty_target: int = 0
    """Records with an empty target, left out."""
    long_instruction: int = 0
    """Records whose instruction is longer than `MAX_INSTRUCTION_CHARS`, left out."""
    audio_length: int = 0
    """Records whose clip is shorter than `MIN_SECONDS` or longer than the encoder takes, left out."""
    over_context: int = 0
    """Records whose prompt and target (with token masking, also description and target) do not
    fit the LLM's context, left out."""

    def line(self) -> str:
        """The counts that are not zero, in words."""
        words = {"truncated": "flagged truncated by targets", "cut": "targets cut to train.max_target_tokens",
                 "too_long_target": "targets over train.max_target_tokens left out",
                 "empty_target": "empty targets left out",
                 "long_instruction": f"instructions over {MAX_INSTRUCTION_CHARS} characters left out",
                 "audio_length": "clips too short or too long for the encoder left out",
                 "over_context": "records longer than the LLM's context left out"}
        counts = [f"{getattr(self, k)} {v}" for k, v in words.items() if getattr(self, k)]
        return ", ".join(counts) if counts else "every record within the limits"


TARGETS_INDEX = "targets/2"
"""Name and version of what the row index of a targets file holds (`targets_columns`)."""
TARGET_COLUMNS = {"seconds": "float32", "id_hash": "uint32", "instruction_chars": "int32", "text_chars": "int32",
                  "flags": "uint8", "audio": "category"}
"""Per-row columns of a targets file's index: enough to filter, split and batch without parsing."""
TRUNCATED, EMPTY_TARGET = 1, 2
"""Bits of the `flags` column."""
UPFRONT_ROWS = 50_000
"""Files with up to this many usable rows are bounded to the model's token limits before step 1
(exact counts printed at the start, full batches) and their feature cache is filled up front;
larger ones are bounded as their batches are drawn (a dropped record makes its batch smaller)
and their features are computed when a batch first needs them, so start-up reads no audio and
tokenizes nothing."""


def id_hash(record_id: str) -> int:
    """The first 32 bits of the id's sha256 (what `held_out` compares)."""
    return int.from_bytes(hashlib.sha256(record_id.encode()).digest()[:4], "big")


def _target_columns(root: Path, path: Path):
    """The row extractor of a targets file: its index columns from one record, with the fields it
    reads checked (the others are checked by `TargetRecord.from_json` when the record is read for
    a batch). A record without a `duration` (an older targets file) falls back to its audio
    file's header, read once per clip."""
    header_seconds: dict[str, float] = {}

    def extract(obj: dict, where: str) -> dict:
        try:
            rid, audio, instruction, target = obj["id"], obj["audio"], obj["instruction"], obj["target"]
        except KeyError:
            missing = [k for k in TargetRecord.REQUIRED if k not in obj]
            raise JsonlError(f"{where}: missing field(s) {', '.join(missing)}") from None
        seconds, truncated = obj.get("duration"), obj.get("truncated", False)
        if not (isinstance(rid, (str, int)) and not isinstance(rid, bool) and isinstance(audio, str)
                and isinstance(instruction, str) and isinstance(target, str) and isinstance(truncated, bool)
                and (seconds is None or (isinstance(seconds, (int, float)) and not isinstance(seconds, bool)
                                         and 0 < seconds < float("inf")))):
            try:
                TargetRecord.from_json(obj, where)  # names the field at fault
            except RecordError as err:
                raise JsonlError(str(err)) from None
            raise JsonlError(f"{where}: 'duration' must be a positive number of seconds, got {seconds!r}")
        if seconds is None:
            if audio not in header_seconds:
                try:
                    header_seconds[audio] = audio_seconds((root / audio).absolute())
                except AudioError as err:
                    raise JsonlError(f"{where}: audio {audio} cannot be used ({err})") from None
            seconds = header_seconds[audio]
        transcript = obj.get("transcript")
        text = len(instruction) + len(target) + (len(transcript) if isinstance(transcript, str) else 0)
        return {"seconds": seconds, "id_hash": id_hash(str(rid)), "instruction_chars": len(instruction),
                "text_chars": text, "flags": TRUNCATED * truncated + EMPTY_TARGET * (not target.strip()),
                "audio": audio}
    return extract


class TargetsTable:
    """A targets.jsonl behind its row index (`speechllm.io.rows`): per-row columns as arrays,
    records parsed when read. Audio paths are resolved against the file's folder."""

    def __init__(self, path: str | Path, progress: bool = True):
        path = Path(path)
        if path.is_dir():
            raise JsonlError(f"{path}: is a folder; train.data names a targets .jsonl file")
        if not path.is_file():
            raise JsonlError(f"{path}: no such targets file (make one with `speechllm targets`)")
        self.path, self.root = path, path.absolute().parent
        self.index = RowIndex.open(path, TARGETS_INDEX, _target_columns(self.root, path), TARGET_COLUMNS, progress)
        self.seconds = self.index.column("seconds")
        self.text_chars = self.index.column("text_chars")
        self.flags = self.index.column("flags")

    def __len__(self) -> int:
        return len(self.index)

    def record(self, row: int) -> TrainRecord:
        """Row `row` as a training record (its clip's length from the index)."""
        number, obj = self.index.read(row)
        try:
            rec = TargetRecord.from_json(obj, f"{self.path}:{number}")
        except RecordError as err:
            raise JsonlError(f"{err} (the file changed since it was indexed?)") from None
        return TrainRecord(rec.id, (self.root / rec.audio).absolute(), float(self.seconds[row]), rec.transcript,
                           rec.instruction, rec.target, rec.description, rec.truncated)

    def audio_paths(self, rows: np.ndarray) -> list[Path]:
        """The distinct clips of `rows`, absolute."""
        return [(self.root / a).absolute() for a in self.index.categories("audio", self.index.column("audio")[rows])]


UNKNOWN, OK, CUT, DROPPED = 0, 1, 2, 3
"""A row's state under the token limits (`Bounds.status`)."""


class Bounds:
    """The token limits that reach the model (target length, context), applied to one record at
    a time and remembered per row, so each row is counted in the report once."""

    def __init__(self, table: TargetsTable, model: "SpeechLLM", cfg: TrainConfig, report: DataReport):
        self.table, self.model, self.cfg, self.report = table, model, cfg, report
        self.status = np.zeros(len(table), np.uint8)

    def check(self, row: int) -> TrainRecord | None:
        """The record of `row` within the limits (a long target cut), or None when it is left out."""
        state = self.status[row]
        if state == DROPPED:
            return None
        rec = self.table.record(row)
        if state == OK:
            return rec
        rec, reason = _bound_target(rec, self.model, self.cfg)
        if state == CUT:
            return rec
        if reason == "cut":
            self.report.cut += 1
            self.status[row] = CUT
            reason = None
        if reason is None and not _fits_context(rec, self.model, self.cfg):
            reason = "over_context"
        if reason is not None:
            setattr(self.report, reason, getattr(self.report, reason) + 1)
            self.status[row] = DROPPED
            return None
        if self.status[row] == UNKNOWN:
            self.status[row] = OK
        return rec


class TargetRows:
    """Some rows of a targets table (a training or held-out set): a sequence of `TrainRecord`s
    read when asked for. With `bounds`, records over a token limit are left out as they are read."""

    def __init__(self, table: TargetsTable, rows: np.ndarray, bounds: Bounds | None = None):
        self.table, self.rows, self.bounds = table, np.asarray(rows, np.int64), bounds

    @property
    def seconds(self) -> np.ndarray:
        return self.table.seconds[self.rows]

    def positions(self, audio_positions: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
        """Estimated LLM positions of each row: its text (transcript, instruction, target) at
        `CHARS_PER_TOKEN`, plus `audio_positions(seconds)` of its clip (what batches are sorted by)."""
        return self.table.text_chars[self.rows] / CHARS_PER_TOKEN + audio_positions(self.seconds)

    def __len__(self) -> int:
        return len(self.rows)

    def subset(self, keep: np.ndarray) -> "TargetRows":
        """The rows where the boolean array `keep` (one per row of this set) is true."""
        return TargetRows(self.table, self.rows[keep], self.bounds)

    def records(self, positions) -> list[TrainRecord]:
        """The records at `positions` of this set, those over a token limit left out."""
        out = []
        for p in positions:
            row = int(self.rows[p])
            rec = self.bounds.check(row) if self.bounds is not None else self.table.record(row)
            if rec is not None:
                out.append(rec)
        return out

    def __getitem__(self, item):
        if isinstance(item, slice):
            return self.records(range(*item.indices(len(self))))
        rec = self.records([item])
        if not rec:
            raise IndexError(f"{self.table.path}: row {int(self.rows[item])} is over a token limit")
        return rec[0]

    def __iter__(self):
        for start in range(0, len(self), 256):
            yield from self[start: start + 256]

    def audio_paths(self) -> list[Path]:
        return self.table.audio_paths(self.rows)


def load_targets(path: str | Path, skip_truncated: bool = True, report: DataReport | None = None,
                 progress: bool = True) -> tuple[TargetRows, DataReport]:
    """The records of a targets.jsonl (behind its row index), with audio paths resolved against
    the file's folder and clip lengths from the records' `duration` (the metadata's; an older file
    without it: the audio header). Targets flagged `truncated` are left out (counted) or, with
    `skip_truncated=False`, kept as cut; empty targets are left out (counted). A malformed line or
    a record without a duration whose audio cannot be read is an error naming the file and line."""
    table = TargetsTable(path, progress)
    report = report or DataReport()
    truncated = (table.flags & TRUNCATED) > 0
    empty = (table.flags & EMPTY_TARGET) > 0
    report.truncated += int(truncated.sum())
    keep = ~empty
    if skip_truncated:
        keep &= ~truncated
    report.empty_target += int((empty & ~truncated).sum() if skip_truncated else empty.sum())
    rows = TargetRows(table, np.flatnonzero(keep))
    report.kept = len(rows)
    return rows, report


def bound_records(records: TargetRows, model: "SpeechLLM", cfg: TrainConfig, report: DataReport,
                  upfront: bool | None = None) -> TargetRows:
    """The records within every length limit that reaches the model: the instruction (at most
    `MAX_INSTRUCTION_CHARS`), the clip (what the encoder takes), the target (cut to
    `cfg.max_target_tokens`, or left out with `cfg.skip_truncated`) and the whole sequence (the
    LLM's context); the transcript is cut by the prompt. Each change is counted in `report`.
    Instruction and clip lengths are checked here for every row from the index; the token limits
    here too when `upfront` (default: up to `UPFRONT_ROWS` rows), else as records are read."""
    max_seconds = min(model.config.encoder.max_seconds, model.encoder.max_seconds)
    table = records.table
    chars = table.index.column("instruction_chars")[records.rows]
    seconds = table.seconds[records.rows]
    long_instruction = chars > MAX_INSTRUCTION_CHARS
    bad_audio = ~long_instruction & ~((seconds >= np.float32(MIN_SECONDS)) & (seconds <= max_seconds))
    report.long_instruction += int(long_instruction.sum())
    report.audio_length += int(bad_audio.sum())
    kept = records.subset(~long_instruction & ~bad_audio)
    bounds = records.bounds or Bounds(table, model, cfg, report)
    kept.bounds = bounds
    if upfront is None:
        upfront = len(kept) <= UPFRONT_ROWS
    if upfront:
        for p in range(len(kept)):
            bounds.check(int(kept.rows[p]))
        kept = kept.subset(bounds.status[kept.rows] != DROPPED)
    return kept


def _bound_target(rec: TrainRecord, model: "SpeechLLM", cfg: TrainConfig) -> tuple[TrainRecord, str | None]:
    """(the record with a target of at most `cfg.max_target_tokens` tokens, end-of-turn included,
    and None, "cut", or the reason it is left out)."""
    limit = cfg.max_target_tokens
    ids = model.prompt.text(rec.target)
    end_of_turn = 0 if rec.truncated else len(model.prompt.end_of_turn_ids)
    if len(ids) + end_of_turn <= limit:
        return rec, None
    if cfg.skip_truncated:
        return rec, "too_long_target"
    text = cut_text(ids, limit, model)
    if not text.strip():
        return rec, "empty_target"
    return dataclasses.replace(rec, target=text, truncated=True), "cut"


def cut_text(ids: list[int], limit: int, model: "SpeechLLM") -> str:
    """The text of the first tokens of `ids` (data text) that re-encodes to at most `limit` tokens."""
    n = limit
    text = model.tokenizer.decode(ids[:n])
    while n > 0 and len(model.prompt.text(text)) > limit:  # decoding and re-encoding may merge differently
        n -= 1
        text = model.tokenizer.decode(ids[:n])
    return text


def _fits_context(rec: TrainRecord, model: "SpeechLLM", cfg: TrainConfig) -> bool:
    """Whether the record's sequence (and, with token masking, the description prompt the base
    LLM scores the target against) fits the LLM's context."""
    limit = model.context_length
    if limit is None:
        return True
    target = len(model.prompt.target(rec.target, complete=not rec.truncated))
    if model.prompt_length(rec.instruction, rec.transcript, True, rec.seconds) + target > limit:
        return False
    if cfg.token_masking > 0:
        from ..model.prompt import description_prompt  # the model package imports torch

        scored = model.prompt_length(description_prompt(rec.description, rec.instruction), None, has_audio=False)
        return scored + target <= limit
    return True


def file_digest(path: str | Path) -> str:
    """sha256 of a file's bytes (what a run trained on, compared when it resumes)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def held_out(record_id: str, fraction: float) -> bool:
    """Deterministic split by id hash (the same id is always on the same side)."""
    return id_hash(record_id) / 0xFFFFFFFF < fraction


def held_out_rows(records: TargetRows, fraction: float) -> np.ndarray:
    """`held_out` of every row of `records`, from the index's id hashes (one bool per row)."""
    return records.table.index.column("id_hash")[records.rows].astype(np.float64) / 0xFFFFFFFF < fraction


def batch_count(n: int, batch_size: int) -> int:
    """Batches per epoch of `epoch_batches` over `n` records."""
    window = batch_size * MEGABATCH
    full, rest = divmod(n, window)
    return full * MEGABATCH + -(-rest // batch_size)


def epoch_batches(lengths: np.ndarray, batch_size: int, seed: int, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """Batches of record positions for one epoch, as (order, starts): batch b is
    `order[starts[b]: starts[b] + batch_size]`, cut at its window's end. Positions are shuffled
    (seed, epoch), then sorted by `lengths` (per record, e.g. `TargetRows.positions`) inside
    windows of MEGABATCH batches so that a batch pads little, then the batches are shuffled. numpy
    throughout: millions of records take a second and no Python object each."""
    n = len(lengths)
    rng = np.random.default_rng([seed, epoch, DATA_ORDER])
    order = rng.permutation(n)
    window = batch_size * MEGABATCH
    order = order[np.lexsort((np.asarray(lengths)[order], np.arange(n) // window))]
    pos = np.arange(0, n, dtype=np.int64)
    starts = pos[(pos % window) % batch_size == 0]
    return order, starts[rng.permutation(len(starts))]


def batch_at(order: np.ndarray, starts: np.ndarray, b: int, batch_size: int) -> np.ndarray:
    """The positions of batch `b` of an `epoch_batches` result."""
    start = int(starts[b])
    window = batch_size * MEGABATCH
    end = min(start + batch_size, (start // window + 1) * window, len(order))
    return order[start:end]
