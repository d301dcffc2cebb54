"""Signal-level annotators: duration and loudness."""

from __future__ import annotations

import numpy as np

from .base import Annotation, Annotator, Clip, register_annotator
from speechllm.labels import ATTRIBUTES, VOLUME_BINS_LUFS, VOLUME_NAMES, to_bin

LOUDNESS_MIN_SECONDS = 0.4
"""pyloudnorm's gating block; shorter clips fall back to RMS level."""
K_WEIGHTING_OFFSET_DB = -0.691
"""BS.1770's constant: LUFS = -0.691 + 10 log10(mean square) for an unweighted full-scale signal."""


@register_annotator
class Duration(Annotator):
    name, version = "duration", "1"

    def annotate(self, clips: list[Clip], prior) -> list[Annotation]:
        return [Annotation(value=round(c.duration, 3)) for c in clips]


@register_annotator
class Loudness(Annotator):
    """Integrated loudness (ITU-R BS.1770, pyloudnorm) -> Volume: quiet / normal / loud."""

    name, version, field = "volume", "1", ATTRIBUTES["volume"].field

    def __init__(self):
        import pyloudnorm

        from speechllm.io.audio import SAMPLE_RATE

        self.meter = pyloudnorm.Meter(SAMPLE_RATE)

    def _lufs(self, wav: np.ndarray, seconds: float) -> float:
        x = wav.astype(np.float64)
        if seconds >= LOUDNESS_MIN_SECONDS:
            lufs = float(self.meter.integrated_loudness(x))
            if np.isfinite(lufs):
                return lufs
        ms = float(np.mean(x ** 2))
        return K_WEIGHTING_OFFSET_DB + 10 * np.log10(ms) if ms > 0 else -np.inf

    def annotate(self, clips: list[Clip], prior) -> list[Annotation]:
        out = []
        for c in clips:
            lufs = self._lufs(c.wav, c.duration)
            if not np.isfinite(lufs):
                out.append(Annotation(value=None, bin=None, confidence=0.0))
                continue
            margin = min(abs(lufs - e) for e in VOLUME_BINS_LUFS)
            out.append(Annotation(value=round(lufs, 2), bin=to_bin(lufs, VOLUME_BINS_LUFS, VOLUME_NAMES),
                                  confidence=round(min(1.0, 0.5 + margin / 6.0), 3),
                                  extra={"peak_dbfs": round(20 * np.log10(max(np.abs(c.wav).max(), 1e-9)), 2)}))
        return out
