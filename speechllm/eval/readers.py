"""Readers that turn public audio benchmarks into task items (`speechllm.records.TaskItem`).

Two sources:

* **Dynamic-SUPERB** tasks: Hugging Face datasets with the columns ``audio``, ``instruction`` and
  ``label`` (usually also ``file``), given as a ``save_to_disk`` folder or a hub name. Audio bytes
  are decoded by soundfile through :func:`annotate.pipeline.hf_items` (not by ``datasets``, whose
  decoder needs torchcodec) and written once as 16 kHz FLAC under ``out_dir/audio/<task>/``; a
  re-run finds the FLACs and does not write them again.
* **MMAU** (``mmau-test-mini.json``): a JSON list of multiple-choice questions whose ``audio_id``
  paths (``./test-mini-audios/<id>.wav``) are relative to the JSON file's folder.

Both return ``(items, errors)``: a row or entry that cannot be used becomes an error dict
``{"id", "error", "kind"}`` whose message names the dataset or file and the row or entry, and the
rest are kept. A source that cannot be read at all (missing columns, not a JSON list) raises
``ValueError`` naming it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

from ..records import TaskItem

__all__ = [
    "DYNAMIC_SUPERB_COLUMNS",
    "MMAU_ANSWER_LINE",
    "MMAU_REQUIRED",
    "format_choices",
    "read_dynamic_superb",
    "read_mmau",
]

DYNAMIC_SUPERB_COLUMNS = ("audio", "instruction", "label")
"""Columns every Dynamic-SUPERB task dataset has."""
DYNAMIC_SUPERB_ID_COLUMNS = ("id", "file")
"""Columns tried, in order, for a row id; the first whose values are unique (as file names) wins,
else rows are numbered."""
AUDIO_SUBDIR = "audio"
"""Decoded Dynamic-SUPERB audio goes to ``out_dir/AUDIO_SUBDIR/<task>/<row id>.flac``."""

MMAU_REQUIRED = ("id", "audio_id", "question", "choices", "answer", "task")
"""Fields an MMAU entry must have (``mmau-test.json`` has no ``answer``: only test-mini is usable)."""
MMAU_META = ("category", "sub-category", "difficulty", "dataset")
"""Optional MMAU fields copied into an item's ``meta`` (for per-category breakdowns)."""
MMAU_ANSWER_LINE = "Answer with one of the choices."
"""Last line of every MMAU instruction (the answer-format line)."""
CHOICE_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def _error(id_: str, error: str, kind: str) -> dict:
    return {"id": id_, "error": error, "kind": kind}


def _relative_or_absolute(path: Path, out_dir: Path | None) -> str:
    """``path`` relative to ``out_dir`` when it lies inside it, else absolute."""
    path = Path(os.path.abspath(path))
    if out_dir is not None:
        root = Path(os.path.abspath(out_dir))
        if path.is_relative_to(root):
            return path.relative_to(root).as_posix()
    return str(path)


# ----------------------------------------------------------------------------- Dynamic-SUPERB

def _task_name(spec: str) -> str:
    """Last part of a folder path or hub name: ``DynamicSuperb/SpeechDetection_LJSpeech`` ->
    ``SpeechDetection_LJSpeech``."""
    name = Path(spec.rstrip("/\\")).name or spec
    return name


def _id_column(ds) -> str | None:
    """The first of ``DYNAMIC_SUPERB_ID_COLUMNS`` whose values are non-empty and unique once made
    file names ('/' -> '_', as hf_items names the FLACs), else None (rows are numbered)."""
    for col in DYNAMIC_SUPERB_ID_COLUMNS:
        if col not in ds.column_names:
            continue
        values = [str(v).replace("/", "_") if v is not None else "" for v in ds[col]]
        if all(v.strip() for v in values) and len(set(values)) == len(values):
            return col
    return None


def _load_task(spec: str, split: str | None, task: str | None) -> tuple[Any, str | None, str]:
    """The dataset of ``spec``, its split and the task name; ``ValueError`` when it lacks a
    Dynamic-SUPERB column or the task name is unusable."""
    from annotate.pipeline import load_hf_dataset

    ds, split = load_hf_dataset(spec, split)
    missing = [c for c in DYNAMIC_SUPERB_COLUMNS if c not in ds.column_names]
    if missing:
        raise ValueError(f"{spec}: not a Dynamic-SUPERB task: no column(s) {', '.join(missing)} "
                         f"(columns: {', '.join(ds.column_names)})")
    task = task or _task_name(spec)
    if not task.strip() or ".." in Path(task).parts:
        raise ValueError(f"{spec}: unusable task name {task!r}")
    return ds, split, task


