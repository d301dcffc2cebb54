"""The stage file formats, one dataclass each: what a stage writes is what the next one reads.

    manifest.jsonl   ManifestRecord   {"id", "audio", "labels"?}
    metadata.jsonl   MetadataRecord   {"id", "audio", "duration", "annotations", "description", "labels"?}
    targets.jsonl    TargetRecord     {"id", "audio", "duration"?, "transcript", "description", "instruction", "target",
                                       "strategy", "generator", "target_tokens", "truncated", "kept"?, "checks"?,
                                       "self_output"?, "edit_distance"?, "fixes"?}
    tasks.jsonl      TaskItem         {"id", "task", "audio", "instruction", "answer_kind", "reference", ...}
    replay.jsonl     ReplayRecord     {"id"?, "instruction", "answer", "source"?, "truncated"?, "answer_tokens"?,
                                       "generator"?}

Each has `from_json(obj, where)` (a clear `RecordError` naming `where`, e.g. "file.jsonl:12", for a
missing field or a value of the wrong type) and `to_json()` (the JSON object, keys in the order
above). Audio paths are relative to the folder of the file that holds the record, or absolute.

Which transcript is which: `MetadataRecord.transcript` is the words spoken as best known (the
manifest's label when there is one, else the ASR annotation): what targets and the transcription
task's reference use. `MetadataRecord.asr_transcript` is what the ASR annotator heard: what the
speech model is given at inference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from .errors import SpeechLLMError
from .labels import LABEL_ONLY, MEASURED, TRANSCRIPT, normalize_label

METRICS_FILE = "metrics.jsonl"
"""A training run's per-step log inside its folder (read by the evaluation report)."""
MAX_INSTRUCTION_CHARS = 2000
"""Longest instruction the speech model is asked: chat, eval and serve refuse a longer one,
training leaves such a record out (counted)."""


class RecordError(SpeechLLMError, ValueError):
    """A JSON record that does not fit its stage format."""


def _require(obj: Any, where: str, fields: dict[str, tuple[type, ...]], optional: dict[str, tuple[type, ...]]) -> dict:
    """`obj` as a dict whose `fields` are present with the given types (and `optional` ones, when
    present and not null, too); raises RecordError naming `where`."""
    if not isinstance(obj, dict):
        raise RecordError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    missing = [k for k in fields if obj.get(k) is None]
    if missing:
        raise RecordError(f"{where}: missing field(s) {', '.join(missing)}")
    for key, types in {**fields, **optional}.items():
        value = obj.get(key)
        if value is not None and (not isinstance(value, types) or isinstance(value, bool) and bool not in types):
            names = " or ".join(t.__name__ for t in types)
            raise RecordError(f"{where}: '{key}' must be {names}, got {type(value).__name__}")
        if isinstance(value, float) and not math.isfinite(value):
            raise RecordError(f"{where}: '{key}' must be a finite number, got {value}")
    return obj


def _id(value: Any) -> str:
    return str(value)


def _text(value: Any) -> str | None:
    """A label or annotation value as stripped text; None when empty or not text/number."""
    if isinstance(value, str):
        return value.strip() or None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return None


@dataclass
class ManifestRecord:
    """One clip to annotate (`manifest.jsonl`, or `speechllm synth`'s train/test.jsonl)."""
    id: str
    audio: str
    labels: dict[str, Any] = field(default_factory=dict)
    """Ground truth where known: transcript, gender, pitch, ... (the attribute table's keys), or
    any other column."""

    @classmethod
    def from_json(cls, obj: Any, where: str) -> "ManifestRecord":
        obj = _require(obj, where, {"id": (str, int), "audio": (str,)}, {"labels": (dict,)})
        return cls(_id(obj["id"]), obj["audio"], dict(obj.get("labels") or {}))

    def to_json(self) -> dict:
        out: dict[str, Any] = {"id": self.id, "audio": self.audio}
        if self.labels:
            out["labels"] = self.labels
        return out


