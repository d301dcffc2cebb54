"""`speechllm plan`: what a configured training run costs, before any weights are loaded.

The encoder, the adapter and the LLM are built on the meta device from their config.json alone
(an embedded model's converted folder, a local folder, or the Hugging Face hub when reachable; for
the hub models the shipped configs name, their published config.json when it is not),
so the parameter counts are the real modules' counts. Memory per GPU and step time are estimates:

- weights: frozen encoder and LLM in `model.llm.dtype`; the adapter (and LoRA) in float32; with
  mixed precision over a float32 LLM, the half-precision copy of each LLM weight that autocast
  makes and autograd keeps for the backward pass (the LLM's inputs need gradients);
- gradients and AdamW's two moments: float32, trainable parameters only;
- activations of one micro-batch at the configured lengths: what autograd keeps through the
  frozen LLM (its inputs need gradients: `LLM_SAVED_PER_TOKEN` per token per layer, measured on
  transformers' Llama), each layer's attention probabilities when the training kernel keeps them
  (eager, grouped: a CPU's default; a GPU's SDPA keeps none), the target logits in float32, and
  the adapter's own;
- sharding the frozen LLM over N GPUs (FSDP / ZeRO-3 of frozen weights) keeps 1/N of its weights
  per GPU plus the one layer gathered at a time;
- FLOPs per step: 2 per parameter per token forward and 2 backward through the frozen LLM (input
  gradients only) plus its attention's quadratic term, 6 per LoRA parameter per token, three
  times the adapter's own forward (`forward_flops`), and the encoder's forward unless the
  feature cache serves it; step time = FLOPs / (GPUs x
  the stated throughput).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import Config, ConfigError, ModelConfig
from ..errors import SpeechLLMError
from ..hub import weights
from ..model.attention import probability_bytes, training_kernel
from ..model.llm import DTYPES, text_config

BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
"""Bytes per element of a `model.llm.dtype`."""
MASTER_BYTES = 4
"""Trainable weights, their gradients and AdamW moments are float32 (mixed precision keeps masters)."""
ADAM_STATES = 2
"""AdamW keeps two moments per trainable parameter."""
HALF_BYTES = 2
"""Bytes per element of the bf16 / fp16 copies mixed precision computes with."""
LLM_SAVED_HIDDEN = 5.0
LLM_SAVED_KV = 2.0
LLM_SAVED_INTERMEDIATE = 3.0
"""Activations autograd keeps per token per LLM layer when gradients flow to the LLM's inputs
(frozen weights): about 5 x hidden + 2 x key/value width + 3 x intermediate elements (norm
inputs, queries, keys and values, attention output, MLP gate, up and activation), measured with
saved-tensor hooks on transformers' Llama (tests/test_plan.py checks it on the tiny model)."""
PROBABILITY_KERNELS = ("eager", "grouped")
"""Attention kernels whose backward reads the saved attention probabilities (SDPA's recompute them)."""
LOGIT_COPIES = 3
"""Float32 copies of the target logits alive at the peak: the logits, log-softmax, their gradient."""
TEMPLATE_TOKENS = 40
"""Chat-template tokens around one user turn and the assistant header when no tokenizer is at hand
(Llama 3.1's date header makes it ~30)."""
INSTRUCTION_TOKENS = 32
"""Instruction length assumed per example."""
DEFAULT_TFLOPS = 400.0
"""Assumed sustained bf16 throughput per GPU, TFLOP/s (an H100 SXM at ~40% of its 989 dense peak)."""
GIB = 1024 ** 3
TRAIN_FLOPS_PER_FORWARD = 3
"""A trained module's forward, input-gradient and weight-gradient passes: 3 forwards' FLOPs."""
WHISPER_HOP_LENGTH = 160
"""Samples between log-mel frames in every Whisper feature extractor (10 ms at 16 kHz)."""
WHISPER_MEL_FRAMES = 3000
"""Log-mel frames of Whisper's 30 s window (the encoder's positions cover them after a stride-2 conv)."""


class PlanError(SpeechLLMError, ValueError):
    """A model config that cannot be read or built on the meta device."""


@dataclass
class Lengths:
    """Tokens of one training example, by part."""
    template: int
    instruction: int
    transcript: int
    audio: int
    target: int
    audio_frames: int
    """Encoder frames of the longest clip (the adapter's input)."""

    @property
    def sequence(self) -> int:
        return self.template + self.instruction + self.transcript + self.audio + self.target


