"""What the evaluation asks: task items read from every supported data format, the forgetting
items drawn from them, the text prompts, and the `EvalSet` that holds them all with the audio.

Data formats (`DATA_FORMATS`, `EvalConfig.data_format`):

* ``tasks``: our tasks.jsonl (`speechllm.records.TaskItem` per line; a bad line becomes an error
  record naming file:line and the rest are kept);
* ``metadata``: annotated clips (`speechllm.records.MetadataRecord` per line), turned into tasks
  by `tasks.tasks_from_metadata` (a bad line is an `EvalError` naming file:line);
* ``dynamic-superb`` and ``mmau``: public benchmarks, through `readers`;
* ``auto``: told apart by the path (a folder is Dynamic-SUPERB, ``.json`` is MMAU) or the first
  record's fields.

Every item's audio path is rebased to be relative to the output folder (absolute when it cannot
be). Items without a description or transcript are annotated once per clip
(`annotate_missing`).
"""

from __future__ import annotations

import hashlib
import os
import random
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..config import AnnotateConfig, EvalConfig
from ..errors import SpeechLLMError
from ..io.jsonl import iter_lines, sibling_path, write_jsonl_atomic
from ..records import MAX_INSTRUCTION_CHARS, MetadataRecord, RecordError, TaskItem
from .constraints import CONSTRAINTS, Constraint, sample_constraint
from .tasks import sample_per_task, tasks_from_metadata

if TYPE_CHECKING:
    from .ifeval import IFEvalSet

DATA_FORMATS: tuple[str, ...] = typing.get_args(typing.get_type_hints(EvalConfig)["data_format"])
"""The values of `EvalConfig.data_format`, ``auto`` first."""
TASKS_FILE = "tasks.jsonl"
"""The usable task items, written into the output folder (audio relative to it)."""
FORGETTING_FILE = "forgetting.jsonl"
"""The forgetting items, written into the output folder."""
ANNOTATIONS_FILE = "annotations.jsonl"
"""Descriptions made for clips that came without one (resumable)."""
FORGETTING_KINDS = ("label", "transcript")
"""Answer kinds whose items get a forgetting item (free items are not scored)."""
MAX_AUDIO_SECONDS = 30.0
"""Longest clip loaded (Whisper's window)."""
CLIP_ID_CHARS = 16
"""Hex digits of the audio path's hash that name a clip in annotations.jsonl."""


class EvalError(SpeechLLMError, RuntimeError):
    """The evaluation cannot run (bad data, no usable items, clashing checkpoints)."""


def _error(id_: str, kind: str, error: str) -> dict:
    """An error record of tasks.errors.jsonl."""
    return {"id": id_, "kind": kind, "error": error}


# ----------------------------------------------------------------------------- reading

def detect_format(data: Path) -> str:
    """The data format of `data` (see the module docstring); EvalError when it cannot be told."""
    if data.is_dir():
        return "dynamic-superb"
    if data.suffix == ".json":
        return "mmau"
    for line in iter_lines(data):
        if line.record is None:
            continue
        if "answer_kind" in line.record:
            return "tasks"
        if "annotations" in line.record or "description" in line.record:
            return "metadata"
        break
    raise EvalError(f"{data}: cannot tell the data format from its first record; pass --data-format "
                    f"({', '.join(DATA_FORMATS[1:])})")


def rebase(items: list[TaskItem], base: Path, out: Path) -> list[TaskItem]:
    """Make each item's audio path (relative to `base`, or absolute) relative to `out`; absolute
    when that is impossible. Changes the items in place and returns them."""
    for it in items:
        path = Path(it.audio)
        path = path if path.is_absolute() else base / path
        try:
            it.audio = os.path.relpath(path.resolve(), out.resolve())
        except ValueError:
            it.audio = str(path.resolve())
    return items


def read_task_file(path: Path) -> tuple[list[TaskItem], list[dict]]:
    """The items of a tasks.jsonl; a malformed line becomes an error record naming file:line."""
    items, errors = [], []
    for line in iter_lines(path):
        where = f"{path}:{line.number}"
        if line.record is None:
            errors.append(_error(f"line-{line.number}", "malformed", line.error))
            continue
        try:
            items.append(TaskItem.from_json(line.record, where))
        except RecordError as err:
            errors.append(_error(str(line.record.get("id", f"line-{line.number}")), "malformed", str(err)))
    return items, errors


