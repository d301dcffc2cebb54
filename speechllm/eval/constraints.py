"""Verifiable format constraints in the style of IFEval / Speech-IFEval.

Each constraint kind is a registered spec with three parts: a parameter sampler, an instruction
text (the sentence appended to a task instruction) and a checker. A :class:`Constraint` binds a
kind to concrete parameters::

    c = sample_constraint("max_words", random.Random(0))
    prompt = task_instruction + " " + c.instruction()
    followed = c.check(model_response)

The evaluation scores a kind that IFEval has with IFEval's official checker instead of the one
here (:mod:`speechllm.eval.official`, ``IFEVAL_EQUIVALENT``); the checkers here score the kinds
IFEval lacks (``start_phrase``) and serve as a quick local check.

Rules decided here (each checker's docstring repeats its own):

* A blank (empty or whitespace-only) response follows no constraint: ``check`` returns False for
  every kind, so a model that says nothing cannot score on "no commas" or "fewer than N words".
* Words: the response is split on whitespace and tokens with no letter or digit in them
  (punctuation-only tokens such as ``-`` or ``...``) are dropped; the rest are words.
  ``"well - it's 3 o'clock..."`` has 4 words.
* ``json_format``: after stripping, the response is either bare JSON or one markdown code fence
  (```` ``` ```` or ```` ```json ````) holding JSON, with nothing outside. The value must be a
  JSON object or array; a bare number, string, boolean or null does not count as "JSON format".
* Phrases (``end_phrase``, ``start_phrase``) compare case-insensitively, as IFEval does, and must
  sit on a word boundary: "Sure" does not start "Surely ...".
* ``keyword`` is a case-insensitive whole-word match: "catalog" does not contain "cat".
* ``bullet_points`` counts lines that start (after optional indentation) with ``* `` or ``- ``
  followed by text; ``**bold**`` and horizontal rules (``---``, ``***``) are not bullets.
* ``double_quotes`` accepts only the ASCII double quote ``"``, not typographic quotes.
* ``lowercase`` / ``uppercase`` only check letter case; they do not check the language.
* ``language`` uses ``langdetect`` with ``DetectorFactory.seed = 0``; region suffixes are
  ignored (``zh-cn`` counts as ``zh``). Text langdetect cannot classify fails.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from typing import Any, Callable

__all__ = [
    "CONSTRAINTS",
    "LANGUAGE_NAMES",
    "Constraint",
    "ConstraintSpec",
    "count_words",
    "register",
    "sample_constraint",
]

# ---------------------------------------------------------------------------------------------
# Parameter pools (the sampler draws from these; order matters for determinism)

END_PHRASES = (
    "Is there anything else I can help with?",
    "Any other questions?",
    "Let me know if you have additional questions.",
    "Hope this helps.",
    "That is all I can tell you about this audio.",
)
START_PHRASES = (
    "My answer is",
    "Here is what I heard:",
    "Based on the audio,",
    "After listening carefully,",
    "In short,",
)
KEYWORDS = (
    "sound", "voice", "speaker", "tone", "listen", "clear", "background",
    "quiet", "emotion", "recording", "moment", "story",
)
MAX_WORDS = (20, 30, 40, 50, 60, 80, 100)
MIN_WORDS = (50, 80, 100, 150, 200, 300)
BULLET_COUNTS = (2, 3, 4, 5)

LANGUAGE_NAMES = {
    "en": "English", "de": "German", "fr": "French", "es": "Spanish", "it": "Italian",
    "pt": "Portuguese", "nl": "Dutch", "ru": "Russian", "ja": "Japanese", "zh": "Chinese",
    "ko": "Korean", "hi": "Hindi", "ar": "Arabic", "tr": "Turkish", "sv": "Swedish",
}

# ---------------------------------------------------------------------------------------------
# Registry


class ConstraintSpec:
    """One constraint kind. Subclasses set ``kind`` and ``param_names`` and override the rest;
    ``instruction``/``check`` receive the constraint's parameters as keyword arguments."""

    kind: str = ""
    param_names: tuple[str, ...] = ()

    def sample(self, rng: random.Random) -> dict[str, Any]:
        return {}

    def instruction(self, **params: Any) -> str:
        raise NotImplementedError

    def check(self, response: str, **params: Any) -> bool:
        raise NotImplementedError


CONSTRAINTS: dict[str, ConstraintSpec] = {}


def register(cls: type[ConstraintSpec]) -> type[ConstraintSpec]:
    """Class decorator: instantiate the spec and file it under its ``kind``."""
    if not cls.kind:
        raise ValueError(f"{cls.__name__} has no kind")
    if cls.kind in CONSTRAINTS:
        raise ValueError(f"constraint kind {cls.kind!r} registered twice")
    CONSTRAINTS[cls.kind] = cls()
    return cls