@dataclass
class Plan:
    encoder_params: int
    adapter_params: int
    llm_params: int
    lora_params: int
    trainable_params: int
    total_params: int
    gpus: int
    batch_size: int
    grad_accum: int
    lengths: Lengths
    dtype: str
    weights_bytes: float
    """Per GPU, nothing sharded."""
    weights_sharded_bytes: float
    """Per GPU, the frozen LLM sharded over `gpus`."""
    cast_bytes: float
    """Per GPU, nothing sharded: the half-precision copies of a float32 LLM's weights that autocast
    makes and the backward pass keeps (0 without mixed precision or with a half-precision LLM)."""
    cast_sharded_bytes: float
    """Per GPU, the frozen LLM sharded: the copies of its shard plus the one gathered layer."""
    grads_bytes: float
    optimizer_bytes: float
    activation_bytes: float
    """One micro-batch of `batch_size` at `lengths`, at the step's peak."""
    saved_activation_bytes: float
    """The part of `activation_bytes` that autograd keeps for backward."""
    tokens_per_step: int
    flops_per_step: float
    tflops: float
    feature_cache: bool
    sources: dict[str, str] = field(default_factory=dict)
    """Where each model's config came from."""

    @property
    def peak_bytes(self) -> float:
        return self.weights_bytes + self.cast_bytes + self.grads_bytes + self.optimizer_bytes + self.activation_bytes

    @property
    def peak_sharded_bytes(self) -> float:
        return (self.weights_sharded_bytes + self.cast_sharded_bytes + self.grads_bytes + self.optimizer_bytes
                + self.activation_bytes)

    @property
    def step_seconds(self) -> float:
        return self.flops_per_step / (self.gpus * self.tflops * 1e12)


# ----------------------------------------------------------------------------- configs and meta models

def _model_config(name: str, key: str):
    """(transformers config of the model `name`, where it came from): an embedded name's converted
    folder, a local folder's config.json, or the hub when reachable."""
    from transformers import AutoConfig

    try:
        path = weights.resolve(name)
    except SpeechLLMError as err:
        raise PlanError(f"{key}: {err}") from None
    folder = Path(path)
    if folder.is_dir():
        if not (folder / "config.json").is_file():
            raise PlanError(f"{key} '{name}': {folder} has no config.json")
        try:
            return AutoConfig.from_pretrained(folder), str(folder / "config.json")
        except (OSError, ValueError, KeyError) as err:
            raise PlanError(f"{key} '{name}': {folder / 'config.json'} cannot be read ({err})") from None
    try:
        weights.check_available(name)
        return AutoConfig.from_pretrained(name), f"hub:{name}"
    except (SpeechLLMError, OSError, ValueError) as err:
        published = weights.published_config(name)
        if published is not None:
            model_type = published.pop("model_type")
            return (AutoConfig.for_model(model_type, **published),
                    "published config.json shipped with speechllm: the hub was not reachable")
        raise PlanError(f"{key} '{name}': its config cannot be had ({err}); offline, point {key} at a local "
                        "folder holding the model's config.json (no weights needed)") from None


def meta_models(cfg: ModelConfig):
    """(encoder, adapter, llm, sources): the configured modules built on the meta device, no
    weights read. The encoder is transformers' `WhisperEncoder`; taps out of its range are a
    `ConfigError`."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    from ..model.adapters import build_adapter

    enc_cfg, enc_src = _model_config(cfg.encoder.name, "model.encoder.name")
    llm_cfg, llm_src = _model_config(cfg.llm.name, "model.llm.name")
    if getattr(enc_cfg, "model_type", None) != "whisper":
        raise PlanError(f"model.encoder.name '{cfg.encoder.name}': a {enc_cfg.model_type} config, not Whisper")
    n_blocks = enc_cfg.encoder_layers
    bad = [i for i in cfg.encoder.layers if not 0 <= i <= n_blocks]
    if bad:
        raise ConfigError(f"model.encoder.layers: {bad} out of range; this encoder has hidden states 0..{n_blocks}")
    with torch.device("meta"):
        encoder = WhisperEncoder(enc_cfg)
        llm = AutoModelForCausalLM.from_config(llm_cfg, trust_remote_code=cfg.llm.trust_remote_code)
        try:
            adapter = build_adapter(cfg.adapter, encoder_width=enc_cfg.d_model, num_taps=len(cfg.encoder.layers),
                                    llm_width=llm.get_input_embeddings().embedding_dim)
        except ValueError as err:
            raise ConfigError(f"model.adapter: {err}") from None
    return encoder, adapter, llm, {"encoder": enc_src, "llm": llm_src}


def _params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def lora_params(llm, cfg: Config) -> int:
    """Parameters LoRA adds to the LLM's `target_modules` linears (r x (in + out) each)."""
    lora = cfg.train.lora
    if not lora.enabled:
        return 0
    total = 0
    for name, module in llm.named_modules():
        if name.rsplit(".", 1)[-1] in lora.target_modules and hasattr(module, "in_features"):
            total += lora.r * (module.in_features + module.out_features)
    return total


