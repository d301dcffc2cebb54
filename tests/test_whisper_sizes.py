"""Whisper large-v3's shape: 128 mel bins through the encoder, the feature cache (its key holds the
log-mel settings), training and chat; the DeSTA2.5 config parses and builds on the meta device."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import soundfile as sf

from conftest import ROOT, SAMPLE, TINY_CONFIG

V3 = "tiny-random-whisper-128mel"
MEL_V3 = 128
DESTA25 = ROOT / "configs" / "desta25-llama31-8b-whisper-large-v3.yaml"
FIXTURES = ROOT / "tests" / "fixtures" / "model_configs"


@pytest.fixture(scope="module")
def encoder_v3():
    from speechllm.hub import weights
    from speechllm.model.encoder import load_whisper_encoder

    return load_whisper_encoder(weights.resolve(V3), layers=[1, 2])


def test_128_mel_bins_run_through_the_encoder(encoder_v3, sample_wav):
    feats, lengths = encoder_v3.features([sample_wav[:16000], sample_wav[:24000]])
    assert feats.shape[:2] == (2, MEL_V3) and lengths.tolist() == [100, 150]
    out = encoder_v3(feats, lengths)
    assert out.lengths.tolist() == [50, 75]
    assert all(s.shape == (2, 75, encoder_v3.width) for s in out.states)


def test_the_feature_cache_key_holds_the_mel_settings(encoder_v3, tmp_path):
    from speechllm.training.cache import FeatureCache

    cache = FeatureCache(tmp_path, encoder_v3, V3)
    assert cache.info["feature_extractor"]["feature_size"] == MEL_V3
    other = copy.copy(encoder_v3)
    other.feature_extractor = copy.deepcopy(encoder_v3.feature_extractor)
    other.feature_extractor.hop_length = 320  # another log-mel setting, same weights and taps
    assert FeatureCache(tmp_path, other, V3).folder != cache.folder
    clip = tmp_path / "clip.wav"
    sf.write(clip, np.zeros(16000, dtype=np.float32) + 0.01, 16000)
    (states,) = cache.get([clip])
    assert states[0].shape == (50, encoder_v3.width)
    assert json.loads((cache.folder / "cache.json").read_text())["feature_extractor"]["feature_size"] == MEL_V3


def test_training_and_chat_run_on_a_128_mel_encoder(tmp_path, capsys):
    from speechllm.cli import main
    from speechllm.config import load_config
    from speechllm.io.audio import load_audio
    from speechllm.training.trainer import train

    wav = load_audio(SAMPLE)
    (tmp_path / "audio").mkdir()
    recs = []
    for i in range(4):
        sf.write(tmp_path / "audio" / f"c{i}.wav", wav[i * 8000: i * 8000 + 16000], 16000)
        recs.append({"id": f"c{i}", "audio": f"audio/c{i}.wav", "transcript": "cold hearted",
                     "description": "[00:00-00:01] cold hearted (Gender: Male)", "instruction": "What can you hear?",
                     "target": "A man reads.", "truncated": False})
    (tmp_path / "targets.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    cfg = load_config(TINY_CONFIG, [f"model.encoder.name={V3}", f"train.data={tmp_path / 'targets.jsonl'}",
                                    f"train.out_dir={tmp_path / 'run'}", "train.max_steps=2", "train.batch_size=2",
                                    "train.eval_fraction=0", f"train.cache_dir={tmp_path / 'cache'}"])
    out = train(cfg, progress=False)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(m["loss"]) for m in metrics if "loss" in m)
    capsys.readouterr()
    assert main(["chat", "--checkpoint", str(out), "--audio", str(SAMPLE), "--transcript", "cold hearted",
                 "What can you hear?", "generation.max_new_tokens=3"]) == 0
    assert "answer" in capsys.readouterr().err


def test_the_desta25_config_parses_and_builds_on_the_meta_device():
    from speechllm.config import load_config
    from speechllm.training.plan import meta_models

    cfg = load_config(DESTA25)
    assert cfg.model.encoder.name == "openai/whisper-large-v3" and cfg.model.encoder.layers == [7, 15, 23, 31]
    assert cfg.model.llm.name == "meta-llama/Llama-3.1-8B-Instruct"
    q = cfg.model.adapter.qformer
    assert (q.num_layers, q.num_queries, q.hidden_size) == (6, 64, 1280)
    assert cfg.model.prompt.max_transcript_tokens == 100
    local = load_config(DESTA25, [f"model.encoder.name={FIXTURES / 'whisper-large-v3'}",
                                  f"model.llm.name={FIXTURES / 'llama-3.1-8b-instruct'}"])
    encoder, adapter, llm, _ = meta_models(local.model)
    assert encoder.conv1.in_channels == MEL_V3 and len(encoder.layers) == 32 and encoder.config.d_model == 1280
    assert len(adapter.blocks) == 6 and adapter.queries.shape == (4, 64, 1280) and adapter.proj.out_features == 4096
    assert llm.config.num_hidden_layers == 32 and llm.get_input_embeddings().weight.device.type == "meta"