@dataclass(frozen=True)
class Constraint:
    """A constraint kind bound to its parameters (``params`` is not hashed; treat it as read-only)."""

    kind: str
    params: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        spec = CONSTRAINTS.get(self.kind)
        if spec is None:
            raise ValueError(f"unknown constraint kind {self.kind!r}; known: {', '.join(sorted(CONSTRAINTS))}")
        got, want = set(self.params), set(spec.param_names)
        if got != want:
            raise ValueError(f"constraint {self.kind!r} takes parameters {sorted(want)}, got {sorted(got)}")

    @property
    def spec(self) -> ConstraintSpec:
        return CONSTRAINTS[self.kind]

    def instruction(self) -> str:
        return self.spec.instruction(**self.params)

    def check(self, response: str) -> bool:
        if not isinstance(response, str) or not response.strip():
            return False
        return bool(self.spec.check(response, **self.params))

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "params": dict(self.params)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Constraint":
        return cls(kind=d["kind"], params=dict(d.get("params") or {}))


def sample_constraint(kind: str, rng: random.Random) -> Constraint:
    """Draw a constraint of ``kind`` with parameters taken from ``rng`` only (deterministic)."""
    if kind not in CONSTRAINTS:
        raise ValueError(f"unknown constraint kind {kind!r}; known: {', '.join(sorted(CONSTRAINTS))}")
    return Constraint(kind, CONSTRAINTS[kind].sample(rng))


# ---------------------------------------------------------------------------------------------
# Shared helpers

_HAS_ALNUM = re.compile(r"[^\W_]")


def count_words(text: str) -> int:
    """Whitespace-split tokens, not counting tokens without any letter or digit."""
    return sum(1 for tok in text.split() if _HAS_ALNUM.search(tok))


def _boundary_ok(text: str, i: int) -> bool:
    """True if position ``i`` in ``text`` is not in the middle of a word (between two word chars)."""
    if i <= 0 or i >= len(text):
        return True
    return not (text[i - 1].isalnum() and text[i].isalnum())


def _simple(kind_: str, text: str, checker: Callable[[str], bool]) -> type[ConstraintSpec]:
    """Build a parameterless spec from an instruction text and a checker."""

    class _Spec(ConstraintSpec):
        kind = kind_

        def instruction(self) -> str:
            return text

        def check(self, response: str) -> bool:
            return checker(response)

    _Spec.__name__ = _Spec.__qualname__ = f"{kind_.title().replace('_', '')}Spec"
    _Spec.__doc__ = checker.__doc__
    return register(_Spec)


# ---------------------------------------------------------------------------------------------
# Kinds without parameters

_FENCE = re.compile(r"\A```(?:json)?[ \t]*\n?(.*?)\n?[ \t]*```\Z", re.DOTALL | re.IGNORECASE)


def _is_json(response: str) -> bool:
    """The whole response (optionally inside one ``` or ```json fence) is a JSON object or array."""
    text = response.strip()
    m = _FENCE.match(text)
    if m:
        text = m.group(1).strip()
    elif text.startswith("```"):
        return False
    try:
        value = json.loads(text)
    except ValueError:
        return False
    return isinstance(value, (dict, list))


def _is_lowercase(response: str) -> bool:
    """No uppercase letter anywhere; digits, punctuation and caseless scripts are fine."""
    return not any(c.isupper() for c in response)


def _is_uppercase(response: str) -> bool:
    """No lowercase letter anywhere; digits, punctuation and caseless scripts are fine."""
    return not any(c.islower() for c in response)


def _is_quoted(response: str) -> bool:
    """Stripped response starts and ends with an ASCII double quote with non-blank text between."""
    text = response.strip()
    return len(text) >= 2 and text[0] == '"' and text[-1] == '"' and bool(text[1:-1].strip())


def _has_no_commas(response: str) -> bool:
    """No ASCII comma and no full-width comma (U+FF0C)."""
    return "," not in response and "\uff0c" not in response


_TITLE = re.compile(r"<<([^<>\n]*)>>")


def _has_title(response: str) -> bool:
    """At least one <<title>> with non-blank text on one line."""
    return any(t.strip() for t in _TITLE.findall(response))


_simple(
    "json_format",
    "Your entire output should be a single JSON object or array in JSON format. You may wrap it "
    "in a markdown code block (```json ... ```), but put nothing else outside it.",
    _is_json,
)
_simple("lowercase", "Your entire response should be in all lowercase letters. No capital letters are allowed.",
        _is_lowercase)