# ----------------------------------------------------------------------------- the estimate

def default_lengths(cfg: Config, encoder, adapter, template_tokens: int = TEMPLATE_TOKENS) -> Lengths:
    """Lengths of the longest example the configuration trains on: a clip of `model.encoder.max_seconds`
    with a full transcript and a full target."""
    import torch

    frames = min(encoder.config.max_source_positions, int(cfg.model.encoder.max_seconds * _frames_per_second(encoder)))
    audio = int(adapter.output_length(torch.tensor([frames]))[0])
    return Lengths(template=template_tokens, instruction=INSTRUCTION_TOKENS,
                   transcript=cfg.model.prompt.max_transcript_tokens, audio=audio,
                   target=cfg.train.max_target_tokens, audio_frames=frames)


def _frames_per_second(encoder) -> float:
    """Encoder frames per second of audio (Whisper: 1500 in 30 s), from its config alone."""
    from ..io.audio import SAMPLE_RATE

    return SAMPLE_RATE / WHISPER_HOP_LENGTH * encoder.config.max_source_positions / WHISPER_MEL_FRAMES


def _llm_dims(llm) -> tuple[int, int, int, int, int]:
    c = text_config(llm)
    hidden = c.hidden_size
    inter = getattr(c, "intermediate_size", None) or 4 * hidden
    return hidden, inter, c.num_hidden_layers, c.num_attention_heads, c.vocab_size


def _kv_width(llm) -> int:
    c = text_config(llm)
    heads = c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    return (getattr(c, "num_key_value_heads", None) or heads) * head_dim


def saved_activation_bytes(llm, adapter, lengths: Lengths, batch_size: int, act_bytes: int,
                           probabilities: bool = False) -> float:
    """What autograd keeps for backward over one micro-batch: per token per frozen LLM layer
    `LLM_SAVED_HIDDEN` x hidden + `LLM_SAVED_KV` x key/value width + `LLM_SAVED_INTERMEDIATE` x
    intermediate elements; with `probabilities` (an eager or grouped training kernel) each layer's
    attention probabilities (`probability_bytes`); the float32 target logits once, and the adapter's own."""
    hidden, inter, layers, heads, vocab = _llm_dims(llm)
    tokens = batch_size * lengths.sequence
    per_token = LLM_SAVED_HIDDEN * hidden + LLM_SAVED_KV * _kv_width(llm) + LLM_SAVED_INTERMEDIATE * inter
    seq = lengths.sequence
    scores = probability_bytes(batch_size, heads, seq, seq, layers, act_bytes) if probabilities else 0
    logits = batch_size * lengths.target * vocab * MASTER_BYTES
    adapter_bytes = adapter.saved_elements(batch_size, lengths.audio_frames) * MASTER_BYTES  # trains in float32
    return tokens * layers * per_token * act_bytes + scores + logits + adapter_bytes


def activation_bytes(cfg: Config, llm, adapter, lengths: Lengths, batch_size: int, act_bytes: int,
                     encoder=None, probabilities: bool = False) -> float:
    """Activation memory at the step's peak: the saved activations plus what lives beside them at
    the loss (`LOGIT_COPIES` - 1 more float32 copies of the target logits), the padded batch's 4-D
    attention mask and the input embeddings with their gradient; with the feature cache off, the
    frozen encoder's forward (before anything is saved) when that is larger."""
    hidden, _, _, _, vocab = _llm_dims(llm)
    seq = lengths.sequence
    transient = ((LOGIT_COPIES - 1) * batch_size * lengths.target * vocab * MASTER_BYTES
                 + batch_size * seq * seq * act_bytes + 2 * batch_size * seq * hidden * act_bytes)
    at_loss = saved_activation_bytes(llm, adapter, lengths, batch_size, act_bytes, probabilities) + transient
    if encoder is not None and not cfg.train.feature_cache:  # the encoder runs before anything is saved
        return max(at_loss, encoder_forward_bytes(encoder, lengths, batch_size, BYTES[cfg.model.llm.dtype]))
    return at_loss


