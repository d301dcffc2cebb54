"""Reading audio: any wav/flac/ogg/mp3, any sample rate, mono or stereo -> float32 mono at 16 kHz."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import SpeechLLMError

SAMPLE_RATE = 16_000
"""Whisper's sample rate; every waveform inside speechllm is at this rate."""
MIN_SECONDS = 0.1
"""Shorter clips carry too little signal for one encoder frame pair."""
MIN_SAMPLE_RATE = 1000
"""Lower rates are not audio anyone records; a header claiming one is damaged (and resampling
from it would multiply the samples by thousands)."""


class AudioError(SpeechLLMError, ValueError):
    """An audio file that cannot be used; the message names the file and the cause."""


def load_audio(path: str | Path, sample_rate: int = SAMPLE_RATE, max_seconds: float | None = None) -> np.ndarray:
    """Decode `path` into a float32 mono waveform at `sample_rate`, shape (samples,).

    Channels are averaged; other rates are resampled with librosa (soxr). Raises `AudioError`
    for a missing, empty, undecodable, silent-length, non-finite or too long file (a too long
    one before it is decoded)."""
    import soundfile as sf

    path = Path(path)
    seconds = audio_seconds(path)
    if max_seconds is not None and seconds > max_seconds:
        raise AudioError(f"{path}: {seconds:.1f} s is longer than the maximum {max_seconds:.1f} s")
    try:
        data, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as err:  # libsndfile raises several types for corrupt or foreign data
        raise AudioError(f"{path}: cannot decode audio ({err})") from None
    return prepare_waveform(data, sr, str(path), sample_rate, max_seconds)


def audio_seconds(path: str | Path) -> float:
    """The length of an audio file from its header, without decoding it; `AudioError` naming the
    file for a missing path, a folder, an empty file or a header that cannot be read."""
    import soundfile as sf

    path = Path(path)
    if path.is_dir():
        raise AudioError(f"{path}: is a folder, not an audio file")
    if not path.is_file():
        raise AudioError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise AudioError(f"{path}: empty file (0 bytes)")
    try:
        info = sf.info(str(path))
    except Exception as err:  # libsndfile raises several types for corrupt or foreign data
        raise AudioError(f"{path}: cannot decode audio ({err})") from None
    if info.samplerate < MIN_SAMPLE_RATE:
        raise AudioError(f"{path}: sample rate {info.samplerate} Hz is below {MIN_SAMPLE_RATE} Hz (a damaged header?)")
    return info.frames / info.samplerate


def prepare_waveform(data: np.ndarray, sr: int, name: str = "<array>", sample_rate: int = SAMPLE_RATE,
                     max_seconds: float | None = None) -> np.ndarray:
    """Mono-mix, validate and resample an in-memory signal of shape (samples,) or (samples, channels)."""
    data = np.asarray(data, dtype=np.float32)
    if data.ndim not in (1, 2):
        raise AudioError(f"{name}: expected (samples,) or (samples, channels), got shape {data.shape}")
    if data.size == 0:
        raise AudioError(f"{name}: no samples")
    if sr < MIN_SAMPLE_RATE:
        raise AudioError(f"{name}: sample rate {sr} Hz is below {MIN_SAMPLE_RATE} Hz (a damaged header?)")
    if not np.isfinite(data).all():
        raise AudioError(f"{name}: contains NaN or infinite samples")
    if data.ndim == 2:
        data = data.mean(axis=1)
    seconds = data.size / sr
    if seconds < MIN_SECONDS:
        raise AudioError(f"{name}: too short ({seconds:.3f} s < {MIN_SECONDS} s)")
    if max_seconds is not None and seconds > max_seconds:
        raise AudioError(f"{name}: {seconds:.1f} s is longer than the maximum {max_seconds:.1f} s")
    if sr != sample_rate:
        import librosa

        data = librosa.resample(data, orig_sr=sr, target_sr=sample_rate, res_type="soxr_hq").astype(np.float32)
    return np.ascontiguousarray(data)