def _label_text(ds) -> Callable[[Any], str]:
    """A function giving a row's label as text ("" when absent); a ClassLabel column stores ints,
    which become their names."""
    names = getattr(ds.features["label"], "names", None)

    def as_label(value: Any) -> str:
        if value is None:
            return ""
        if names is not None and isinstance(value, int) and 0 <= value < len(names):
            return names[value]
        return str(value).strip()

    return as_label


def read_dynamic_superb(spec: str, out_dir: Path, split: str | None = None,
                        task: str | None = None) -> tuple[list[TaskItem], list[dict]]:
    """Task items of one Dynamic-SUPERB task (a ``save_to_disk`` folder or a hub name).

    Each row becomes a ``label`` item: ``instruction`` as given, ``reference`` its ``label``,
    ``labels`` the sorted distinct labels of the whole dataset, ``id`` ``<task>/<row id>`` (row id:
    the ``id`` or ``file`` column when unique, else the zero-padded row number). The audio is
    decoded once into ``out_dir/audio/<task>/<row id>.flac`` (16 kHz mono) and ``audio`` is that
    path relative to ``out_dir`` (write the tasks file into ``out_dir``). ``task`` defaults to the
    last part of ``spec``.

    Returns ``(items, errors)``; undecodable audio or an empty instruction/label makes an error
    dict for that row. Raises ``ValueError`` if the dataset lacks one of the columns ``audio``,
    ``instruction``, ``label``, or has several splits and ``split`` is not given.
    """
    from annotate.pipeline import Item, hf_items  # the one soundfile decoder shared with annotate

    out_dir = Path(out_dir)
    ds, split, task = _load_task(spec, split, task)
    as_label = _label_text(ds)
    label_set = sorted({lab for lab in (as_label(v) for v in ds["label"]) if lab})
    id_col = _id_column(ds)
    # hf_items numbers the rows itself when its id column is absent from a row; "" never is a column.
    row_ids = [str(v) for v in ds[id_col]] if id_col else [f"{i:08d}" for i in range(len(ds))]
    row_of = {rid: i for i, rid in enumerate(row_ids)}
    source = f"dynamic-superb:{spec}" + (f"[{split}]" if split else "")
    audio_dir = out_dir / AUDIO_SUBDIR / task.replace("/", "_")

    items: list[TaskItem] = []
    errors: list[dict] = []
    for entry in hf_items(spec, out_dir, audio_dir, audio_column="audio", id_column=id_col or "",
                          text_column="", split=split):
        if not isinstance(entry, Item):
            errors.append(_error(f"{task}/{entry['id']}", entry["error"], entry.get("kind", "audio")))
            continue
        i = row_of[entry.id]
        instruction = entry.labels.get("instruction")
        label = as_label(entry.labels.get("label"))
        if not isinstance(instruction, str) or not instruction.strip() or not label:
            errors.append(_error(f"{task}/{entry.id}", f"{spec}[{i}]: empty or missing instruction or label",
                                 "malformed"))
            continue
        items.append(TaskItem(id=f"{task}/{entry.id}", task=task,
                              audio=_relative_or_absolute(Path(entry.path), out_dir),
                              instruction=instruction.strip(), answer_kind="label", reference=label,
                              labels=list(label_set), source=source))
    return items, errors


# ----------------------------------------------------------------------------- MMAU

def format_choices(choices: list[str]) -> str:
    """``["x", "y"]`` -> ``"(A) x (B) y"``."""
    return " ".join(f"({CHOICE_LETTERS[i]}) {c}" for i, c in enumerate(choices))


def _check_audio(path: Path) -> str | None:
    """Why the audio file cannot be used, or None."""
    import soundfile as sf

    if not path.is_file():
        return "no such file"
    if path.stat().st_size == 0:
        return "empty file (0 bytes)"
    try:
        sf.info(str(path))
    except Exception as err:  # libsndfile raises several types for corrupt or foreign data
        return f"cannot read audio header ({err})"
    return None


