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

import hashlib
import random
import re
from dataclasses import dataclass

from ..errors import SpeechLLMError
from ..labels import (ATTRIBUTES, NOT_ATTRIBUTES, SYNONYMS, extract_lenient, extract_strict, generic,
                      label_instruction)
from ..labels import normalize_label as _norm
from ..records import ANSWER_KINDS, MetadataRecord, TaskItem

__all__ = ["ANSWER_KINDS", "ATTRIBUTE_TASKS", "MAX_GENERIC_LABELS", "SYNONYMS", "TRANSCRIPTION", "TaskError",
           "TaskSpec", "extract_lenient", "extract_strict", "label_instruction", "normalize_transcript",
           "sample_per_task", "score_item", "tasks_from_metadata", "transcript_errors", "transcript_span", "contains_transcript"]


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
    phrasings: tuple[str, ...] = ()
    """Other ways to ask `instruction`; an item draws one (seeded), when phrasing varies."""


ATTRIBUTE_TASKS: dict[str, TaskSpec] = {a.name: TaskSpec(a.name, a.question, a.values, "label", a.phrasings)
                                         for a in ATTRIBUTES.values()}
"""One task per attribute of the table (`speechllm.labels`), in its order."""
TRANSCRIPTION = TaskSpec("transcription", "Transcribe the speech exactly, word for word.", (), "transcript",
                         ("Transcribe the speech exactly, word for word.",
                          "What are the exact words spoken in the recording?",
                          "Write down word for word what the speaker says."))

MAX_GENERIC_LABELS = 12
"""A generic label column becomes a task only with 2..this many distinct values."""



class TaskError(SpeechLLMError, ValueError):
    """Task items that cannot be made (e.g. a task asked for that the data has no values for)."""


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


def _asked(spec: TaskSpec, labels: list[str] | None, item_id: str, seed: int, vary: bool) -> tuple[str, str]:
    """(instruction, question) of one item: with `vary`, a phrasing of the task's question and
    an order of the options drawn for the item (seeded), so that an answerer that always says the
    same word, or the first option, scores at chance; else the task's first phrasing and the
    labels in their natural order."""
    question = spec.instruction
    order = list(labels or [])
    if vary:
        rng = random.Random(f"{seed}/{item_id}/asked")
        question = rng.choice(spec.phrasings or (spec.instruction,))
        rng.shuffle(order)
    return (label_instruction(question, order) if labels else question), question


def _spec_items(spec: TaskSpec, records: list[MetadataRecord], seed: int, vary: bool = True) -> list[TaskItem]:
    """The items of one task: every record with a value for it; none for a label task with
    fewer than 2 or more than `MAX_GENERIC_LABELS` distinct values."""
    pairs = [(rec, rec.transcript if spec.answer_kind == "transcript" else rec.value(spec.name)) for rec in records]
    pairs = [(rec, v) for rec, v in pairs if v is not None]
    labels: list[str] | None = None
    if spec.answer_kind == "label":
        seen = sorted({v.lower() for _, v in pairs})
        labels = [l for l in spec.labels if l in seen] if spec.labels else seen
        labels += [l for l in seen if l not in labels]
        if not 2 <= len(labels) <= MAX_GENERIC_LABELS:
            return []
    items = []
    for rec, value in pairs:
        item_id = f"{spec.name}/{rec.id}"
        instruction, question = _asked(spec, labels, item_id, seed, vary)
        item = TaskItem(id=item_id, task=spec.name, audio=rec.audio, instruction=instruction,
                        answer_kind=spec.answer_kind, reference=value, source=f"clip:{rec.id}",
                        description=rec.description or None, transcript=rec.asr_transcript)
        if labels is not None:
            item.question, item.reference, item.labels = question, value.lower(), list(labels)
        items.append(item)
    return items


def tasks_from_metadata(records: list[MetadataRecord], tasks: list[str] | None = None,
                        max_per_task: int | None = None, seed: int = 0, vary: bool = True) -> list[TaskItem]:
    """Task items from annotated (and possibly labelled) clips, e.g. a held-out `metadata.jsonl`.

    One task per attribute with a known question (gender, pitch, speed, volume, noise, emotion,
    age, accent), one per other label column with 2..12 distinct string values, and transcription
    (reference: the label transcript, else the ASR transcript). Each item's `transcript` is the
    clip's ASR transcript (what the speech model hears). `tasks` restricts the set by name;
    `max_per_task` keeps a seeded, stratified sample per task (`sample_per_task`); `vary` draws
    each item's phrasing and option order (`_asked`). Audio paths stay as the records give them.
    """
    if not records:
        return []
    items = [item for spec in _task_specs(records, tasks) for item in _spec_items(spec, records, seed, vary)]
    return sample_per_task(items, max_per_task, seed)


