from pathlib import Path

import pytest

from speechllm.config import Config, ConfigError, load_config, parse_overrides, to_dict

ROOT = Path(__file__).resolve().parent.parent


def test_default_yaml_is_the_dataclass_default():
    # `speechllm chat --untrained` without --config uses the dataclass defaults; the shipped
    # configs/default.yaml must describe exactly the same model.
    assert to_dict(load_config(ROOT / "configs" / "default.yaml")) == to_dict(Config())


def test_unknown_key_names_file_and_suggests(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  adapter:\n    qformer:\n      num_querys: 8\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*num_querys.*did you mean 'num_queries'"):
        load_config(bad)


def test_wrong_type_is_an_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  encoder:\n    layers: two\n")
    with pytest.raises(ConfigError, match="model.encoder.layers: expected a list"):
        load_config(bad)
    with pytest.raises(ConfigError, match="expected an integer"):
        load_config(None, ["generation.max_new_tokens=1.5"])


def test_overrides_apply_after_yaml():
    cfg = load_config(ROOT / "configs" / "tiny.yaml", ["model.adapter.kind=mlp", "model.encoder.layers=[2]",
                                                      "generation.temperature=1"])
    assert cfg.model.adapter.kind == "mlp"
    assert cfg.model.encoder.layers == [2]
    assert cfg.generation.temperature == 1.0 and isinstance(cfg.generation.temperature, float)
    assert cfg.model.adapter.qformer.num_queries == 4  # from the yaml, untouched
    with pytest.raises(ConfigError, match="unknown key 'nope'"):
        load_config(None, ["model.nope=1"])
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_overrides(["model.adapter.kind"])


def test_desta2_recipe_parses():
    cfg = load_config(ROOT / "configs" / "desta2-llama3-8b-whisper-small.yaml")
    assert cfg.model.encoder.name == "openai/whisper-small"
    assert cfg.model.encoder.layers == [2, 5, 8, 11]
    q = cfg.model.adapter.qformer
    assert (cfg.model.adapter.kind, q.num_layers, q.num_queries, q.hidden_size) == ("qformer", 2, 64, 768)
    assert cfg.model.llm.name == "meta-llama/Meta-Llama-3-8B-Instruct"
    t = cfg.train
    assert (t.lr, t.betas, t.weight_decay, t.schedule, t.warmup_steps, t.mixed_precision, t.grad_clip) == \
        (1e-4, [0.9, 0.98], 0.01, "cosine", 2000, "bf16", 1.0)