def _mmau_entry(entry: Any, path: Path, root: Path, out_dir: Path | None) -> TaskItem | str:
    """One MMAU entry -> an item, or the reason it is malformed (without the file/index prefix)."""
    if not isinstance(entry, dict):
        return f"expected an object, got {type(entry).__name__}"
    missing = [k for k in MMAU_REQUIRED if k not in entry]
    if missing:
        return f"missing field(s) {', '.join(missing)}"
    for key in ("id", "audio_id", "question", "answer", "task"):
        if not isinstance(entry[key], str) or not entry[key].strip():
            return f"'{key}' must be a non-empty string"
    choices = entry["choices"]
    if not isinstance(choices, list) or not all(isinstance(c, str) and c.strip() for c in choices):
        return "'choices' must be a list of non-empty strings"
    # Some test-mini entries repeat a choice verbatim; the copies add nothing for the model and
    # would make the label set ambiguous, so only the first of each is kept (order preserved).
    distinct = list(dict.fromkeys(c.strip() for c in choices))
    if len(distinct) < 2:
        return f"needs at least 2 distinct choices, got {len(distinct)}"
    if len(distinct) > len(CHOICE_LETTERS):
        return f"more than {len(CHOICE_LETTERS)} choices"
    answer = entry["answer"].strip()
    if answer not in distinct:
        return f"answer {entry['answer']!r} is not one of the choices {choices}"
    audio = Path(entry["audio_id"])
    audio = Path(os.path.normpath(audio if audio.is_absolute() else root / audio))
    problem = _check_audio(audio)
    if problem:
        return f"audio {entry['audio_id']!r} ({audio}): {problem}"
    question = f"{entry['question'].strip()}\nChoices: {format_choices(distinct)}"
    meta = {k: entry[k] for k in MMAU_META if isinstance(entry.get(k), str)}
    return TaskItem(id=f"mmau/{entry['id'].strip()}", task=f"mmau/{entry['task'].strip()}",
                    audio=_relative_or_absolute(audio, out_dir), instruction=f"{question}\n{MMAU_ANSWER_LINE}",
                    answer_kind="label", reference=answer, labels=distinct, question=question,
                    source=f"mmau:{path.name}", extra={"meta": meta} if meta else {})


def read_mmau(path: Path, out_dir: Path | None = None) -> tuple[list[TaskItem], list[dict]]:
    """Task items of an MMAU JSON file (e.g. ``mmau-test-mini.json``).

    Each entry becomes a ``label`` item: ``id`` ``mmau/<id>``, ``task`` ``mmau/<task>`` (sound,
    music or speech), ``instruction`` the question, a ``Choices: (A) .. (B) ..`` line and
    :data:`MMAU_ANSWER_LINE`; ``question`` the same without the answer line; ``labels`` the
    distinct choices in order; ``reference`` the answer; ``meta`` (in the item's ``extra``) the
    category, sub-category, difficulty and dataset when present. ``audio`` is absolute, or relative
    to ``out_dir`` when given and the file lies inside it.

    Returns ``(items, errors)``: an entry with missing fields, an answer that is not a choice, a
    duplicate id, or a missing or unreadable audio file becomes an error naming the file and the
    entry index. Raises ``ValueError`` if the file is not JSON or its top level is not a list.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ValueError(f"{path}: cannot read the MMAU file ({err.strerror or err})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err.msg} at line {err.lineno} column {err.colno})") from None
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of MMAU entries at the top level, got {type(data).__name__}")
    root = Path(os.path.abspath(path)).parent
    items: list[TaskItem] = []
    errors: list[dict] = []
    seen: set[str] = set()
    for index, entry in enumerate(data):
        result = _mmau_entry(entry, path, root, out_dir)
        raw_id = entry.get("id") if isinstance(entry, dict) else None
        where = f"{path}: entry {index}" + (f" (id {raw_id})" if isinstance(raw_id, str) else "")
        err_id = f"mmau/{raw_id.strip()}" if isinstance(raw_id, str) and raw_id.strip() else f"{path.name}[{index}]"
        if isinstance(result, str):
            kind = "audio" if result.startswith("audio ") else "malformed"
            errors.append(_error(err_id, f"{where}: {result}", kind))
            continue
        if result.id in seen:
            errors.append(_error(f"{path.name}[{index}]", f"{where}: duplicate id '{raw_id}'", "duplicate"))
            continue
        seen.add(result.id)
        items.append(result)
    return items, errors