@dataclass
class MetadataRecord:
    """One annotated clip (`metadata.jsonl`, written by `speechllm annotate`)."""
    id: str
    audio: str
    duration: float
    """Seconds."""
    annotations: dict[str, dict]
    """annotator name -> {"value", "bin"?, "confidence"?, "extra"?, "annotator"}; may be empty in
    a file a user wrote by hand (then labels and the description carry the facts)."""
    description: str
    """The DeSTA-style description line the text LLM reads."""
    labels: dict[str, Any] = field(default_factory=dict)
    """The manifest's labels, as given."""

    REQUIRED = ("id", "audio", "description")

    @classmethod
    def from_json(cls, obj: Any, where: str) -> "MetadataRecord":
        obj = _require(obj, where, {"id": (str, int), "audio": (str,), "description": (str,)},
                       {"duration": (int, float), "annotations": (dict,), "labels": (dict,)})
        return cls(_id(obj["id"]), obj["audio"], float(obj.get("duration") or 0.0), obj.get("annotations") or {},
                   obj["description"], dict(obj.get("labels") or {}))

    def to_json(self) -> dict:
        out: dict[str, Any] = {"id": self.id, "audio": self.audio, "duration": self.duration,
                               "annotations": self.annotations, "description": self.description}
        if self.labels:
            out["labels"] = self.labels
        return out

    def label(self, key: str) -> str | None:
        """The manifest's label for `key` as text, None when absent or empty."""
        return _text(self.labels.get(key))

    def annotation(self, key: str) -> str | None:
        """The annotators' word for `key` (its bin; the text for the transcript), None if none."""
        ann = self.annotations.get(key)
        if not isinstance(ann, dict):
            return None
        return _text(ann.get("value") if key == TRANSCRIPT else ann.get("bin"))

    def value(self, key: str) -> str | None:
        """The clip's value of `key`: its label if labelled, else the annotation's word."""
        return self.label(key) or self.annotation(key)

    @property
    def transcript(self) -> str | None:
        """The words spoken as best known: the label transcript, else the ASR annotation."""
        return self.value(TRANSCRIPT)

    @property
    def asr_transcript(self) -> str | None:
        """What the ASR annotator heard (the speech model's transcript at inference); with
        `--trust-labels` the annotation holds the label transcript instead."""
        ann = self.annotations.get(TRANSCRIPT)
        value = ann.get("value") if isinstance(ann, dict) else None
        return value if isinstance(value, str) else None

    def attributes(self) -> dict[str, str]:
        """Lower-cased words of every attribute of the table the clip has (measured ones from
        labels or annotations, label-only ones from labels)."""
        out = {}
        for key in MEASURED:
            if (value := self.value(key)) is not None:
                out[key] = value.lower()
        for key in LABEL_ONLY:
            if (value := self.label(key)) is not None:
                out[key] = value.lower()
        return out


@dataclass
class TargetRecord:
    """One training example (`targets.jsonl`, written by `speechllm targets`)."""
    id: str
    audio: str
    transcript: str | None
    """The transcript the speech model is given in training (see the module docstring)."""
    description: str
    """The description the target was generated from (token masking scores against it)."""
    instruction: str
    target: str
    strategy: str = ""
    """The strategy that made the target (self-output, label, ...)."""
    generator: dict = field(default_factory=dict)
    """Provenance: the model and its fingerprint and decoding settings, or the template."""
    target_tokens: int = 0
    """Tokens of the target as trained on (end-of-turn included)."""
    truncated: bool = False
    """The answer was cut at `train.max_target_tokens`."""
    kept: str | None = None
    """selective: which of self-output and label was kept; minimum-change: `self-output`
    (unchanged) or `minimum-change` (edited)."""
    checks: dict | None = None
    """selective: the agreement checks of the self-output."""
    duration: float | None = None
    """The clip's length in seconds, from the metadata (training reads it instead of the audio
    file's header; None in files an older speechllm wrote)."""
    self_output: str | None = None
    """minimum-change: the base LLM's own answer before any edit."""
    edit_distance: int | None = None
    """minimum-change: word-level Levenshtein distance from `self_output` to `target`."""
    fixes: list | None = None
    """minimum-change: the changes made, each {"attribute", "from", "to", "how"} (how: word,
    negation, code or prompt); empty when the self-output was right."""

    REQUIRED = ("id", "audio", "instruction", "target")

    @classmethod
    def from_json(cls, obj: Any, where: str) -> "TargetRecord":
        obj = _require(obj, where, {"id": (str, int), "audio": (str,), "instruction": (str,), "target": (str,)},
                       {"transcript": (str,), "description": (str,), "strategy": (str,), "generator": (dict,),
                        "target_tokens": (int,), "truncated": (bool,), "kept": (str,), "checks": (dict,),
                        "duration": (int, float), "self_output": (str,), "edit_distance": (int,), "fixes": (list,)})
        duration = obj.get("duration")
        if duration is not None and duration <= 0:
            raise RecordError(f"{where}: 'duration' must be a positive number of seconds, got {duration}")
        return cls(_id(obj["id"]), obj["audio"], obj.get("transcript"), obj.get("description") or "",
                   obj["instruction"], obj["target"], obj.get("strategy") or "", obj.get("generator") or {},
                   obj.get("target_tokens") or 0, bool(obj.get("truncated")), obj.get("kept"), obj.get("checks"),
                   None if duration is None else float(duration), obj.get("self_output"), obj.get("edit_distance"),
                   obj.get("fixes"))

    def to_json(self) -> dict:
        out = {"id": self.id, "audio": self.audio, **({"duration": self.duration} if self.duration else {}),
               "transcript": self.transcript, "description": self.description,
               "instruction": self.instruction, "target": self.target, "strategy": self.strategy,
               "generator": self.generator, "target_tokens": self.target_tokens, "truncated": self.truncated}
        if self.kept:
            out["kept"] = self.kept
        if self.checks:
            out["checks"] = self.checks
        if self.self_output is not None:
            out.update(self_output=self.self_output, edit_distance=self.edit_distance, fixes=self.fixes or [])
        return out


