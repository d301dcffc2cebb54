"""Code checks on generated answers: degenerate output, and agreement with the labels
(used by the `selective` strategy)."""

from __future__ import annotations

import re

from ..labels import ATTRIBUTES, MEASURED

MIN_WORDS = 1
LOOP_MIN_REPEATS = 3
"""A span of words repeated this many times back to back is a loop..."""
LOOP_MIN_WORDS = 9
"""...when the repeats together are at least this many words ("no, no, no" is not a loop)."""
LOOP_MAX_NGRAM = 16
REPEATED_NGRAM = 6
"""An answer in which some 6-word span occurs 3 or more times anywhere is also a loop."""

GENDER_WORDS = {value: set(words) for value, words in ATTRIBUTES["gender"].cues.items()}
"""Words that commit an answer to a gender (pronouns included)."""
BIN_WORDS = {name: {value: set(words) for value, words in ATTRIBUTES[name].cues.items()}
             for name in MEASURED if name != "gender"}
"""Words that commit an answer to a bin; an answer using words of another bin than the label's
contradicts it. "normal" bins have no words: an answer is free to say nothing."""

_WORD = re.compile(r"[a-z0-9']+")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower().replace("-", " "))


def degenerate_reason(text: str) -> str | None:
    """Why an answer is unusable as a target (empty, or stuck in a loop), or None."""
    w = words(text)
    if len(w) < MIN_WORDS:
        return "empty"
    for n in range(1, LOOP_MAX_NGRAM + 1):
        for start in range(0, len(w) - n * LOOP_MIN_REPEATS + 1):
            gram = w[start: start + n]
            reps = 1
            while w[start + reps * n: start + (reps + 1) * n] == gram:
                reps += 1
            if reps >= LOOP_MIN_REPEATS and reps * n >= LOOP_MIN_WORDS:
                return f"loop: '{' '.join(gram)}' x{reps}"
    counts: dict[tuple[str, ...], int] = {}
    for start in range(len(w) - REPEATED_NGRAM + 1):
        gram = tuple(w[start: start + REPEATED_NGRAM])
        counts[gram] = counts.get(gram, 0) + 1
        if counts[gram] >= LOOP_MIN_REPEATS:
            return f"repeats: '{' '.join(gram)}' x{counts[gram]}"
    return None


def _mentions(text: str, vocab: set[str]) -> bool:
    t = " " + " ".join(words(text)) + " "
    return any(f" {' '.join(words(v))} " in t for v in vocab)


def agreement(text: str, attrs: dict[str, str], transcript: str | None, min_recall: float) -> dict[str, bool]:
    """Per check, whether `text` agrees with the labelled attributes: no gender or bin word of
    another value than the label's, and (when a transcript is given) at least `min_recall` of
    the transcript's words present in the answer."""
    checks: dict[str, bool] = {}
    gender = attrs.get("gender")
    if gender in GENDER_WORDS:
        other = "male" if gender == "female" else "female"
        checks["gender"] = not (_mentions(text, GENDER_WORDS[other]) and not _mentions(text, GENDER_WORDS[gender]))
    for attr, vocab in BIN_WORDS.items():
        value = attrs.get(attr)
        if value is None:
            continue
        wrong = set().union(*(v for k, v in vocab.items() if k != value))
        checks[attr] = not _mentions(text, wrong)
    if transcript:
        ref = words(transcript)
        said = set(words(text))
        if ref:
            checks["transcript"] = sum(w in said for w in ref) / len(ref) >= min_recall
    return checks
