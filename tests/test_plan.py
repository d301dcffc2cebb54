"""`speechllm plan`: counts from meta-device models equal the built models', the saved
activations against autograd's saved tensors, the DeSTA2 / DeSTA2.5 recipes' trainable parameters,
the command on the three shipped configs, and (slow) peak memory against a measured CPU run."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import ROOT, TINY_CONFIG

FIXTURES = ROOT / "tests" / "fixtures" / "model_configs"
DESTA2 = ROOT / "configs" / "desta2-llama3-8b-whisper-small.yaml"
DESTA25 = ROOT / "configs" / "desta25-llama31-8b-whisper-large-v3.yaml"
LOCAL = {DESTA2: [f"model.encoder.name={FIXTURES / 'whisper-small'}",
                  f"model.llm.name={FIXTURES / 'meta-llama-3-8b-instruct'}"],
         DESTA25: [f"model.encoder.name={FIXTURES / 'whisper-large-v3'}",
                   f"model.llm.name={FIXTURES / 'llama-3.1-8b-instruct'}"]}
DESTA2_TRAINABLE = 22e6
"""DeSTA2's trainable parameters (its paper: ~22M)."""
PEAK_TOLERANCE = 0.25


def qformer_params(width: int, blocks: int, taps: int, queries: int, llm_width: int, ffn_mult: int = 4) -> int:
    """A DeSTA Q-Former counted from the recipe: per block self- and cross-attention (4 linears
    each) + FFN + 3 LayerNorms; per-layer queries, per-query layer weights, LayerNorm + Linear out."""
    linear = lambda i, o: i * o + o  # noqa: E731
    block = 8 * linear(width, width) + linear(width, ffn_mult * width) + linear(ffn_mult * width, width) + 3 * 2 * width
    return blocks * block + taps * queries * width + queries * taps + 2 * width + linear(width, llm_width)


def test_meta_counts_equal_the_built_models(tiny_cfg, tiny_model):
    from speechllm.training.plan import make_plan

    plan = make_plan(tiny_cfg)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert plan.encoder_params == count(tiny_model.encoder)
    assert plan.adapter_params == count(tiny_model.adapter) == plan.trainable_params
    assert plan.llm_params == count(tiny_model.llm)


def test_lora_parameters_are_the_ones_peft_adds(tiny_cfg):
    import torch

    from speechllm.config import load_config
    from speechllm.model import build_model
    from speechllm.model.lora import apply_lora
    from speechllm.training.plan import make_plan

    cfg = load_config(TINY_CONFIG, ["train.lora.enabled=true", "train.lora.r=4",
                                    "train.lora.target_modules=[q_proj, v_proj, down_proj]"])
    torch.manual_seed(0)
    model = build_model(cfg)
    apply_lora(model, cfg.train.lora)
    plan = make_plan(cfg)
    assert plan.trainable_params == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert plan.lora_params > 0