def read_metadata(path: Path) -> list[MetadataRecord]:
    """The clips of a metadata.jsonl; a malformed line is an EvalError naming file:line."""
    records = []
    for line in iter_lines(path):
        if line.record is None:
            raise EvalError(line.error)
        try:
            records.append(MetadataRecord.from_json(line.record, f"{path}:{line.number}"))
        except RecordError as err:
            raise EvalError(str(err)) from None
    return records


def _read_format(fmt: str, data: Path, out: Path, cfg: EvalConfig) -> tuple[list[TaskItem], list[dict]]:
    """The items of `data` read as `fmt` (audio relative to `out`), with the error records."""
    if fmt == "tasks":
        items, errors = read_task_file(data)
        return rebase(items, data.parent, out), errors
    if fmt == "metadata":
        items = tasks_from_metadata(read_metadata(data), cfg.tasks, cfg.max_per_task, cfg.seed, cfg.vary_phrasing)
        return rebase(items, data.parent, out), []
    if fmt == "dynamic-superb":
        from .readers import read_dynamic_superb

        items, errors = read_dynamic_superb(str(data), out, split=cfg.split)
        return rebase(items, out, out), errors
    if fmt == "mmau":
        from .readers import read_mmau

        items, errors = read_mmau(data)
        return rebase(items, data.parent, out), errors
    raise EvalError(f"--data-format '{fmt}' is not one of {', '.join(DATA_FORMATS)}")


def _unique(items: list[TaskItem], errors: list[dict], data: Path) -> list[TaskItem]:
    """The items with an id not seen before; each repeat becomes an error record."""
    seen: set[str] = set()
    unique = []
    for it in items:
        if it.id in seen:
            errors.append(_error(it.id, "duplicate", f"{data}: id '{it.id}' repeats"))
            continue
        seen.add(it.id)
        unique.append(it)
    return unique


def _select(items: list[TaskItem], cfg: EvalConfig) -> list[TaskItem]:
    """The items of `cfg.tasks` only, at most `cfg.max_per_task` per task (`tasks.sample_per_task`)."""
    if cfg.tasks is not None:
        items = [it for it in items if it.task in cfg.tasks]
    return sample_per_task(items, cfg.max_per_task, cfg.seed)


def read_items(data: Path, out: Path, cfg: EvalConfig) -> tuple[list[TaskItem], list[dict]]:
    """Task items from any supported format, audio relative to `out`, restricted as `cfg` asks;
    plus error records (malformed lines, repeated ids, rows a reader could not use)."""
    fmt = cfg.data_format if cfg.data_format != "auto" else detect_format(data)
    items, errors = _read_format(fmt, data, out, cfg)
    if fmt == "metadata":  # made from the clips: ids are unique, the selection is already applied
        return items, errors
    return _select(_unique(items, errors, data), cfg), errors


# ----------------------------------------------------------------------------- annotation

def _clip_id(audio: str) -> str:
    """The id under which a clip's annotation is stored (a hash of its audio path)."""
    return hashlib.sha1(audio.encode()).hexdigest()[:CLIP_ID_CHARS]


def _annotated(path: Path) -> dict[str, MetadataRecord]:
    """The records of an annotations file by clip id (lines that do not fit are skipped)."""
    made = {}
    for line in iter_lines(path):
        if line.record is None:
            continue
        try:
            rec = MetadataRecord.from_json(line.record, f"{path}:{line.number}")
        except RecordError:
            continue
        made[rec.id] = rec
    return made


def annotate_missing(items: list[TaskItem], out: Path, asr_model: str, progress: bool) -> None:
    """Give items without a description/transcript those of their clip, annotated once per clip
    into out/annotations.jsonl (resumable). A field the item has is kept."""
    from annotate.pipeline import Item, run

    need = [it for it in items if not it.description or it.transcript is None]
    if not need:
        return
    clips: dict[str, Item] = {}
    for it in need:
        cid = _clip_id(it.audio)
        clips.setdefault(cid, Item(cid, it.audio, str((out / it.audio).resolve()), {}))
    path = out / ANNOTATIONS_FILE
    summary = run(iter(clips.values()), path, AnnotateConfig(asr_model=asr_model, workers=1), progress=progress)
    if summary.annotated:
        print(summary.line(path), file=sys.stderr)
    made = _annotated(path)
    for it in need:
        rec = made.get(_clip_id(it.audio))
        if rec is None:
            continue
        if it.description is None:
            it.description = rec.description
        if it.transcript is None:
            it.transcript = rec.asr_transcript