def _rank(seed: int, key: str) -> bytes:
    """A seeded position for `key` that does not depend on where it sits in a file."""
    return hashlib.sha256(f"{seed}/{key}".encode()).digest()


def _seats(counts: dict[str, int], cap: int) -> dict[str, int]:
    """How many of `cap` places each class gets: one each while the cap allows (rarest classes
    first when it does not), the rest one at a time to the class furthest below its share."""
    total = sum(counts.values())
    seats = dict.fromkeys(counts, 0)
    for label in sorted(counts, key=lambda c: (counts[c], c))[:cap]:
        seats[label] = 1
    for _ in range(cap - sum(seats.values())):
        open_ = [c for c in counts if seats[c] < counts[c]]
        seats[max(open_, key=lambda c: (counts[c] * cap / total - seats[c], counts[c], c))] += 1
    return seats


def sample_per_task(items: list[TaskItem], max_per_task: int | None, seed: int = 0) -> list[TaskItem]:
    """At most `max_per_task` items of each task, in their given order: a seeded sample that is
    the same whatever order the items come in, and for a label task stratified by reference
    (every class present while the cap allows, the rest in proportion to the class sizes), so a
    small cap never leaves a class out and the majority baseline means something."""
    if max_per_task is None:
        return items
    by_task: dict[str, list[TaskItem]] = {}
    for it in items:
        by_task.setdefault(it.task, []).append(it)
    keep: set[str] = set()
    for task, group in by_task.items():
        if len(group) <= max_per_task:
            keep.update(it.id for it in group)
            continue
        classes: dict[str, list[TaskItem]] = {}
        for it in group:
            classes.setdefault(it.reference if it.labels else "", []).append(it)
        seats = _seats({c: len(members) for c, members in classes.items()}, max_per_task)
        for label, members in classes.items():
            keep.update(it.id for it in sorted(members, key=lambda it: _rank(seed, it.id))[:seats[label]])
    return [it for it in items if it.id in keep]


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


_QUOTED = re.compile(r"[\"“]([^\"“”]+)[\"”]")
"""A quoted span: "..." or “...”."""
_SAID = re.compile(r"\b(?:said|says|say|saying|transcript|transcription)\s*:\s*(.+)$", re.IGNORECASE | re.DOTALL)
"""The text after `said:`, `transcription:` and the like."""


def _closest_window(words: list[str], ref: list[str]) -> list[str]:
    """The contiguous run of `words` with the fewest word errors against `ref` (the shortest of
    equally close runs: a word that matches nothing is no evidence): one edit-distance pass per
    start, every end at once."""
    best: tuple[int, int, int, int] = (len(ref), 0, 0, 0)  # (errors, length, start, end): the empty run
    for start in range(len(words)):
        row = list(range(len(ref) + 1))  # distance of ref[:i] to words[start:start]
        for end in range(start, len(words)):
            new = [row[0] + 1]
            for i, r in enumerate(ref, 1):
                new.append(min(new[i - 1] + 1, row[i] + 1, row[i - 1] + (r != words[end])))
            row = new
            best = min(best, (row[-1], end + 1 - start, start, end + 1))
    return words[best[2]: best[3]]


def transcript_span(answer: str, reference: str) -> str:
    """The part of an answer that gives the words spoken: the longest quoted span, else what
    follows "said:" (or "transcription:"), else the run of the answer's words closest to the
    reference (an answer that wraps the transcript in a sentence is scored on the transcript)."""
    quoted = [q.strip() for q in _QUOTED.findall(answer) if q.strip()]
    if quoted:
        return max(quoted, key=len)
    said = _SAID.search(answer)
    if said and said.group(1).strip():
        return said.group(1).strip()
    return " ".join(_closest_window(normalize_transcript(answer).split(), normalize_transcript(reference).split()))


def contains_transcript(answer: str, reference: str) -> bool:
    """Whether the answer holds the reference's words in order, contiguously (after Whisper's
    English normalisation)."""
    ref = normalize_transcript(reference).split()
    return bool(ref) and f" {' '.join(ref)} " in f" {normalize_transcript(answer)} "


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
        span = transcript_span(answer, item.reference)
        errors, words = transcript_errors(span, item.reference)
        return {"span": span, "errors": errors, "words": words,
                "answer_errors": transcript_errors(answer, item.reference)[0],
                "contains": contains_transcript(answer, item.reference)}
    return {}
