"""Training data: targets.jsonl records, bounded to what the model can take (every length that
reaches it), a held-out split, and a deterministic length-grouped batch order that a resumed
run can replay exactly."""

from __future__ import annotations

import dataclasses
import hashlib
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..config import TrainConfig
from ..io.audio import MIN_SECONDS, AudioError, audio_seconds
from ..io.jsonl import JsonlError, iter_lines
from ..records import MAX_INSTRUCTION_CHARS, RecordError, TargetRecord

if TYPE_CHECKING:
    from ..model import SpeechLLM

MEGABATCH = 32
"""Batches per length-sorting window: batches hold clips of similar length, order stays random."""


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


def load_targets(path: str | Path, skip_truncated: bool = True,
                 report: DataReport | None = None) -> tuple[list[TrainRecord], DataReport]:
    """Records of a targets.jsonl; audio paths are resolved against the file's folder. Targets
    flagged `truncated` are left out (counted) or, with `skip_truncated=False`, kept as cut; empty
    targets are left out (counted). A malformed line or a missing audio file is an error naming
    the file and line."""
    path = Path(path)
    if path.is_dir():
        raise JsonlError(f"{path}: is a folder; train.data names a targets .jsonl file")
    if not path.is_file():
        raise JsonlError(f"{path}: no such targets file (make one with `speechllm targets`)")
    root = path.absolute().parent
    out, report = [], report or DataReport()
    for line in iter_lines(path, required=TargetRecord.REQUIRED):
        if line.error:
            raise JsonlError(line.error)
        try:
            rec = TargetRecord.from_json(line.record, f"{path}:{line.number}")
        except RecordError as err:
            raise JsonlError(str(err)) from None
        report.truncated += rec.truncated
        if skip_truncated and rec.truncated:
            continue
        if not rec.target.strip():
            report.empty_target += 1
            continue
        audio = (root / rec.audio).absolute()
        try:
            seconds = audio_seconds(audio)
        except AudioError as err:
            raise JsonlError(f"{path}:{line.number}: audio {rec.audio} cannot be used ({err})") from None
        out.append(TrainRecord(rec.id, audio, seconds, rec.transcript, rec.instruction,
                               rec.target, rec.description, rec.truncated))
    report.kept = len(out)
    return out, report


def bound_records(records: list[TrainRecord], model: "SpeechLLM", cfg: TrainConfig,
                  report: DataReport) -> list[TrainRecord]:
    """The records within every length limit that reaches the model: the instruction (at most
    `MAX_INSTRUCTION_CHARS`), the clip (what the encoder takes), the target (cut to
    `cfg.max_target_tokens`, or left out with `cfg.skip_truncated`) and the whole sequence (the
    LLM's context); the transcript is cut by the prompt. Each change is counted in `report`."""
    max_seconds = min(model.config.encoder.max_seconds, model.encoder.max_seconds)
    out = []
    for rec in records:
        reason = None
        if len(rec.instruction) > MAX_INSTRUCTION_CHARS:
            reason = "long_instruction"
        elif not MIN_SECONDS <= rec.seconds <= max_seconds:
            reason = "audio_length"
        else:
            rec, reason = _bound_target(rec, model, cfg)
            if reason == "cut":
                report.cut += 1
                reason = None
        if reason is None and not _fits_context(rec, model, cfg):
            reason = "over_context"
        if reason is not None:
            setattr(report, reason, getattr(report, reason) + 1)
            continue
        out.append(rec)
    return out


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
    n = limit
    text = model.tokenizer.decode(ids[:n])
    while n > 0 and len(model.prompt.text(text)) > limit:  # decoding and re-encoding may merge differently
        n -= 1
        text = model.tokenizer.decode(ids[:n])
    if not text.strip():
        return rec, "empty_target"
    return dataclasses.replace(rec, target=text, truncated=True), "cut"


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
        scored = model.prompt_length(f"{rec.description}\n\n{rec.instruction}", None, has_audio=False)
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
    h = int(hashlib.sha256(record_id.encode()).hexdigest()[:8], 16)
    return h / 0xFFFFFFFF < fraction


def epoch_batches(records: list[TrainRecord], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Batches of record indices for one epoch: shuffled (seed, epoch), then sorted by length
    inside windows of MEGABATCH batches so that a batch pads little, then the batches shuffled."""
    rng = random.Random(f"{seed}:{epoch}")
    order = list(range(len(records)))
    rng.shuffle(order)
    window = batch_size * MEGABATCH
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start: start + window], key=lambda i: records[i].seconds)
        batches += [chunk[j: j + batch_size] for j in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches
