"""Training data: targets.jsonl records, a held-out split, and a deterministic length-grouped
batch order that a resumed run can replay exactly."""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from pathlib import Path

import soundfile as sf

from ..io.jsonl import JsonlError, iter_lines
from ..records import TargetRecord

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
    kept: int = 0
    truncated: int = 0
    """Targets flagged truncated (left out or kept, as `skip_truncated` says)."""


def load_targets(path: str | Path, skip_truncated: bool = True) -> tuple[list[TrainRecord], DataReport]:
    """Records of a targets.jsonl; audio paths are resolved against the file's folder. Targets
    flagged `truncated` are left out (counted) or, with `skip_truncated=False`, kept as cut. A malformed
    line or a missing audio file is an error naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise JsonlError(f"{path}: no such targets file (make one with `speechllm targets`)")
    root = path.absolute().parent
    out, report = [], DataReport()
    for line in iter_lines(path, required=TargetRecord.REQUIRED):
        if line.error:
            raise JsonlError(line.error)
        rec = TargetRecord.from_json(line.record, f"{path}:{line.number}")
        report.truncated += rec.truncated
        if skip_truncated and rec.truncated:
            continue
        audio = (root / rec.audio).absolute()
        try:
            info = sf.info(str(audio))
        except Exception as err:
            raise JsonlError(f"{path}:{line.number}: audio {rec.audio} cannot be read ({err})") from None
        out.append(TrainRecord(rec.id, audio, info.frames / info.samplerate, rec.transcript, rec.instruction,
                               rec.target, rec.description, rec.truncated))
    report.kept = len(out)
    return out, report


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
