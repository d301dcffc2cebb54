"""Speaking rate: syllables of the transcript per second of detected speech."""

from __future__ import annotations

from .base import Annotation, Annotator, Clip, register_annotator
from speechllm.labels import ATTRIBUTES, SPEED_BINS_SYLL_PER_S, SPEED_NAMES, count_syllables, to_bin

@register_annotator
class SpeakingRate(Annotator):
    """Syllables per second of speech time (VAD) -> Speaking speed: slow / normal / fast."""

    name, version, field, requires = "speed", "1", ATTRIBUTES["speed"].field, ("transcript", "vad")

    def annotate(self, clips: list[Clip], prior) -> list[Annotation]:
        out = []
        for p in prior:
            text = p["transcript"].value or ""
            speech = p["vad"].extra["speech_seconds"]
            syllables = count_syllables(text)
            if syllables == 0 or speech <= 0:
                out.append(Annotation(value=None, bin=None, confidence=0.0, extra={"syllables": syllables}))
                continue
            rate = syllables / speech
            margin = min(abs(rate - e) / e for e in SPEED_BINS_SYLL_PER_S)
            out.append(Annotation(value=round(rate, 2), bin=to_bin(rate, SPEED_BINS_SYLL_PER_S, SPEED_NAMES),
                                  confidence=round(min(1.0, 0.5 + 2 * margin), 3),
                                  extra={"syllables": syllables, "speech_seconds": speech}))
        return out
