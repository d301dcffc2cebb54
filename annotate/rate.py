"""Speaking rate: syllables of the transcript per second of detected speech."""

from __future__ import annotations

import re

from .base import Annotation, Annotator, Clip, register_annotator
from .bins import SPEED_BINS_SYLL_PER_S, to_bin

SPEED_NAMES = ("slow", "normal", "fast")
_VOWEL_GROUPS = re.compile(r"[aeiouy]+")
_SOUNDED_ES = ("ses", "zes", "ces", "ges", "shes", "ches", "xes")
_DIGIT_SYLLABLES = {"0": 2, "1": 1, "2": 1, "3": 1, "4": 1, "5": 1, "6": 1, "7": 2, "8": 1, "9": 1}


def count_syllables(word: str) -> int:
    """English syllables of one word: vowel groups, less a silent final e ("make", but not
    "table"), less the -ed / -es that add no syllable ("walked", "makes", but not "wanted",
    "voices"). About one syllable in ten off on running text; digits count as spoken."""
    word = word.lower()
    if word.isdigit():
        return sum(_DIGIT_SYLLABLES[d] for d in word)
    word = re.sub(r"[^a-z]", "", word)
    if not word:
        return 0
    n = len(_VOWEL_GROUPS.findall(word))
    if n > 1:
        consonant_le = word.endswith("le") and len(word) > 2 and word[-3] not in "aeiouy"
        if word.endswith("e") and not word.endswith(("ee", "ye")) and not consonant_le:
            n -= 1
        elif word.endswith("ed") and not word.endswith(("ted", "ded")):
            n -= 1
        elif word.endswith("es") and not word.endswith(_SOUNDED_ES):
            n -= 1
    return max(1, n)


def count_text_syllables(text: str) -> int:
    return sum(count_syllables(w) for w in re.findall(r"[A-Za-z']+|\d+", text))


@register_annotator
class SpeakingRate(Annotator):
    """Syllables per second of speech time (VAD) -> Speaking speed: slow / normal / fast."""

    name, version, field, requires = "speed", "1", "Speaking speed", ("transcript", "vad")

    def annotate(self, clips: list[Clip], prior) -> list[Annotation]:
        out = []
        for p in prior:
            text = p["transcript"].value or ""
            speech = p["vad"].extra["speech_seconds"]
            syllables = count_text_syllables(text)
            if syllables == 0 or speech <= 0:
                out.append(Annotation(value=None, bin=None, confidence=0.0, extra={"syllables": syllables}))
                continue
            rate = syllables / speech
            margin = min(abs(rate - e) / e for e in SPEED_BINS_SYLL_PER_S)
            out.append(Annotation(value=round(rate, 2), bin=to_bin(rate, SPEED_BINS_SYLL_PER_S, SPEED_NAMES),
                                  confidence=round(min(1.0, 0.5 + 2 * margin), 3),
                                  extra={"syllables": syllables, "speech_seconds": speech}))
        return out