@dataclass
class ReplayRecord:
    """One text chat example for replay (`replay.jsonl`: written by `speechllm replay`, or the
    user's own old-task data; read by training as `train.replay.data`). No audio: it trains the
    LLM's text path."""
    instruction: str
    """The user turn."""
    answer: str
    """The assistant turn learned (loss on it only)."""
    id: str | None = None
    """Record id (`speechllm replay` writes one per record, which makes its output resumable)."""
    source: str | None = None
    """How the instruction came: `magpie` (the LLM wrote it) or `given` (the user's list)."""
    truncated: bool = False
    """The answer was cut at the answer length limit: learned without an end-of-turn."""
    answer_tokens: int = 0
    """Tokens of the answer as trained on (end-of-turn included)."""
    generator: dict = field(default_factory=dict)
    """Provenance: the model, its fingerprint, the system prompt, both decoding settings and seeds."""

    REQUIRED = ("instruction", "answer")

    @classmethod
    def from_json(cls, obj: Any, where: str) -> "ReplayRecord":
        obj = _require(obj, where, {"instruction": (str,), "answer": (str,)},
                       {"id": (str, int), "source": (str,), "truncated": (bool,), "answer_tokens": (int,),
                        "generator": (dict,)})
        empty = [k for k in cls.REQUIRED if not obj[k].strip()]
        if empty:
            raise RecordError(f"{where}: empty {' and '.join(empty)}")
        rid = obj.get("id")
        return cls(obj["instruction"], obj["answer"], None if rid is None else _id(rid), obj.get("source"),
                   bool(obj.get("truncated")), obj.get("answer_tokens") or 0, obj.get("generator") or {})

    def to_json(self) -> dict:
        out: dict[str, Any] = {"id": self.id} if self.id is not None else {}
        out.update(instruction=self.instruction, answer=self.answer)
        if self.source:
            out["source"] = self.source
        out.update(truncated=self.truncated, answer_tokens=self.answer_tokens)
        if self.generator:
            out["generator"] = self.generator
        return out


ANSWER_KINDS = ("label", "transcript", "free")
"""How a task item is scored: one of `labels`, word error rate, or not at all (kept for audit)."""


@dataclass
class TaskItem:
    """One audio question with its reference answer (`tasks.jsonl`, read and written by
    `speechllm eval`)."""
    id: str
    task: str
    audio: str
    instruction: str
    """The question with its answer-format line (what is asked)."""
    answer_kind: str
    """label, transcript or free (`ANSWER_KINDS`)."""
    reference: str
    labels: list[str] | None = None
    """The label set of a label item (at least two)."""
    question: str | None = None
    """The instruction without its answer-format line (the forgetting checks add a constraint)."""
    description: str | None = None
    """The clip's description (what the text reference reads)."""
    transcript: str | None = None
    """The ASR transcript the speech model is given."""
    source: str | None = None
    """Where the item came from (clip id, dataset row)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Other fields of the line, kept as they are."""

    FIELDS = ("id", "task", "audio", "source", "description", "transcript", "instruction", "question",
              "answer_kind", "reference", "labels")

    @classmethod
    def from_json(cls, obj: Any, where: str) -> "TaskItem":
        text = (str,)
        obj = _require(obj, where, {}, {"labels": (list,), "question": text, "description": text,
                                        "transcript": text, "source": text})
        missing = [k for k in ("id", "task", "audio", "instruction", "answer_kind", "reference")
                   if not isinstance(obj.get(k), str) or not obj[k].strip()]
        if missing:
            raise RecordError(f"{where}: missing or empty field(s) {', '.join(missing)}")
        if obj["answer_kind"] not in ANSWER_KINDS:
            raise RecordError(f"{where}: answer_kind '{obj['answer_kind']}' is not one of {', '.join(ANSWER_KINDS)}")
        labels = obj.get("labels")
        if obj["answer_kind"] == "label":
            if not isinstance(labels, list) or len(labels) < 2 or not all(isinstance(l, str) for l in labels):
                raise RecordError(f"{where}: a label item needs 'labels', a list of at least two strings")
            if normalize_label(obj["reference"]) not in {normalize_label(l) for l in labels}:
                raise RecordError(f"{where}: reference '{obj['reference']}' is not among labels {labels}")
        extra = {k: v for k, v in obj.items() if k not in cls.FIELDS}
        return cls(obj["id"], obj["task"], obj["audio"], obj["instruction"], obj["answer_kind"], obj["reference"],
                   labels, obj.get("question"), obj.get("description"), obj.get("transcript"), obj.get("source"),
                   extra)

    def to_json(self) -> dict:
        out = {k: getattr(self, k) for k in self.FIELDS if getattr(self, k) is not None}
        return {**out, **self.extra}