def encoder_forward_bytes(encoder, lengths: Lengths, batch_size: int, dtype_bytes: int) -> float:
    """Peak of the frozen encoder's forward without gradients: one block's attention scores and
    probabilities (heads x frames x frames), queries / keys / values / output and FFN hidden, per clip."""
    c = encoder.config
    frames = lengths.audio_frames
    per_clip = (2 * c.encoder_attention_heads * frames * frames + 4 * frames * c.d_model + frames * c.encoder_ffn_dim)
    return batch_size * per_clip * dtype_bytes


def flops_per_step(cfg: Config, encoder, llm, adapter, params: dict[str, int], lengths: Lengths,
                   global_batch: int) -> float:
    """Forward and backward FLOPs of one optimizer step over `global_batch` examples."""
    hidden, _, layers, _, _ = _llm_dims(llm)
    seq = lengths.sequence
    tokens = global_batch * seq
    # the frozen LLM: forward and the input-gradient backward, 2 FLOPs per weight per token each
    llm_flops = 4 * params["llm"] * tokens + 4 * layers * seq * seq * hidden * global_batch
    lora_flops = 2 * TRAIN_FLOPS_PER_FORWARD * params["lora"] * tokens
    adapter_flops = TRAIN_FLOPS_PER_FORWARD * adapter.forward_flops(global_batch, lengths.audio_frames)
    encoder_flops = 0
    if not cfg.train.feature_cache:  # the frozen encoder's forward inside the step
        frames, c = lengths.audio_frames, encoder.config
        encoder_flops = global_batch * (2 * params["encoder"] * frames + 4 * c.encoder_layers * frames * frames * c.d_model)
    return llm_flops + lora_flops + adapter_flops + encoder_flops


def make_plan(cfg: Config, gpus: int = 1, batch_size: int | None = None, tflops: float = DEFAULT_TFLOPS,
              lengths: Lengths | None = None, device: str = "cuda") -> Plan:
    """The plan of `cfg` on `gpus` GPUs with `batch_size` examples per GPU (default
    `train.batch_size`) at `lengths` (default: the longest example the configuration trains on);
    `device` (a GPU's `cuda`, or `cpu`) decides the training attention kernel `auto` picks."""
    if gpus < 1:
        raise PlanError(f"--gpus must be at least 1, got {gpus}")
    if tflops <= 0:
        raise PlanError(f"--tflops must be positive, got {tflops}")
    batch = cfg.train.batch_size if batch_size is None else batch_size
    if batch < 1:
        raise PlanError(f"--batch-size must be at least 1, got {batch}")
    encoder, adapter, llm, sources = meta_models(cfg.model)
    params = {"encoder": _params(encoder), "adapter": _params(adapter), "llm": _params(llm),
              "lora": lora_params(llm, cfg)}
    lengths = lengths or default_lengths(cfg, encoder, adapter)
    dtype = cfg.model.llm.dtype
    frozen_bytes = BYTES[dtype]
    act_bytes = BYTES[dtype] if cfg.train.mixed_precision == "no" else 2
    trainable = params["adapter"] + params["lora"]
    frozen = (params["encoder"] + params["llm"]) * frozen_bytes
    one_layer = params["llm"] / max(1, _llm_dims(llm)[2]) * frozen_bytes
    weights_b = frozen + trainable * MASTER_BYTES
    sharded = (params["encoder"] * frozen_bytes + params["llm"] * frozen_bytes / gpus
               + (one_layer if gpus > 1 else 0) + trainable * MASTER_BYTES)
    casts = cfg.train.mixed_precision != "no" and frozen_bytes > HALF_BYTES
    cast_b = params["llm"] * HALF_BYTES if casts else 0
    cast_sharded = cast_b / gpus + (one_layer / frozen_bytes * HALF_BYTES if casts and gpus > 1 else 0)
    _, _, layers, heads, _ = _llm_dims(llm)
    kept = probability_bytes(batch, heads, lengths.sequence, lengths.sequence, layers, act_bytes)
    kernel = training_kernel(cfg.model.llm.train_attn_implementation, torch.device(device),
                             DTYPES[cfg.model.llm.dtype], kept)
    probabilities = (kernel or cfg.model.llm.attn_implementation) in PROBABILITY_KERNELS
    acts = activation_bytes(cfg, llm, adapter, lengths, batch, act_bytes, encoder, probabilities)
    saved = saved_activation_bytes(llm, adapter, lengths, batch, act_bytes, probabilities)
    global_batch = batch * gpus * cfg.train.grad_accum
    return Plan(
        encoder_params=params["encoder"], adapter_params=params["adapter"], llm_params=params["llm"],
        lora_params=params["lora"], trainable_params=trainable, total_params=sum(params.values()), gpus=gpus,
        batch_size=batch, grad_accum=cfg.train.grad_accum, lengths=lengths, dtype=dtype, weights_bytes=weights_b,
        weights_sharded_bytes=sharded, cast_bytes=cast_b, cast_sharded_bytes=cast_sharded,
        grads_bytes=trainable * MASTER_BYTES,
        optimizer_bytes=trainable * MASTER_BYTES * ADAM_STATES, activation_bytes=acts, saved_activation_bytes=saved,
        tokens_per_step=global_batch * lengths.sequence,
        flops_per_step=flops_per_step(cfg, encoder, llm, adapter, params, lengths, global_batch), tflops=tflops,
        feature_cache=cfg.train.feature_cache, sources=sources)


