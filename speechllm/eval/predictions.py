"""Per-item predictions and scores of every benchmark the evaluation reads, in one JSONL shape.

One line per (system, item), so a run can be audited and two runs diffed line by line.

Written by ``speechllm eval``, ``speechllm speech-ifeval`` and ``speechllm ifeval`` (beside
Google's own ``eval_results_*.jsonl``) as ``predictions.jsonl`` in the output folder::

    {"benchmark": "mmau", "system": "self-output", "key": "task:mmau/abc", "task": "mmau/speech",
     "instruction": "...", "prediction": "(B) a man", "target": "a man",
     "score": {"correct": true, "correct_strict": false, "lenient": "a man", "strict": null}}

Fields:

* ``benchmark``: where the item comes from: ``tasks`` (our tasks.jsonl or metadata-made items),
  ``mmau``, ``dynamic-superb``, ``forgetting`` (a task question + one format constraint),
  ``ifeval`` (Google's prompts, text only), ``ifeval-builtin`` (our fallback prompts),
  ``speech-ifeval`` (Speech-IFEval's closed-ended and creative-writing items), ``safety`` (a
  harmful request, ``task`` ``spoken`` or ``text``; see ``speechllm.eval.safety``);
* ``system``: a checkpoint's name, or the reference's (``reference-<hash>``: the base LLM reading
  the description);
* ``key``: the item's key in the answer cache (``task:ID``, ``if:ID``, ``text:KEY``, ``sif:ID``;
  safety: ``spoken:<audio file stem>``, ``text:<request id>``);
* ``task``: the task or subset (``gender``, ``mmau/speech``, ``closed``, ``creative``...) or null;
* ``instruction``: what was asked (safety: the request, also when it was heard); ``prediction``:
  the system's answer, as generated;
* ``target``: the gold answer (label, transcript) or null where there is none (instruction
  following);
* ``score``: how the answer scored:
  label tasks ``{"correct", "correct_strict", "lenient", "strict"}``; transcription
  ``{"span", "errors", "words", "contains", "answer_errors"}``; safety ``{"refusal", "pattern"}``
  (the refusal pattern that matched, null when none did); instruction following
  ``{"instruction_id_list", "follow_instruction_list", "follow_all_instructions"}`` (strict, the
  field's headline mode) plus ``"follow_instruction_list_loose"`` and
  ``"follow_all_instructions_loose"`` for IFEval prompts, and ``"checkers"``: who scored each
  instruction (``ifeval:<id>``, the official checker, or ``speechllm:<kind>``, ours).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

from ..io.jsonl import read_jsonl, write_jsonl_atomic

PREDICTIONS_FILE = "predictions.jsonl"
"""The file every system's per-item rows go to, in the evaluation's output folder."""
FIELDS = ("benchmark", "system", "key", "task", "instruction", "prediction", "target", "score")
"""Every row's fields, in this order."""


def row(benchmark: str, system: str, key: str, task: str | None, instruction: str, prediction: str,
        target: Any, score: dict | None) -> dict:
    """One prediction row (see the module docstring)."""
    return dict(zip(FIELDS, (benchmark, system, key, task, instruction, prediction, target, score)))


def benchmark_of(source: str | None) -> str:
    """The benchmark name of a task item from its ``source`` (``mmau:...``, ``dynamic-superb:...``)."""
    prefix = (source or "").split(":", 1)[0]
    return prefix if prefix in ("mmau", "dynamic-superb", "speech-ifeval") else "tasks"


def following_score(instruction_ids: list[str], strict: list[bool], loose: list[bool] | None = None,
                    checkers: list[str] | None = None) -> dict:
    """The ``score`` of an instruction-following item."""
    out: dict = {"instruction_id_list": list(instruction_ids), "follow_instruction_list": [bool(x) for x in strict],
                 "follow_all_instructions": all(strict)}
    if loose is not None:
        out["follow_instruction_list_loose"] = [bool(x) for x in loose]
        out["follow_all_instructions_loose"] = all(loose)
    if checkers is not None:
        out["checkers"] = list(checkers)
    return out


def write_predictions(path: Path, rows: Iterable[dict]) -> None:
    """Write the rows (whole file, then renamed into place)."""
    rows = list(rows)
    for r in rows:
        if tuple(r) != FIELDS:
            raise ValueError(f"prediction row has fields {list(r)}, expected {list(FIELDS)}")
    write_jsonl_atomic(Path(path), rows)


def read_predictions(path: Path) -> list[dict]:
    """The rows of a predictions file, each with every field of `FIELDS`; a malformed line or a
    row missing a field is a `JsonlError` naming the file and line."""
    return read_jsonl(Path(path), required=FIELDS)
