"""Deterministic DeSTA2.5-style description of one clip.

    [00:00-00:05] "unless to be rather cold hearted" (Gender: Male, Pitch: Low, Speaking speed: Normal, Volume: Normal, Noise: Clean)

Fields come from annotators that have a `field` and a word bin, in registry order; an annotator
that abstains (bin None, e.g. gender near the pitch boundary) leaves its field out rather than
guess. Attributes with no offline model (emotion, age, accent) come from manifest labels.
"""

from __future__ import annotations

import math
import re

from speechllm.labels import ATTRIBUTES, LABEL_ONLY

FIELD_ORDER = tuple(a.field for a in ATTRIBUTES.values())
"""Display order of the table's fields (`speechllm.labels`); other fields follow in the order given."""
LABEL_ONLY_FIELDS = {name: ATTRIBUTES[name].field for name in LABEL_ONLY}
"""Label keys used as given (no offline annotator exists for them) -> description field name."""


def timestamp(seconds: float) -> str:
    """`MM:SS` (minutes may exceed 59)."""
    seconds = int(seconds)
    return f"{seconds // 60:02d}:{seconds % 60:02d}"


def describe(duration: float, transcript: str | None, fields: list[tuple[str, str]]) -> str:
    """The description line. `fields` are (name, word) pairs; built-in fields are put in
    `FIELD_ORDER`, the rest keep their order after them."""
    rank = {name: i for i, name in enumerate(FIELD_ORDER)}
    fields = sorted(fields, key=lambda f: rank.get(f[0], len(rank)))
    span = f"[{timestamp(0)}-{timestamp(math.ceil(duration))}]"
    parts = [span]
    if transcript:
        parts.append(f'"{transcript.strip()}"')
    if fields:
        parts.append("(" + ", ".join(f"{name}: {word[:1].upper()}{word[1:]}" for name, word in fields) + ")")
    return " ".join(parts)


_SPAN = re.compile(r"^\s*\[[\d:.]+\s*-\s*[\d:.]+\]\s*")
_FIELDS = re.compile(r"\(([^()]*)\)\s*$")
FIELD_NAMES = {a.field.lower(): a.name for a in ATTRIBUTES.values()}
"""Description field name (lower case) -> attribute key."""


def parse_description(text: str) -> tuple[str | None, dict[str, str]]:
    """(transcript, {attribute: value}) read back from a description line, the inverse of
    `describe` (also for Speech-IFEval's `textual_audio`, whose transcript is unquoted). Field
    names map to the attribute table's keys ("Speaking speed" -> speed); others become lower-case
    keys; values are lower-cased."""
    rest = _SPAN.sub("", text, count=1)
    fields: dict[str, str] = {}
    match = _FIELDS.search(rest)
    if match and ":" in match.group(1):
        rest = rest[: match.start()]
        for part in match.group(1).split(","):
            name, sep, value = part.partition(":")
            if sep and name.strip() and value.strip():
                key = name.strip().lower()
                fields[FIELD_NAMES.get(key, key.replace(" ", "_"))] = value.strip().lower()
    rest = rest.strip()
    if len(rest) >= 2 and rest[0] == rest[-1] == '"':
        rest = rest[1:-1].strip()
    return rest or None, fields
