"""Pitch (median F0 with praat-parselmouth) and gender from pitch, with an uncertain band."""

from __future__ import annotations

import math

import numpy as np

from .base import Annotation, Annotator, Clip, register_annotator
from speechllm.labels import ATTRIBUTES, PITCH_BINS_HZ, PITCH_NAMES, to_bin

F0_FLOOR_HZ, F0_CEILING_HZ = 60.0, 500.0
"""Search range of the F0 tracker, wide enough for low male and high female voices."""
F0_STEP_S = 0.01
MIN_VOICED_FRAMES = 10
"""Fewer voiced frames than this: no pitch estimate."""
GENDER_BOUNDARY_HZ = 160.0
"""Median F0 separating typical male (~85-155 Hz) from typical female (~165-255 Hz) voices."""
GENDER_UNCERTAIN_SEMITONES = 1.0
"""Within this distance of the boundary (about 151-170 Hz) gender is not claimed."""
GENDER_SURE_SEMITONES = 4.0
"""At this distance from the boundary confidence reaches 1."""


def semitones(f: float, ref: float) -> float:
    return 12.0 * math.log2(f / ref)


def median_f0(wav: np.ndarray, sample_rate: int) -> tuple[float | None, float | None, int]:
    """(median F0 Hz, spread in semitones (IQR), voiced frames) of a waveform."""
    import parselmouth

    snd = parselmouth.Sound(wav.astype(np.float64), sampling_frequency=sample_rate)
    pitch = snd.to_pitch(time_step=F0_STEP_S, pitch_floor=F0_FLOOR_HZ, pitch_ceiling=F0_CEILING_HZ)
    f0 = pitch.selected_array["frequency"]
    f0 = f0[f0 > 0]
    if len(f0) < MIN_VOICED_FRAMES:
        return None, None, len(f0)
    med = float(np.median(f0))
    q1, q3 = np.percentile(f0, [25, 75])
    return med, float(semitones(q3, q1)), len(f0)


@register_annotator
class Pitch(Annotator):
    """Median F0 over voiced frames -> Pitch: low / normal / high (absolute bins)."""

    name, version, field = "pitch", "1", ATTRIBUTES["pitch"].field

    def annotate(self, clips: list[Clip], prior) -> list[Annotation]:
        from speechllm.io.audio import SAMPLE_RATE

        out = []
        for c in clips:
            med, spread, voiced = median_f0(c.wav, SAMPLE_RATE)
            if med is None:
                out.append(Annotation(value=None, bin=None, confidence=0.0, extra={"voiced_frames": voiced}))
                continue
            margin = min(abs(semitones(med, e)) for e in PITCH_BINS_HZ)
            out.append(Annotation(value=round(med, 1), bin=to_bin(med, PITCH_BINS_HZ, PITCH_NAMES),
                                  confidence=round(min(1.0, 0.5 + margin / 4.0), 3),
                                  extra={"spread_semitones": round(spread, 2), "voiced_frames": voiced}))
        return out


@register_annotator
class GenderFromPitch(Annotator):
    """Gender guessed from median F0; abstains (bin None) near the boundary. A weak cue: replace
    it with a classifier by registering another annotator named "gender"."""

    name, version, field, requires = "gender", "1", ATTRIBUTES["gender"].field, ("pitch",)

    def annotate(self, clips: list[Clip], prior) -> list[Annotation]:
        out = []
        for p in prior:
            f0 = p["pitch"].value
            if f0 is None:
                out.append(Annotation(value=None, bin=None, confidence=0.0))
                continue
            d = semitones(f0, GENDER_BOUNDARY_HZ)
            guess = "female" if d > 0 else "male"
            sure = abs(d) >= GENDER_UNCERTAIN_SEMITONES
            conf = min(1.0, abs(d) / GENDER_SURE_SEMITONES)
            out.append(Annotation(value=guess, bin=guess if sure else None, confidence=round(conf, 3),
                                  extra={"semitones_from_boundary": round(d, 2)}))
        return out
