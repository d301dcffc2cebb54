"""What this machine and a model allow at best, for the benchmarks (scripts/bench_*.py):
the matmul peak (in the model's dtype), the memory-copy bandwidth, a model's weight bytes, and the FLOPs a causal
LLM spends per position (linear layers, attention scores over the context, the LM head).

- compute bound: FLOPs of the work / measured matmul peak;
- memory bound: a forward pass reads every weight once, so one decoding step of a batch cannot be
  faster than weight bytes / copy bandwidth (bytes read + written per second, STREAM's "copy").
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import get_args, get_type_hints

import torch
from torch import nn

MATMUL_N = 1024
"""Side of the square matmul whose speed is the peak."""
COPY_BYTES = 512 * 2 ** 20
"""Bytes of the tensor copied to measure the bandwidth (far beyond any cache)."""
ATTENTION_FLOPS_PER_KEY = 4
"""Per layer, hidden unit and attended position: QK^T and the weighted sum of V, 2 FLOPs each."""


def clock(cpu_time: bool):
    """The timer the benchmarks read: wall time, or (`cpu_time`) this process's CPU time, which
    other work on a shared machine inflates far less (with one thread, where no thread spins
    waiting for another)."""
    return time.process_time if cpu_time else time.perf_counter


def matmul_peak(repeats: int = 10, now=time.perf_counter, dtype: torch.dtype = torch.float32) -> float:
    """FLOP/s of a large square matmul in `dtype` on this machine (best of `repeats`, by the clock
    `now`): the peak of the dtype the benchmarked model computes in."""
    a, b = torch.randn(MATMUL_N, MATMUL_N, dtype=dtype), torch.randn(MATMUL_N, MATMUL_N, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t0 = now()
        a @ b
        best = min(best, now() - t0)
    return 2 * MATMUL_N ** 3 / best


def copy_bandwidth(repeats: int = 5, now=time.perf_counter) -> float:
    """Bytes read + written per second by a large tensor copy (best of `repeats`, by the clock
    `now`)."""
    src = torch.ones(COPY_BYTES // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        t0 = now()
        dst.copy_(src)
        best = min(best, now() - t0)
    return 2 * COPY_BYTES / best


def weight_bytes(model: nn.Module) -> int:
    """Bytes of distinct parameter storage (tied embeddings count once)."""
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


@dataclass
class LLMFlops:
    """FLOPs of a causal LLM's forward pass, by part."""
    linear_params: int
    """Weights of the decoder's linear layers (embedding table and LM head excluded)."""
    layers: int
    hidden: int
    """Attention width (heads x head size)."""
    head_params: int
    """Weights of the LM head (vocabulary x width)."""

    @classmethod
    def of(cls, llm: nn.Module) -> "LLMFlops":
        decoder = llm.get_decoder()
        linear = sum(m.weight.numel() for m in decoder.modules() if isinstance(m, nn.Linear))
        cfg = llm.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        return cls(linear_params=linear, layers=cfg.num_hidden_layers, hidden=cfg.num_attention_heads * head_dim,
                   head_params=llm.get_output_embeddings().weight.numel())

    def forward(self, positions: int, attended: int, head_positions: int) -> float:
        """FLOPs of running `positions` positions that attend to `attended` positions in all
        (summed over them), with the LM head on `head_positions` of them."""
        return (2 * self.linear_params * positions + ATTENTION_FLOPS_PER_KEY * self.layers * self.hidden * attended
                + 2 * self.head_params * head_positions)

    def training(self, positions: int, attended: int, head_positions: int) -> float:
        """FLOPs of a training pass over `positions` positions (see `forward`) that computes the
        gradients of the activations only, as for a frozen LLM under a trained adapter: the forward,
        then each linear layer's and the LM head's product once more (the gradient of its input), and
        attention's two products twice (the gradients of scores and values, then of queries and keys)."""
        return 2 * self.forward(positions, attended, head_positions) + ATTENTION_FLOPS_PER_KEY * self.layers * \
            self.hidden * attended

    def generation(self, prompt_lengths: list[int], new_tokens: list[int], shared: int = 0) -> float:
        """FLOPs of answering prompts of `prompt_lengths` with `new_tokens` tokens each (the stop
        token included): the prefill (logits at the last prompt position only, as `generate`
        computes them; the first `shared` positions run once for all prompts with prefix reuse),
        then each new token but the last fed back, attending to everything before it."""
        total = self.forward(shared, shared * (shared + 1) // 2, 0)
        for p, n in zip(prompt_lengths, new_tokens):
            total += self.forward(p - shared, (p * (p + 1) - shared * (shared + 1)) // 2, 1)
            fed = max(n - 1, 0)
            total += self.forward(fed, fed * p + fed * (fed + 1) // 2, fed)
        return total


@dataclass
class WhisperFlops:
    """FLOPs of a Whisper encoder-decoder transcribing one clip (greedy), by its config's dimensions."""
    width: int
    """d_model: every layer's width."""
    encoder_layers: int
    decoder_layers: int
    encoder_ffn: int
    """Hidden width of an encoder layer's MLP."""
    decoder_ffn: int
    """Hidden width of a decoder layer's MLP."""
    mels: int
    """Log-mel channels in (the first convolution's input)."""
    vocab: int
    """Tokens the LM head scores."""
    mel_frames_per_second: int = 100
    """Log-mel frames per second of audio (Whisper's 10 ms hop)."""
    window_seconds: float = 30.0
    """The window every input is padded to (Whisper's 3000 mel frames)."""

    @classmethod
    def of(cls, config) -> "WhisperFlops":
        """From a transformers `WhisperConfig`."""
        return cls(width=config.d_model, encoder_layers=config.encoder_layers, decoder_layers=config.decoder_layers,
                   encoder_ffn=config.encoder_ffn_dim, decoder_ffn=config.decoder_ffn_dim,
                   mels=config.num_mel_bins, vocab=config.vocab_size)

    def _frames(self, seconds: float) -> tuple[int, int]:
        """(mel frames, encoder positions) of `seconds` of audio: the second convolution (kernel 3,
        padding 1, stride 2) halves the frames, rounding up."""
        mel = round(seconds * self.mel_frames_per_second)
        return mel, (mel + 1) // 2

    def encoder(self, seconds: float) -> float:
        """FLOPs of the encoder on `seconds` of audio: two convolutions (kernel 3, the second with
        stride 2), then each layer's linear layers and attention over the halved frames."""
        d, (mel, pos) = self.width, self._frames(seconds)
        convs = 2 * self.mels * d * 3 * mel + 2 * d * d * 3 * pos
        layer = 2 * (4 * d * d + 2 * d * self.encoder_ffn) * pos + ATTENTION_FLOPS_PER_KEY * d * pos * pos
        return convs + self.encoder_layers * layer

    def decoder(self, seconds: float, prompt: int, new: int) -> float:
        """FLOPs of greedy decoding after `prompt` start tokens of `new` tokens (the end token
        included) over the encoder states of `seconds` of audio: cross-attention keys and values
        once, then for each position fed (the prompt and each new token but the last)
        self-attention, cross-attention and the MLP, and the LM head for each new token."""
        d, (_, states) = self.width, self._frames(seconds)
        fed = prompt + max(new - 1, 0)
        cross_kv = self.decoder_layers * 2 * 2 * d * d * states
        per_layer = (fed * (2 * (6 * d * d + 2 * d * self.decoder_ffn) + ATTENTION_FLOPS_PER_KEY * d * states)
                     + ATTENTION_FLOPS_PER_KEY * d * fed * (fed + 1) // 2)
        return cross_kv + self.decoder_layers * per_layer + 2 * d * self.vocab * new

    def transcription(self, seconds: float, prompt: int, new: int, padded: bool) -> float:
        """FLOPs of transcribing a clip of `seconds` (see `decoder`); `padded`: over Whisper's whole
        window, as Whisper runs it, else over the clip's own frames only."""
        audio = max(seconds, self.window_seconds) if padded else seconds
        return self.encoder(audio) + self.decoder(audio, prompt, new)


def add_dtype_arg(parser) -> None:
    """`--dtype`: the LLM's dtype in the benchmark, `auto` as the demo picks it."""
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                        help="LLM weights dtype; auto: bfloat16 where this CPU multiplies it in hardware "
                             "(AVX512-BF16/AMX), else float32, as `speechllm demo` picks it (default: auto)")


def _choices(field: str) -> tuple[str, ...]:
    """The values `LLMConfig.<field>` accepts (its Literal): the benchmarks offer what the config does."""
    from speechllm.config import LLMConfig

    return get_args(get_type_hints(LLMConfig)[field])


def add_attention_arg(parser) -> None:
    """`--attn`: transformers' attention kernel of the LLM (`model.llm.attn_implementation`)."""
    parser.add_argument("--attn", choices=_choices("attn_implementation"), default="auto",
                        help="the LLM's attention kernel (default: auto, transformers' choice: SDPA)")


def add_train_attention_arg(parser) -> None:
    """`--train-attn`: the LLM's attention kernel in training (`model.llm.train_attn_implementation`)."""
    parser.add_argument("--train-attn", choices=_choices("train_attn_implementation"), default="model",
                        help="the LLM's attention kernel in forward passes with gradients (default: model, the "
                             "--attn kernel, as training runs by default; auto: grouped for bf16 on a CPU with bf16 units)")


def resolve_dtype(name: str) -> str:
    """`model.llm.dtype` for `--dtype` (see `speechllm.demo.demo_dtype`)."""
    from speechllm.demo import demo_dtype

    return demo_dtype(name, "cpu")


DTYPE_LABEL = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