# ----------------------------------------------------------------------------- forgetting items

@dataclass
class ForgettingItem:
    """A task item's question plus one format constraint (one line of forgetting.jsonl)."""
    id: str
    """Same as its task item's id."""
    base: str
    """The id of the task item whose clip is heard."""
    task: str
    """The task item's task."""
    instruction: str
    """The task's question followed by the constraint's instruction."""
    constraint: Constraint
    """The format the answer must follow."""

    def to_json(self) -> dict:
        """The line of forgetting.jsonl."""
        return {"id": self.id, "base": self.base, "task": self.task, "instruction": self.instruction,
                "constraint": self.constraint.to_dict()}


def forgetting_items(items: list[TaskItem], cfg: EvalConfig) -> list[ForgettingItem]:
    """One Speech-IFEval item per scored task item (seeded sample when capped; same id as its task
    item): the task's question plus one format constraint; kinds are dealt round-robin over a
    seeded order so each kind gets about the same share."""
    kinds = list(cfg.constraints or CONSTRAINTS)
    unknown = [k for k in kinds if k not in CONSTRAINTS]
    if unknown:
        raise EvalError(f"unknown constraint kind(s) {', '.join(unknown)}; known: {', '.join(CONSTRAINTS)}")
    pool = [it for it in items if it.answer_kind in FORGETTING_KINDS]
    random.Random(f"{cfg.seed}/forgetting").shuffle(pool)
    if cfg.forgetting_items is not None:
        pool = pool[: cfg.forgetting_items]
    out = []
    for i, it in enumerate(pool):
        c = sample_constraint(kinds[i % len(kinds)], random.Random(f"{cfg.seed}/{it.id}"))
        out.append(ForgettingItem(it.id, it.id, it.task, f"{it.question or it.instruction} {c.instruction()}", c))
    return sorted(out, key=lambda f: f.id)


def text_prompts(cfg: EvalConfig) -> "IFEvalSet | None":
    """The text-only prompt set the config asks for (None when `text_prompts` is 0): every prompt,
    or a seeded sample of `text_prompts` of them."""
    if cfg.text_prompts == 0:
        return None
    from .ifeval import builtin_prompts, load_ifeval, load_text_ifeval, subset

    loaders = {"auto": lambda: load_text_ifeval(allow_builtin=True), "ifeval": load_ifeval,
               "builtin": builtin_prompts}
    if cfg.text_prompt_set not in loaders:
        raise EvalError(f"text prompt set '{cfg.text_prompt_set}' is not one of {', '.join(loaders)}")
    return subset(loaders[cfg.text_prompt_set](), cfg.text_prompts, cfg.seed)


# ----------------------------------------------------------------------------- the set