_simple("uppercase", "Your entire response should be in all capital letters. No lowercase letters are allowed.",
        _is_uppercase)
_simple("double_quotes", "Wrap your entire response with double quotation marks.", _is_quoted)
_simple("no_commas", "In your entire response, refrain from the use of any commas.", _has_no_commas)
_simple("title", "Your answer must contain a title, wrapped in double angular brackets, such as <<poem of joy>>.",
        _has_title)


# ---------------------------------------------------------------------------------------------
# Kinds with parameters


@register
class EndPhraseSpec(ConstraintSpec):
    """Stripped response ends with the phrase (case-insensitive, on a word boundary)."""

    kind = "end_phrase"
    param_names = ("phrase",)

    def sample(self, rng):
        return {"phrase": rng.choice(END_PHRASES)}

    def instruction(self, phrase):
        return f"Finish your response with this exact phrase: {phrase} No other words should follow this phrase."

    def check(self, response, phrase):
        text, p = response.rstrip().lower(), phrase.strip().lower()
        return bool(p) and text.endswith(p) and _boundary_ok(text, len(text) - len(p))


@register
class StartPhraseSpec(ConstraintSpec):
    """Stripped response starts with the phrase (case-insensitive, on a word boundary)."""

    kind = "start_phrase"
    param_names = ("phrase",)

    def sample(self, rng):
        return {"phrase": rng.choice(START_PHRASES)}

    def instruction(self, phrase):
        return f"Begin your response with this exact phrase, with nothing before it: {phrase}"

    def check(self, response, phrase):
        text, p = response.lstrip().lower(), phrase.strip().lower()
        return bool(p) and text.startswith(p) and _boundary_ok(text, len(p))


@register
class MaxWordsSpec(ConstraintSpec):
    """Fewer than ``n`` words (see :func:`count_words`)."""

    kind = "max_words"
    param_names = ("n",)

    def sample(self, rng):
        return {"n": rng.choice(MAX_WORDS)}

    def instruction(self, n):
        return f"Answer with fewer than {n} words."

    def check(self, response, n):
        return count_words(response) < n


@register
class MinWordsSpec(ConstraintSpec):
    """At least ``n`` words (see :func:`count_words`)."""

    kind = "min_words"
    param_names = ("n",)

    def sample(self, rng):
        return {"n": rng.choice(MIN_WORDS)}

    def instruction(self, n):
        return f"Answer with at least {n} words."

    def check(self, response, n):
        return count_words(response) >= n


_BULLET = re.compile(r"^[ \t]*[*-][ \t]+\S", re.MULTILINE)


@register
class BulletPointsSpec(ConstraintSpec):
    """Exactly ``n`` lines starting (after indentation) with "* " or "- " and some text."""

    kind = "bullet_points"
    param_names = ("n",)

    def sample(self, rng):
        return {"n": rng.choice(BULLET_COUNTS)}

    def instruction(self, n):
        return (f"Your response should contain exactly {n} bullet points in markdown format, such as:\n"
                "* This is a point.")

    def check(self, response, n):
        return len(_BULLET.findall(response)) == n


@register
class KeywordSpec(ConstraintSpec):
    """The keyword appears as a whole word, case-insensitive ("catalog" does not contain "cat")."""

    kind = "keyword"
    param_names = ("keyword",)

    def sample(self, rng):
        return {"keyword": rng.choice(KEYWORDS)}

    def instruction(self, keyword):
        return f'Include the keyword "{keyword}" in your response.'

    def check(self, response, keyword):
        kw = keyword.strip()
        if not kw:
            return False
        return re.search(rf"(?<!\w){re.escape(kw)}(?!\w)", response, re.IGNORECASE) is not None


@register
class LanguageSpec(ConstraintSpec):
    """langdetect (seed 0) identifies the response as ``language`` (ISO 639-1, region ignored)."""

    kind = "language"
    param_names = ("language",)

    def sample(self, rng):
        return {"language": rng.choice(sorted(LANGUAGE_NAMES))}

    def instruction(self, language):
        name = LANGUAGE_NAMES.get(language, language)
        return f"Your ENTIRE response should be in {name} language, no other language is allowed."

    def check(self, response, language):
        try:
            from langdetect import DetectorFactory, detect
            from langdetect.lang_detect_exception import LangDetectException
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError(
                "the 'language' constraint needs the langdetect package: pip install langdetect"
            ) from e
        DetectorFactory.seed = 0
        try:
            detected = detect(response)
        except LangDetectException:
            return False
        return detected.split("-")[0].lower() == language.split("-")[0].lower()
