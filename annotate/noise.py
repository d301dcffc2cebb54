"""Background noise: SNR from speech vs non-speech energy (VAD segments), and optionally
DNSMOS's background score (the `speechmos` package, which ships the DNSMOS ONNX models)."""

from __future__ import annotations

import numpy as np

from .base import Annotation, Annotator, Clip, register_annotator
from speechllm.labels import ATTRIBUTES, NOISE_NAMES, NOISE_SNR_DB, to_bin

FRAME_S = 0.02
"""Energy frame length."""
EDGE_GUARD_S = 0.05
"""Frames this close to a speech segment are neither speech nor noise (onsets, tails)."""
MIN_NOISE_SECONDS = 0.1
"""Less non-speech than this: the noise floor comes from the quietest speech frames instead."""
QUIET_FRAME_PERCENTILE = 10
"""Fallback noise floor: this percentile of frame energies."""
MAX_SNR_DB = 60.0
"""Digital silence is reported as this SNR rather than infinity."""


def _frame_power(wav: np.ndarray, frame: int) -> np.ndarray:
    n = len(wav) // frame
    return (wav[: n * frame].astype(np.float64).reshape(n, frame) ** 2).mean(axis=1)


def estimate_snr(wav: np.ndarray, segments: list[list[float]], sample_rate: int) -> tuple[float, str]:
    """(SNR dB, method). Noise power from frames outside the VAD segments (with a guard), speech
    power from frames inside them minus the noise power."""
    frame = int(FRAME_S * sample_rate)
    power = _frame_power(wav, frame)
    if len(power) == 0:
        return MAX_SNR_DB, "empty"
    t = (np.arange(len(power)) + 0.5) * FRAME_S
    inside = np.zeros(len(power), bool)
    near = np.zeros(len(power), bool)
    for s, e in segments:
        inside |= (t >= s) & (t <= e)
        near |= (t >= s - EDGE_GUARD_S) & (t <= e + EDGE_GUARD_S)
    noise_frames = ~near
    if noise_frames.sum() * FRAME_S >= MIN_NOISE_SECONDS:
        noise, method = float(np.mean(power[noise_frames])), "vad"
    else:
        noise, method = float(np.percentile(power, QUIET_FRAME_PERCENTILE)), "percentile"
    speech_total = float(np.mean(power[inside])) if inside.any() else float(np.mean(power))
    signal = max(speech_total - noise, 0.0)
    if noise <= 0:
        return MAX_SNR_DB, method
    if signal <= 0:
        return -MAX_SNR_DB, method
    return float(np.clip(10 * np.log10(signal / noise), -MAX_SNR_DB, MAX_SNR_DB)), method


@register_annotator
class Noise(Annotator):
    """SNR estimate -> Noise: clean / noisy (noisy below `NOISE_SNR_DB`)."""

    name, version, field, requires = "noise", "1", ATTRIBUTES["noise"].field, ("vad",)

    def __init__(self, dnsmos: bool = False):
        """dnsmos: also run DNSMOS (needs `pip install speechmos onnxruntime`, adds ~0.05 RTF)
        and keep its background score (1 = very noisy ... 5 = clean) in `extra.dnsmos_bak`."""
        self._dnsmos = None
        if dnsmos:
            try:
                from speechmos import dnsmos as module
            except ImportError as err:
                raise ImportError("DNSMOS needs the optional packages: pip install speechmos onnxruntime "
                                  f"({err})") from None
            self._dnsmos = module

    def annotate(self, clips: list[Clip], prior) -> list[Annotation]:
        from speechllm.io.audio import SAMPLE_RATE

        out = []
        for c, p in zip(clips, prior):
            snr, method = estimate_snr(c.wav, p["vad"].value, SAMPLE_RATE)
            extra = {"method": method}
            if self._dnsmos is not None:
                scores = self._dnsmos.run(c.wav, SAMPLE_RATE)
                extra["dnsmos_bak"] = round(float(scores["bak_mos"]), 3)
            margin = abs(snr - NOISE_SNR_DB)
            out.append(Annotation(value=round(snr, 1), bin=to_bin(snr, (NOISE_SNR_DB,), NOISE_NAMES),
                                  confidence=round(min(1.0, 0.5 + margin / 20.0), 3), extra=extra))
        return out