# ----------------------------------------------------------------------------- output

def _count(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(int(n))


def _gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB"


def format_plan(plan: Plan, cfg: Config, gpu_memory_gb: float | None = None) -> str:
    """The plan as the lines `speechllm plan` prints."""
    L = plan.lengths
    lines = [
        f"models      encoder {cfg.model.encoder.name} ({plan.sources['encoder']})",
        f"            llm     {cfg.model.llm.name} ({plan.sources['llm']})",
        f"parameters  total {_count(plan.total_params)} = encoder {_count(plan.encoder_params)} (frozen) + "
        f"llm {_count(plan.llm_params)} (frozen) + adapter {_count(plan.adapter_params)}"
        + (f" + lora {_count(plan.lora_params)}" if plan.lora_params else ""),
        f"            trainable {plan.trainable_params:,} ({_count(plan.trainable_params)})",
        f"lengths     {L.sequence} tokens per example = template {L.template} + instruction {L.instruction} + "
        f"transcript {L.transcript} + audio {L.audio} + target {L.target} (clip {L.audio_frames} encoder frames)",
        f"batch       {plan.batch_size} per GPU x {plan.gpus} GPU(s) x {plan.grad_accum} accumulation = "
        f"{plan.batch_size * plan.gpus * plan.grad_accum} examples, {plan.tokens_per_step:,} tokens per step",
        f"memory/GPU  weights {_gib(plan.weights_bytes)} ({plan.dtype} frozen, float32 trainable)"
        + (f" + their {_gib(plan.cast_bytes)} autocast copies" if plan.cast_bytes else "") + ", gradients "
        f"{_gib(plan.grads_bytes)}, AdamW {_gib(plan.optimizer_bytes)}, activations {_gib(plan.activation_bytes)} "
        f"(batch {plan.batch_size})",
        f"            peak {_gib(plan.peak_bytes)} without sharding; {_gib(plan.peak_sharded_bytes)} with the frozen "
        f"LLM sharded over {plan.gpus} GPU(s) (weights {_gib(plan.weights_sharded_bytes)})",
        f"step        {plan.flops_per_step / 1e12:,.1f} TFLOP per step; ~{plan.step_seconds:.2f} s at {plan.tflops:g} "
        f"TFLOP/s per GPU" + ("" if plan.feature_cache else " (encoder forward included: feature cache off)"),
    ]
    if gpu_memory_gb is not None:
        budget = gpu_memory_gb * GIB
        fits = [("without sharding", plan.peak_bytes), ("sharded", plan.peak_sharded_bytes)]
        verdict = "; ".join(f"{what}: {'fits' if need <= budget else 'does NOT fit'}" for what, need in fits)
        per_example = max(1.0, plan.activation_bytes / plan.batch_size)
        room = budget - (plan.peak_sharded_bytes - plan.activation_bytes)
        lines.append(f"fit         {gpu_memory_gb:g} GiB per GPU: {verdict}; at most ~{max(0, int(room // per_example))} "
                     "examples per GPU with sharding")
    return "\n".join(lines)


def plan_json(plan: Plan) -> str:
    """The plan as JSON (every figure, bytes and FLOPs unrounded)."""
    from dataclasses import asdict

    out = asdict(plan)
    out.update(peak_bytes=plan.peak_bytes, peak_sharded_bytes=plan.peak_sharded_bytes,
               step_seconds=plan.step_seconds, sequence_tokens=plan.lengths.sequence)
    return json.dumps(out, indent=2)