@dataclass
class EvalSet:
    """What every checkpoint is asked, by key: `task:<id>` (audio task items), `if:<id>` (the
    forgetting items) and `text:<key>` (text prompts, no audio); with each clip's waveform."""

    items: list[TaskItem]
    """Usable audio task items (each with a description and readable audio)."""
    fitems: list[ForgettingItem]
    """Forgetting items: a task item's question plus one format constraint."""
    text_set: "IFEvalSet | None"
    """The text-only prompt set, None when skipped."""
    audio: dict[str, np.ndarray]
    """Item audio path -> 16 kHz waveform."""
    left_out: int
    """Items left out (see tasks.errors.jsonl)."""
    by_id: dict[str, TaskItem] = field(init=False, repr=False)
    """Task items by id."""
    fitems_by_id: dict[str, ForgettingItem] = field(init=False, repr=False)
    """Forgetting items by id."""
    text_by_key: dict = field(init=False, repr=False)
    """Text prompts by their key."""
    task_keys: list[str] = field(init=False, repr=False)
    """`task:<id>` of every task item, in order."""
    if_keys: list[str] = field(init=False, repr=False)
    """`if:<id>` of every forgetting item, in order."""
    text_keys: list[str] = field(init=False, repr=False)
    """`text:<key>` of every text prompt, in order."""

    def __post_init__(self):
        self.by_id = {it.id: it for it in self.items}
        self.fitems_by_id = {f.id: f for f in self.fitems}
        self.text_by_key = {p[0]: p for p in (self.text_set.prompts if self.text_set else [])}
        self.task_keys = [f"task:{it.id}" for it in self.items]
        self.if_keys = [f"if:{f.id}" for f in self.fitems]
        self.text_keys = [f"text:{k}" for k in self.text_by_key]

    @property
    def groups(self) -> tuple[tuple[list[str], str], ...]:
        """The keys in the order they are answered, each group with its progress-bar label."""
        return (self.task_keys, "audio tasks"), (self.if_keys, "forgetting"), (self.text_keys, "text prompts")

    @property
    def tasks(self) -> list[str]:
        """The task names, sorted."""
        return sorted({it.task for it in self.items})

    def instruction(self, key: str) -> str:
        """What a key asks."""
        kind, _, id_ = key.partition(":")
        if kind == "task":
            return self.by_id[id_].instruction
        if kind == "if":
            return self.fitems_by_id[id_].instruction
        return self.text_by_key[id_][1]

    def asked(self, key: str) -> str:
        """Everything a key puts to a system (instruction, and for an audio item its clip,
        transcript and description): what the answer caches check a saved answer against."""
        item = self.item(key)
        parts = [self.instruction(key)]
        if item is not None:
            parts += [item.audio, item.transcript or "", item.description or ""]
        return "\x1f".join(parts)

    def item(self, key: str) -> TaskItem | None:
        """The audio task item a key asks about (None for a text prompt)."""
        kind, _, id_ = key.partition(":")
        if kind == "task":
            return self.by_id[id_]
        if kind == "if":
            return self.by_id[self.fitems_by_id[id_].base]
        return None


def _with_audio(items: list[TaskItem], out: Path, errors: list[dict]) -> tuple[list[TaskItem], dict]:
    """The items that have a description and readable audio, with the waveforms by audio path;
    each other item becomes an error record."""
    from ..io.audio import AudioError, load_audio

    audio: dict[str, np.ndarray] = {}
    usable = []
    for it in items:
        longest = max(len(it.instruction), len(it.question or ""))
        if longest > MAX_INSTRUCTION_CHARS:
            errors.append(_error(it.id, "instruction", f"the instruction has {longest} characters; at most "
                                 f"{MAX_INSTRUCTION_CHARS}"))
            continue
        if not it.description:
            errors.append(_error(it.id, "annotation", f"{it.audio}: no description (annotation failed; see "
                                 f"{sibling_path(out / ANNOTATIONS_FILE, '.errors.jsonl').name})"))
            continue
        if it.audio not in audio:
            try:
                audio[it.audio] = load_audio(out / it.audio, max_seconds=MAX_AUDIO_SECONDS)
            except AudioError as err:
                errors.append(_error(it.id, "audio", str(err)))
                continue
        usable.append(it)
    return usable, audio


def load_eval_set(data: Path, out: Path, cfg: EvalConfig, asr_model: str, progress: bool = True) -> EvalSet:
    """Read the items, annotate those without a description, load their audio, draw the forgetting
    items and the text prompts; writes tasks.jsonl, tasks.errors.jsonl and forgetting.jsonl."""
    items, errors = read_items(data, out, cfg)
    annotate_missing(items, out, asr_model, progress)
    usable, audio = _with_audio(items, out, errors)
    errors_path = sibling_path(out / TASKS_FILE, ".errors.jsonl")
    write_jsonl_atomic(out / TASKS_FILE, [it.to_json() for it in usable])
    write_jsonl_atomic(errors_path, errors)
    if not usable:
        raise EvalError(f"{data}: no usable task items ({len(errors)} errors, see {errors_path})")
    fitems = forgetting_items(usable, cfg)
    write_jsonl_atomic(out / FORGETTING_FILE, [f.to_json() for f in fitems])
    es = EvalSet(usable, fitems, text_prompts(cfg), audio, len(errors))
    print(f"[speechllm] eval: {len(es.items)} task items in {len(es.tasks)} tasks, {len(es.fitems)} forgetting "
          f"items, {len(es.text_by_key)} text prompts, {es.left_out} left out", file=sys.stderr)
    return es
