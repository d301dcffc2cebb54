"""Reading audio: any wav/flac/ogg/mp3, any sample rate, mono or stereo -> float32 mono at 16 kHz."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import SpeechLLMError

SAMPLE_RATE = 16_000
"""Whisper's sample rate; every waveform inside speechllm is at this rate."""
MIN_SECONDS = 0.1
"""Shorter clips carry too little signal for one encoder frame pair."""


class AudioError(SpeechLLMError, ValueError):
    """An audio file that cannot be used; the message names the file and the cause."""


def load_audio(path: str | Path, sample_rate: int = SAMPLE_RATE, max_seconds: float | None = None) -> np.ndarray:
    """Decode `path` into a float32 mono waveform at `sample_rate`, shape (samples,).

    Channels are averaged; other rates are resampled with librosa (soxr). Raises `AudioError`
    for a missing, empty, undecodable, silent-length, non-finite or too long file."""
    import soundfile as sf

    path = Path(path)
    if not path.is_file():
        raise AudioError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise AudioError(f"{path}: empty file (0 bytes)")
    try:
        data, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as err:  # libsndfile raises several types for corrupt or foreign data
        raise AudioError(f"{path}: cannot decode audio ({err})") from None
    return prepare_waveform(data, sr, str(path), sample_rate, max_seconds)


def prepare_waveform(data: np.ndarray, sr: int, name: str = "<array>", sample_rate: int = SAMPLE_RATE,
                     max_seconds: float | None = None) -> np.ndarray:
    """Mono-mix, validate and resample an in-memory signal of shape (samples,) or (samples, channels)."""
    data = np.asarray(data, dtype=np.float32)
    if data.ndim == 2:
        data = data.mean(axis=1)
    elif data.ndim != 1:
        raise AudioError(f"{name}: expected (samples,) or (samples, channels), got shape {data.shape}")
    if data.size == 0:
        raise AudioError(f"{name}: no samples")
    if not np.isfinite(data).all():
        raise AudioError(f"{name}: contains NaN or infinite samples")
    seconds = data.size / sr
    if seconds < MIN_SECONDS:
        raise AudioError(f"{name}: too short ({seconds:.3f} s < {MIN_SECONDS} s)")
    if max_seconds is not None and seconds > max_seconds:
        raise AudioError(f"{name}: {seconds:.1f} s is longer than the maximum {max_seconds:.1f} s")
    if sr != sample_rate:
        import librosa

        data = librosa.resample(data, orig_sr=sr, target_sr=sample_rate, res_type="soxr_hq").astype(np.float32)
    return np.ascontiguousarray(data)
