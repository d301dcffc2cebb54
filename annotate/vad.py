"""Speech segments from Silero VAD (the model ships inside the `silero-vad` wheel)."""

from __future__ import annotations

from .base import Annotation, Annotator, Clip, ClipError, register_annotator

MIN_SPEECH_SECONDS = 0.2
"""A clip with less detected speech than this is rejected ("no speech")."""


@register_annotator
class SpeechSegments(Annotator):
    """value: [[start_s, end_s], ...] of detected speech; extra.speech_seconds, extra.speech_ratio.

    A clip with no speech raises `ClipError` and becomes an error record."""

    name, version = "vad", "1"

    def __init__(self, threshold: float = 0.5):
        import torch
        from silero_vad import get_speech_timestamps, load_silero_vad

        self._torch, self._get = torch, get_speech_timestamps
        self.model = load_silero_vad()
        self.threshold = threshold

    def annotate(self, clips: list[Clip], prior) -> list[Annotation]:
        from speechllm.io.audio import SAMPLE_RATE

        out = []
        for c in clips:
            stamps = self._get(self._torch.from_numpy(c.wav), self.model, sampling_rate=SAMPLE_RATE,
                               threshold=self.threshold, return_seconds=True)
            segments = [[round(float(s["start"]), 3), round(float(s["end"]), 3)] for s in stamps]
            speech = sum(e - s for s, e in segments)
            if speech < MIN_SPEECH_SECONDS:
                raise ClipError(f"no speech detected ({speech:.2f} s of speech in {c.duration:.2f} s)")
            out.append(Annotation(value=segments, extra={"speech_seconds": round(speech, 3),
                                                         "speech_ratio": round(speech / c.duration, 3)}))
        return out
