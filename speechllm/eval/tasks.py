"""Audio tasks (Dynamic-SUPERB style): a generator of task items from held-out clips, label
extraction and scoring.

A task item is a `speechllm.records.TaskItem`, one JSON line of tasks.jsonl::

    {"id": "gender/synth-s0-000004", "task": "gender", "audio": "audio/synth-s0-000004.wav",
     "instruction": "Is the speaker male or female? Answer with one word: female or male.",
     "answer_kind": "label", "reference": "female", "labels": ["female", "male"],
     "description": "[00:00-00:03] \\"...\\" (Gender: Female, ...)", "transcript": "...", "source": "..."}

``audio`` is absolute or relative to the tasks file's folder. ``answer_kind`` is ``label`` (one
of ``labels``), ``transcript`` (scored by WER) or ``free`` (kept for audit, not scored).
``question`` (optional) is the instruction without its answer-format line; the forgetting
checks add their format constraint to it. ``description`` (what the text reference reads) and
``transcript`` (the ASR text the speech model gets) come from annotation; items without them are
annotated by the eval run.

Label extraction from a free-text answer:

* **strict**: after lower-casing and stripping surrounding whitespace, quotes and punctuation,
  the answer *is* one label (or, for lettered choices, its letter: ``B``, ``(B)``, ``B.``);
* **lenient**: the labels (and a few synonyms, e.g. "woman" for female) that occur in the answer
  as whole words; one distinct label -> that label; several -> the one mentioned first; every
  label word of the set itself (the options echoed back, "male or female") -> none.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from ..errors import SpeechLLMError
from ..labels import ATTRIBUTES, NOT_ATTRIBUTES, generic
from ..labels import normalize_label as _norm
from ..records import ANSWER_KINDS, MetadataRecord, TaskItem

__all__ = ["ANSWER_KINDS", "ATTRIBUTE_TASKS", "MAX_GENERIC_LABELS", "SYNONYMS", "TRANSCRIPTION", "TaskError",
           "TaskSpec", "extract_lenient", "extract_strict", "label_instruction", "normalize_transcript",
           "score_item", "tasks_from_metadata", "transcript_errors"]


@dataclass(frozen=True)
class TaskSpec:
    """A task built from one attribute of a clip."""
    name: str
    """The task's name (the attribute's key, or `transcription`)."""
    instruction: str
    """Question; for label tasks the label list is appended by :func:`label_instruction`."""
    labels: tuple[str, ...] = ()
    """The label set in a natural order (empty: taken from the data)."""
    answer_kind: str = "label"
    """How its items are scored (`ANSWER_KINDS`)."""


ATTRIBUTE_TASKS: dict[str, TaskSpec] = {a.name: TaskSpec(a.name, a.question, a.values)
                                         for a in ATTRIBUTES.values()}
"""One task per attribute of the table (`speechllm.labels`), in its order."""
TRANSCRIPTION = TaskSpec("transcription", "Transcribe the speech exactly, word for word.", (), "transcript")

MAX_GENERIC_LABELS = 12
"""A generic label column becomes a task only with 2..this many distinct values."""

SYNONYMS: dict[str, tuple[str, ...]] = {value: words for a in ATTRIBUTES.values()
                                        for value, words in a.synonyms.items()}
"""Words that count as a label in lenient extraction (only when the label is in the item's set)."""


class TaskError(SpeechLLMError, ValueError):
    """Task items that cannot be made (e.g. a task asked for that the data has no values for)."""


def label_instruction(question: str, labels: list[str]) -> str:
    """The question with its answer-format line listing the labels."""
    if len(labels) == 2:
        options = f"{labels[0]} or {labels[1]}"
    else:
        options = ", ".join(labels[:-1]) + f" or {labels[-1]}"
    return f"{question} Answer with one word: {options}."


# ----------------------------------------------------------------------------- generator

def _task_specs(records: list[MetadataRecord], tasks: list[str] | None) -> list[TaskSpec]:
    """The tasks the records have data for: the table's attributes in its order, then other label
    columns by name, then transcription; restricted to `tasks` when given."""
    keys: dict[str, TaskSpec] = {}
    for rec in records:
        for key, value in rec.labels.items():
            if key in NOT_ATTRIBUTES or not isinstance(value, str):
                continue
            keys.setdefault(key, ATTRIBUTE_TASKS.get(key) or TaskSpec(key, generic(key).question))
        for key in rec.annotations:
            if key in ATTRIBUTE_TASKS and ATTRIBUTE_TASKS[key].labels:
                keys.setdefault(key, ATTRIBUTE_TASKS[key])
    specs = [keys[k] for k in ATTRIBUTE_TASKS if k in keys] + [keys[k] for k in sorted(keys)
                                                                if k not in ATTRIBUTE_TASKS]
    specs.append(TRANSCRIPTION)
    if tasks is not None:
        unknown = set(tasks) - {s.name for s in specs}
        if unknown:
            raise TaskError(f"no data for task(s) {', '.join(sorted(unknown))}; available: "
                            f"{', '.join(s.name for s in specs)}")
        specs = [s for s in specs if s.name in tasks]
    return specs


def _spec_items(spec: TaskSpec, records: list[MetadataRecord], max_per_task: int | None,
                seed: int) -> list[TaskItem]:
    """The items of one task: every record with a value for it (a seeded sample when capped);
    none for a label task with fewer than 2 or more than `MAX_GENERIC_LABELS` distinct values."""
    pairs = [(rec, rec.transcript if spec.answer_kind == "transcript" else rec.value(spec.name)) for rec in records]
    pairs = [(rec, v) for rec, v in pairs if v is not None]
    labels: list[str] | None = None
    if spec.answer_kind == "label":
        seen = sorted({v.lower() for _, v in pairs})
        labels = [l for l in spec.labels if l in seen] if spec.labels else seen
        labels += [l for l in seen if l not in labels]
        if not 2 <= len(labels) <= MAX_GENERIC_LABELS:
            return []
    if max_per_task is not None and len(pairs) > max_per_task:
        keep = set(random.Random(f"{seed}/{spec.name}").sample(range(len(pairs)), max_per_task))
        pairs = [p for i, p in enumerate(pairs) if i in keep]
    items = []
    for rec, value in pairs:
        item = TaskItem(id=f"{spec.name}/{rec.id}", task=spec.name, audio=rec.audio, instruction=spec.instruction,
                        answer_kind=spec.answer_kind, reference=value, source=f"clip:{rec.id}",
                        description=rec.description or None, transcript=rec.asr_transcript)
        if labels is not None:
            item.instruction, item.question = label_instruction(spec.instruction, labels), spec.instruction
            item.reference, item.labels = value.lower(), list(labels)
        items.append(item)
    return items


def tasks_from_metadata(records: list[MetadataRecord], tasks: list[str] | None = None,
                        max_per_task: int | None = None, seed: int = 0) -> list[TaskItem]:
    """Task items from annotated (and possibly labelled) clips, e.g. a held-out `metadata.jsonl`.

    One task per attribute with a known question (gender, pitch, speed, volume, noise, emotion,
    age, accent), one per other label column with 2..12 distinct string values, and transcription
    (reference: the label transcript, else the ASR transcript). Each item's `transcript` is the
    clip's ASR transcript (what the speech model hears). `tasks` restricts the set by name;
    `max_per_task` keeps a seeded sample per task. Audio paths stay as the records give them.
    """
    if not records:
        return []
    return [item for spec in _task_specs(records, tasks) for item in _spec_items(spec, records, max_per_task, seed)]


# ----------------------------------------------------------------------------- extraction

_LETTER = re.compile(r"^\(?([a-z])\)?[.:]?$")
"""A lettered-choice answer: ``B``, ``(B)``, ``B.``, ``b:`` (after `normalize_label`)."""


def _lettered(instruction: str, labels: list[str]) -> bool:
    return bool(labels) and f"(A) {labels[0]}".lower() in instruction.lower()


def extract_strict(answer: str, labels: list[str], instruction: str = "") -> str | None:
    """The label the answer is, exactly (case, surrounding quotes/punctuation ignored), else None."""
    norm = _norm(answer)
    for label in labels:
        if norm == _norm(label):
            return label
    m = _LETTER.match(norm) if _lettered(instruction, labels) else None
    if m and ord(m.group(1)) - ord("a") < len(labels):
        return labels[ord(m.group(1)) - ord("a")]
    return None


def extract_lenient(answer: str, labels: list[str], instruction: str = "") -> str | None:
    """The label mentioned in the answer: exact answers first (as strict), then whole-word
    mentions of labels or their synonyms; several distinct labels -> the first mentioned; every
    label word itself (the options repeated) -> None."""
    strict = extract_strict(answer, labels, instruction)
    if strict is not None:
        return strict
    text = " " + re.sub(r"\s+", " ", answer.lower()) + " "
    first: dict[str, int] = {}
    literal: set[str] = set()
    for label in labels:
        for word in (label.lower(), *SYNONYMS.get(label.lower(), ())):
            m = re.search(r"(?<![\w-])" + re.escape(word) + r"(?![\w-])", text)
            if m:
                first[label] = min(first.get(label, m.start()), m.start())
                literal |= {label} if word == label.lower() else set()
    if not first or (len(labels) > 1 and len(literal) == len(labels)):  # nothing, or the options echoed back
        return None
    return min(first, key=first.get)


# ----------------------------------------------------------------------------- scoring

def normalize_transcript(text: str) -> str:
    """`text` after Whisper's English normalisation (the one the annotate stage evaluates with)."""
    from annotate.evaluate import normalize_text

    return normalize_text(text)


def transcript_errors(hypothesis: str, reference: str) -> tuple[int, int]:
    """(word errors, reference words) after Whisper's English normalisation; an empty reference
    counts each hypothesis word as an insertion."""
    import jiwer

    ref, hyp = normalize_transcript(reference), normalize_transcript(hypothesis)
    if not ref.split():
        return len(hyp.split()), 0
    if not hyp.split():
        return len(ref.split()), len(ref.split())
    out = jiwer.process_words(ref, hyp)
    return out.substitutions + out.deletions + out.insertions, len(ref.split())


def score_item(item: TaskItem, answer: str) -> dict:
    """Per-item score: label items -> strict/lenient extraction and correctness; transcript
    items -> word errors and reference words; free items -> nothing."""
    if item.answer_kind == "label":
        labels = item.labels or []
        s = extract_strict(answer, labels, item.instruction)
        l = extract_lenient(answer, labels, item.instruction)
        ref = _norm(item.reference)
        return {"strict": s, "lenient": l, "correct_strict": s is not None and _norm(s) == ref,
                "correct": l is not None and _norm(l) == ref}
    if item.answer_kind == "transcript":
        errors, words = transcript_errors(answer, item.reference)
        return {"errors": errors, "words": words}
    return {}
