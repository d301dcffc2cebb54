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


def test_enumerated_settings_are_checked_at_load_with_the_key():
    with pytest.raises(ConfigError, match=r"train.schedule: 'linear' is not one of cosine, constant"):
        load_config(None, ["train.schedule=linear"])
    with pytest.raises(ConfigError, match=r"model.llm.dtype: 'bf16' is not one of .*bfloat16"):
        load_config(None, ["model.llm.dtype=bf16"])
    with pytest.raises(ConfigError, match=r"did you mean 'self-output'"):
        load_config(None, ["targets.strategy=self_output"])
    with pytest.raises(ConfigError, match=r"eval.data_format: 'csv' is not one of"):
        load_config(None, None, {"eval": {"data_format": "csv"}})


def test_one_system_prompt_a_moved_key_says_where_it_went():
    with pytest.raises(ConfigError, match=r"'system_prompt' moved to model.llm.system_prompt"):
        load_config(None, ["targets.system_prompt=Be brief."])


def test_every_stage_lives_in_one_config_and_every_field_is_documented():
    import dataclasses

    from speechllm.config import field_docs

    cfg = Config()
    assert {f.name for f in dataclasses.fields(cfg)} >= {"model", "generation", "targets", "train", "annotate", "eval",
                                                         "serve"}

    def walk(obj):
        docs = field_docs(type(obj))
        for f in dataclasses.fields(obj):
            assert docs.get(f.name), f"{type(obj).__name__}.{f.name} has no docstring"
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                walk(value)

    walk(cfg)


def test_command_flags_are_derived_from_the_config_fields():
    """`speechllm eval --batch-size 4 --tasks gender speed --no-...` override the `eval:` section,
    flags not given leave the config as it is, list flags also take commas."""
    import argparse

    from speechllm.cli import annotate as annotate_cmd
    from speechllm.cli import eval as eval_cmd
    from speechllm.cli.common import config_from_args

    sub = argparse.ArgumentParser().add_subparsers()
    eval_cmd.add_parser(sub)
    annotate_cmd.add_parser(sub)
    args = sub.choices["eval"].parse_args(["--checkpoint", "c", "--data", "d", "--out", "o", "--batch-size", "4",
                                           "--tasks", "gender,speed", "pitch", "eval.seed=3"])
    cfg = config_from_args(args)
    assert (cfg.eval.batch_size, cfg.eval.tasks, cfg.eval.seed) == (4, ["gender", "speed", "pitch"], 3)
    assert cfg.eval.if_max_new_tokens == 192  # not given: the default
    with pytest.raises(SystemExit):
        sub.choices["eval"].parse_args(["--checkpoint", "c", "--data", "d", "--out", "o", "--text-prompt-set", "x"])
    args = sub.choices["annotate"].parse_args(["m.jsonl", "--out", "o.jsonl", "--trust-labels", "--workers", "1"])
    cfg = config_from_args(args).annotate
    assert (cfg.trust_labels, cfg.workers, cfg.dnsmos) == (True, 1, False)
    helptext = sub.choices["eval"].format_help()
    assert "--if-max-new-tokens N" in helptext and "Answer length for forgetting items" in helptext


@pytest.mark.parametrize("override, message", [
    ("train.grad_accum=0", "train.grad_accum: must be at least 1, got 0"),
    ("train.max_steps=0", "train.max_steps: must be at least 1, got 0"),
    ("train.max_steps=-5", "train.max_steps: must be at least 1, got -5"),
    ("train.batch_size=0", "train.batch_size: must be at least 1, got 0"),
    ("train.lr=nan", "train.lr: must be a finite number, got nan"),
    ("train.lr=-0.001", "train.lr: must be greater than 0, got -0.001"),
    ("train.eval_fraction=1.5", r"train.eval_fraction: must be in \[0, 1\), got 1.5"),
    ("train.token_masking=1", r"train.token_masking: must be in \[0, 1\), got 1.0"),
    ("train.betas=[0.9]", "train.betas: needs exactly 2 item"),
    ("train.betas=[0.9, 1.5]", r"train.betas: item 1: must be in \[0, 1\)"),
    ("model.encoder.layers=[]", "model.encoder.layers: needs at least 1 item"),
    ("model.encoder.layers=[-1]", "model.encoder.layers: item 0: must be at least 0"),
    ("model.adapter.qformer.dropout=1", r"model.adapter.qformer.dropout: must be in \[0, 1\)"),
    ("generation.top_p=0", r"generation.top_p: must be in \(0, 1\]"),
    ("generation.temperature=0", "generation.temperature: must be greater than 0"),
    ("generation.max_new_tokens=0", "generation.max_new_tokens: must be at least 1"),
    ("targets.min_transcript_recall=2", r"targets.min_transcript_recall: must be in \[0, 1\]"),
    ("annotate.workers=0", "annotate.workers: must be at least 1"),
    ("eval.bootstrap=0", "eval.bootstrap: must be at least 1"),
    ("serve.port=70000", r"serve.port: must be in \[0, 65535\]"),
    ("serve.max_upload_mb=-1", "serve.max_upload_mb: must be greater than 0"),
])
def test_impossible_settings_fail_at_load_naming_the_key(override, message, tmp_path):
    with pytest.raises(ConfigError, match=f"override: {message}"):
        load_config(ROOT / "configs" / "tiny.yaml", [override])
    # the same rule, the same message, from a YAML file
    import yaml

    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(parse_overrides([override])))
    with pytest.raises(ConfigError, match=f"bad.yaml: {message}"):
        load_config(bad)


def test_every_numeric_setting_has_a_range_rule():
    """Each int or float setting (alone, optional or in a list) of every config section states
    the values it may take, and every default satisfies it."""
    import dataclasses
    import typing

    from speechllm.config import RANGE

    def numeric(tp) -> bool:
        args = [a for a in typing.get_args(tp) if a is not type(None)] or [tp]
        return any(a in (int, float) or typing.get_origin(a) is list and typing.get_args(a)[0] in (int, float)
                   for a in args)

    def walk(cls, where):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            if dataclasses.is_dataclass(tp):
                walk(tp, f"{where}.{f.name}")
            elif numeric(tp):
                assert RANGE in f.metadata, f"{where}.{f.name} has no range rule"
                default = getattr(cls(), f.name)
                assert f.metadata[RANGE].problem(default) is None, f"{where}.{f.name}: default {default!r}"

    walk(Config, "config")
