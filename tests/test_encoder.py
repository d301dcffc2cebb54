import numpy as np
import pytest
import torch

from speechllm.hub import weights
from speechllm.model.encoder import load_whisper_encoder


@pytest.fixture(scope="module")
def encoder(tiny_cfg):
    return load_whisper_encoder(weights.resolve(tiny_cfg.model.encoder.name), layers=[0, 1, 2])


def test_frame_arithmetic(encoder):
    assert encoder.frames_per_second == 50.0
    assert encoder.max_seconds == 30.0
    assert encoder.output_frames(3000) == 1500
    assert encoder.output_frames(531) == 266  # odd mel lengths round up
    out = encoder.encode([np.zeros(int(5.3 * 16000), dtype=np.float32)])
    assert out.lengths.tolist() == [265]


def test_batch_of_different_lengths_equals_each_alone(encoder, sample_wav):
    clips = [sample_wav, sample_wav[: 16000 + 160 * 7], sample_wav[8000:40000]]  # odd and even mel lengths
    batched = encoder.encode(clips)
    for i, clip in enumerate(clips):
        alone = encoder.encode([clip])
        n = int(alone.lengths[0])
        assert int(batched.lengths[i]) == n
        for b, a in zip(batched.states, alone.states):
            torch.testing.assert_close(b[i, :n], a[0, :n], atol=1e-5, rtol=1e-5)


def test_full_window_matches_transformers_encoder(encoder, sample_wav):
    # On a 30 s window (the only input transformers accepts) our layer handling equals
    # transformers' own WhisperEncoder.forward, final LayerNorm included.
    feats = encoder.feature_extractor(sample_wav, sampling_rate=16000, return_tensors="pt")["input_features"]
    ours = encoder(feats, torch.tensor([feats.shape[-1]])).states[-1]
    with torch.no_grad():
        ref = encoder.encoder(feats).last_hidden_state
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_trimmed_front_end_equals_padded_over_real_frames(encoder, sample_wav):
    # The convolution front-end + positional embeddings (hidden state 0) do not mix time beyond
    # a frame, so trimmed and 30 s-padded input agree there (bar the last frame, whose
    # convolution window reaches the padding). Deeper layers attend over the padding in the
    # padded run and legitimately differ: scripts/measure_trim.py measures that on real weights.
    padded = encoder.feature_extractor(sample_wav, sampling_rate=16000, return_tensors="pt")["input_features"]
    trimmed = encoder.encode([sample_wav])
    n = int(trimmed.lengths[0])
    full = encoder(padded, torch.tensor([padded.shape[-1]]))
    torch.testing.assert_close(trimmed.states[0][0, : n - 1], full.states[0][0, : n - 1], atol=1e-4, rtol=1e-4)


def test_bad_layers_and_long_clip(tiny_cfg, encoder):
    with pytest.raises(ValueError, match=r"out of range; this encoder has hidden states 0..2"):
        load_whisper_encoder(weights.resolve(tiny_cfg.model.encoder.name), layers=[3])
    with pytest.raises(ValueError, match="longer than the encoder's 30 s"):
        encoder.encode([np.zeros(31 * 16000, dtype=np.float32)])