@pytest.mark.parametrize("overrides", [[], ["model.adapter.kind=mlp"]])
def test_the_saved_activations_are_what_autograd_keeps(overrides, sample_wav):
    """Bytes of every tensor autograd saves in one training forward of the tiny model (weights
    aside) against the plan's saved-activation figure for the same batch and lengths."""
    import torch

    from speechllm.config import load_config
    from speechllm.model import Example, build_model
    from speechllm.training.plan import Lengths, make_plan

    cfg = load_config(TINY_CONFIG, overrides)
    torch.manual_seed(0)
    model = build_model(cfg)
    batch, instruction, transcript = 4, "What can you hear?", "cold hearted"
    target = "A man reads a passage in a calm voice. " * 12
    examples = [Example(instruction, audio=sample_wav, transcript=transcript, target=target)] * batch
    pieces = model.prompt.pieces(instruction, transcript)
    frames = int(model.encoder.output_frames(len(sample_wav) * 100 // 16000))
    n_tr, n_in = len(model.prompt.text(transcript)), len(model.prompt.text(instruction))
    lengths = Lengths(template=len(pieces.before_audio) + len(pieces.after_audio) - n_tr - n_in, instruction=n_in,
                      transcript=n_tr, audio=model.audio_positions(frames=frames),
                      target=len(model.prompt.target(target)), audio_frames=frames)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(examples)
    plan = make_plan(cfg, batch_size=batch, lengths=lengths, device="cpu")  # the kernel this CPU trains with
    measured = sum(saved.values())
    print(f"saved activations: plan {plan.saved_activation_bytes:.0f} B, autograd {measured} B")
    assert abs(plan.saved_activation_bytes - measured) <= PEAK_TOLERANCE * measured, (plan.saved_activation_bytes,
                                                                                      measured)


def test_desta2_trainable_parameters_are_the_recipes():
    from speechllm.config import load_config
    from speechllm.training.plan import make_plan

    plan = make_plan(load_config(DESTA2, LOCAL[DESTA2]))
    assert plan.trainable_params == qformer_params(768, 2, 4, 64, 4096)
    assert abs(plan.trainable_params - DESTA2_TRAINABLE) < 0.05 * DESTA2_TRAINABLE
    assert 8.0e9 < plan.llm_params < 8.1e9  # Llama-3-8B: 8.03B


def test_desta25_trainable_parameters_are_the_recipes():
    from speechllm.config import load_config
    from speechllm.training.plan import make_plan

    plan = make_plan(load_config(DESTA25, LOCAL[DESTA25]), gpus=8)
    assert plan.trainable_params == qformer_params(1280, 6, 4, 64, 4096)
    assert 6.3e8 < plan.encoder_params < 6.4e8  # Whisper large-v3's encoder: 637M
    assert plan.batch_size * plan.gpus == 96  # DeSTA2.5's 96 per step
    assert plan.weights_sharded_bytes < plan.weights_bytes / 2


@pytest.mark.parametrize("config", ["configs/default.yaml", DESTA2, DESTA25])
def test_plan_prints_for_the_shipped_configs(config, capsys):
    from speechllm.cli import main

    # the default tier has no embedded weights: configs/default.yaml with the tiny stand-ins
    extra = LOCAL.get(config, ["model.encoder.name=tiny-random-whisper", "model.encoder.layers=[1,2]",
                               "model.llm.name=tiny-random-llama"])
    assert main(["plan", "--config", str(config), "--gpus", "8", "--gpu-memory", "80", *extra]) == 0
    out = capsys.readouterr().out
    for line in ("parameters", "trainable", "memory/GPU", "without sharding", "with the frozen LLM sharded",
                 "tokens per step", "TFLOP/s per GPU", "80 GiB per GPU"):
        assert line in out


def test_an_unreachable_model_config_is_a_clear_error(monkeypatch, capsys):
    from speechllm.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["plan", "--config", str(DESTA25), "model.llm.name=some-lab/unpublished-8b"]) == 2
    err = capsys.readouterr().err
    assert "model.llm.name 'some-lab/unpublished-8b'" in err and "config.json" in err


@pytest.mark.parametrize("flag, value, message", [
    ("--gpus", "0", "--gpus must be at least 1, got 0"),
    ("--batch-size", "0", "--batch-size must be at least 1, got 0"),  # not silently train.batch_size
    ("--tflops", "0", "--tflops must be positive"),  # not silently the default throughput
    ("--gpu-memory", "-3", "--gpu-memory must be positive"),
])
def test_bad_plan_flags_are_clear_errors(flag, value, message, capsys):
    from speechllm.cli import main

    assert main(["plan", "--config", str(TINY_CONFIG), flag, value]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("config", [DESTA2, DESTA25])
def test_the_shipped_gpu_configs_plan_offline_from_published_configs(config, monkeypatch):
    """Without the hub, the hub models the shipped configs name are planned from the published
    config.json speechllm ships, and count as the local folders of the same dimensions do."""
    from speechllm.config import load_config
    from speechllm.training.plan import make_plan

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    offline = make_plan(load_config(config))
    local = make_plan(load_config(config, LOCAL[config]))
    assert all("published config.json" in src for src in offline.sources.values())
    assert (offline.encoder_params, offline.llm_params, offline.trainable_params) == (
        local.encoder_params, local.llm_params, local.trainable_params)


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [[], ["train.feature_cache=false"]])
def test_plan_peak_memory_against_a_measured_cpu_run(overrides):
    """The embedded default: a real training step on the CPU (tapped states from the feature cache,
    or the encoder inside the step), peak RSS over it against the plan's peak for the same lengths."""
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "measure_plan.py"), "--batch-size", "4",
                           "--steps", "1", *overrides], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert abs(result["ratio"] - 1) <= PEAK_TOLERANCE, result


def test_mixed_precision_over_a_float32_llm_counts_the_autocast_copies():
    """bf16 autocast over float32 LLM weights keeps a 2-byte copy of each for the backward pass (the
    first GPU run measured 1.26x the plan without them, 1.08x with); a bf16 LLM has none to make."""
    from speechllm.config import load_config
    from speechllm.training.plan import make_plan

    local = LOCAL[DESTA2]
    plain = make_plan(load_config(DESTA2, local + ["model.llm.dtype=float32", "train.mixed_precision=bf16"]))
    assert plain.cast_bytes == plain.llm_params * 2
    assert plain.peak_bytes - plain.cast_bytes == pytest.approx(
        plain.weights_bytes + plain.grads_bytes + plain.optimizer_bytes + plain.activation_bytes)
    assert make_plan(load_config(DESTA2, local)).cast_bytes == 0  # the recipe's LLM is bf16 already
    sharded = make_plan(load_config(DESTA2, local + ["model.llm.dtype=float32", "train.mixed_precision=bf16"]), gpus=8)
    assert plain.cast_bytes / 8 < sharded.cast_sharded_bytes < plain.cast_bytes / 4  # a shard + one layer
