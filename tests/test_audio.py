import numpy as np
import pytest
import soundfile as sf

from speechllm.io.audio import SAMPLE_RATE, AudioError, load_audio


@pytest.mark.parametrize("fmt,ext", [("WAV", "wav"), ("FLAC", "flac"), ("OGG", "ogg"), ("MP3", "mp3")])
def test_any_format_rate_and_channels(tmp_path, fmt, ext):
    sr, seconds = 44_100, 1.5
    t = np.arange(int(sr * seconds)) / sr
    tone = 0.3 * np.sin(2 * np.pi * 220 * t)
    stereo = np.stack([tone, tone], axis=1).astype(np.float32)
    path = tmp_path / f"clip.{ext}"
    sf.write(path, stereo, sr, format=fmt)
    wav = load_audio(path)
    assert wav.dtype == np.float32 and wav.ndim == 1
    # mp3 encoders add a few ms of priming delay; the others are sample-exact
    assert abs(len(wav) - seconds * SAMPLE_RATE) < 0.06 * SAMPLE_RATE
    assert 0.15 < np.abs(wav).max() < 0.4  # channels averaged, not summed


def test_bad_files_name_file_and_cause(tmp_path):
    with pytest.raises(AudioError, match="missing.wav: no such file"):
        load_audio(tmp_path / "missing.wav")
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    with pytest.raises(AudioError, match="empty.wav: empty file"):
        load_audio(empty)
    junk = tmp_path / "junk.wav"
    junk.write_bytes(b"this is not audio at all" * 10)
    with pytest.raises(AudioError, match="junk.wav: cannot decode"):
        load_audio(junk)
    nan = tmp_path / "nan.wav"
    sf.write(nan, np.full(16000, np.nan, dtype=np.float32), 16000, subtype="FLOAT")
    with pytest.raises(AudioError, match="nan.wav: contains NaN"):
        load_audio(nan)
    long = tmp_path / "long.wav"
    sf.write(long, np.zeros(16000 * 3, dtype=np.float32), 16000)
    with pytest.raises(AudioError, match="long.wav: 3.0 s is longer than the maximum 2.0 s"):
        load_audio(long, max_seconds=2.0)


def test_truncated_wav_is_read_or_rejected_clearly(tmp_path):
    path = tmp_path / "cut.wav"
    sf.write(path, np.random.default_rng(0).normal(0, 0.1, 16000).astype(np.float32), 16000)
    data = path.read_bytes()
    path.write_bytes(data[:30])  # header only, cut inside the header
    with pytest.raises(AudioError, match="cut.wav"):
        load_audio(path)
