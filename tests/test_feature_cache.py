"""Encoder feature cache: values, hits, invalidation, corrupt entries, resumable builds."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from speechllm.hub import weights
from speechllm.io.audio import AudioError, load_audio
from speechllm.model.encoder import load_whisper_encoder
from speechllm.training import cache as cache_mod
from speechllm.training.cache import CACHE_INFO, FeatureCache

from conftest import ROOT

TINY = "tiny-random-whisper"
LAYERS = [1, 2]
SOURCES = [ROOT / "samples" / "librivox_austen_0890.wav", ROOT / "samples" / "librivox_austen_0920.wav"]
CUTS_SECONDS = [None, 2.0, 0.7]
"""Clip lengths cut from each source (None: whole file): six clips of different lengths."""


@pytest.fixture(scope="module")
def encoder():
    return load_whisper_encoder(weights.resolve(TINY), layers=LAYERS)


@pytest.fixture()
def clips(tmp_path) -> list[Path]:
    out = []
    for src in SOURCES:
        data, sr = sf.read(str(src), dtype="float32")
        for seconds in CUTS_SECONDS:
            part = data if seconds is None else data[: int(seconds * sr)]
            path = tmp_path / "audio" / f"{src.stem}_{seconds or 'full'}.wav"
            path.parent.mkdir(exist_ok=True)
            sf.write(str(path), part, sr)
            out.append(path)
    return out


def entries(cache: FeatureCache) -> dict[Path, int]:
    """Every entry file under the cache folder, with its mtime_ns."""
    return {p: p.stat().st_mtime_ns for p in cache.folder.rglob("*.safetensors")}


def test_states_equal_the_encoder_on_each_clip_alone(encoder, clips, tmp_path):
    cache = FeatureCache(tmp_path / "cache", encoder, TINY)
    got = cache.get(clips, batch_size=4)  # batches mix clips of different lengths
    assert cache.stats.computed == len(clips) and cache.stats.hits == 0
    for path, states in zip(clips, got):
        wav = load_audio(path)
        alone = encoder.encode([wav])
        assert len(states) == len(LAYERS)
        for s, ref in zip(states, alone.states):
            assert s.dtype == torch.float32 and s.shape == (int(alone.lengths[0]), encoder.width)
            torch.testing.assert_close(s, ref[0], atol=2e-3, rtol=2e-3)
    again = cache.get(clips)  # read back from disk: exactly the values the first call returned
    assert cache.stats.hits == len(clips) and cache.stats.computed == len(clips)
    for a, b in zip(got, again):
        for x, y in zip(a, b):
            assert torch.equal(x, y)


def test_second_run_reads_disk_only(encoder, clips, tmp_path):
    first = FeatureCache(tmp_path / "cache", encoder, TINY)
    first.get(clips)
    before = entries(first)
    assert len(before) == len(clips)
    info = (first.folder / CACHE_INFO).read_text()
    assert '"layers"' in info and '"hop_length"' in info and weights.fingerprint(TINY) in info

    second = FeatureCache(tmp_path / "cache", encoder, TINY)
    assert second.folder == first.folder
    second.get(clips)
    assert (second.stats.hits, second.stats.computed) == (len(clips), 0)
    stats = second.build(clips, progress=False)
    assert (stats.hits, stats.computed, stats.corrupt) == (len(clips), 0, 0)
    assert entries(second) == before
    assert not list(first.folder.rglob("*.tmp"))


def test_same_content_shares_an_entry_and_edits_get_a_new_one(encoder, clips, tmp_path):
    cache = FeatureCache(tmp_path / "cache", encoder, TINY)
    twin = tmp_path / "elsewhere" / "twin.wav"
    twin.parent.mkdir()
    shutil.copy(clips[1], twin)
    assert cache.key(twin) == cache.key(clips[1])
    a, b = cache.get([clips[1], twin])
    assert cache.stats.computed == 1 and len(entries(cache)) == 1
    assert all(torch.equal(x, y) for x, y in zip(a, b))

    data, sr = sf.read(str(twin), dtype="float32")
    sf.write(str(twin), np.ascontiguousarray(data[::-1]), sr)  # new bytes at the same path
    assert cache.key(twin) != cache.key(clips[1])
    (edited,) = cache.get([twin])
    assert cache.stats.computed == 2 and len(entries(cache)) == 2
    assert not torch.allclose(edited[0], a[0])


def perturbed_copy(folder: Path, out: Path) -> Path:
    """A local copy of a Whisper folder (without speechllm's ready marker) with one encoder
    weight nudged."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(folder, out, ignore=shutil.ignore_patterns(weights.READY_MARKER))
    (path,) = out.glob("*.safetensors")
    state = load_file(str(path))
    name = next(k for k in state if "encoder.layers.0" in k and k.endswith("weight"))
    state[name] = state[name] + 0.05
    save_file(state, str(path), metadata={"format": "pt"})
    return out


def test_folder_follows_weights_layers_features_and_version(encoder, tmp_path, monkeypatch):
    root = tmp_path / "cache"
    base = FeatureCache(root, encoder, TINY).folder

    same_weights = tmp_path / "same"
    shutil.copytree(weights.resolve(TINY), same_weights, ignore=shutil.ignore_patterns(weights.READY_MARKER))
    assert FeatureCache(root, encoder, str(same_weights)).folder == base  # same weights, another name

    nudged = perturbed_copy(Path(weights.resolve(TINY)), tmp_path / "nudged")
    assert FeatureCache(root, encoder, str(nudged)).folder != base

    other_layers = load_whisper_encoder(weights.resolve(TINY), layers=[2])
    assert FeatureCache(root, other_layers, TINY).folder != base

    for setting, value in [("n_fft", 512), ("hop_length", 320), ("feature_size", 128), ("sampling_rate", 8000)]:
        with monkeypatch.context() as m:
            m.setattr(encoder.feature_extractor, setting, value)
            assert FeatureCache(root, encoder, TINY).folder != base, setting

    monkeypatch.setattr(cache_mod, "CACHE_FORMAT_VERSION", cache_mod.CACHE_FORMAT_VERSION + 1)
    assert FeatureCache(root, encoder, TINY).folder != base


def test_changed_weights_recompute(encoder, clips, tmp_path):
    nudged = perturbed_copy(Path(weights.resolve(TINY)), tmp_path / "nudged")
    original = FeatureCache(tmp_path / "cache", encoder, TINY)
    changed = FeatureCache(tmp_path / "cache", load_whisper_encoder(str(nudged), layers=LAYERS), str(nudged))
    (a,) = original.get(clips[:1])
    (b,) = changed.get(clips[:1])
    assert changed.stats.computed == 1 and not torch.allclose(a[0], b[0])


def test_truncated_or_foreign_entry_is_recomputed(encoder, clips, tmp_path):
    cache = FeatureCache(tmp_path / "cache", encoder, TINY)
    (good,) = cache.get(clips[:1])
    entry = cache.entry_path(cache.key(clips[0]))
    full = entry.read_bytes()
    for damaged in (full[: len(full) // 2], full[:5], b"not a safetensors file", b""):
        entry.write_bytes(damaged)
        stats = cache.build(clips[:1], progress=False)  # header checks catch it
        assert (stats.hits, stats.computed, stats.corrupt) == (0, 1, 1)
        entry.write_bytes(damaged)
        (again,) = cache.get(clips[:1])
        assert all(torch.equal(x, y) for x, y in zip(good, again))
    assert cache.stats.corrupt == 4
    leftover = entry.with_name(f".{entry.name}.99999.tmp")  # a killed writer's temporary file
    leftover.write_bytes(full[:10])
    assert cache.build(clips[:1], progress=False).hits == 1


def test_build_resumes(encoder, clips, tmp_path):
    cache = FeatureCache(tmp_path / "cache", encoder, TINY)
    half = len(clips) // 2
    first = cache.build(clips[:half], batch_size=2, progress=False)
    assert (first.hits, first.computed) == (0, half)
    rest = FeatureCache(tmp_path / "cache", encoder, TINY).build(clips, batch_size=2, progress=False)
    assert (rest.hits, rest.computed) == (half, len(clips) - half)
    assert len(entries(cache)) == len(clips)


def test_bad_audio_names_the_file(encoder, tmp_path):
    cache = FeatureCache(tmp_path / "cache", encoder, TINY)
    with pytest.raises(FileNotFoundError, match="missing.wav"):
        cache.get([tmp_path / "missing.wav"])
    junk = tmp_path / "junk.wav"
    junk.write_bytes(b"this is not audio")
    with pytest.raises(AudioError, match="junk.wav"):
        cache.get([junk])
    assert not entries(cache)
