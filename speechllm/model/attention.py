"""Grouped-query attention as two batched matmuls, registered with transformers as the kernel
`"grouped"`, and the kernel training runs the LLM with (`model.llm.train_attn_implementation`:
`auto` picks `grouped` for bf16 weights on a CPU with bf16 units).

Why a kernel of our own: on a CPU, PyTorch's SDPA runs a flash-attention kernel built for long
sequences; its backward on bf16 sequences of ~100 positions costs five times its forward (one bf16
training step of the demo: 19% of the step in that backward alone). transformers' eager kernel
is faster there but copies every key and value head once per query head sharing it (`repeat_kv`).
Here the query heads that share a key/value head are stacked along the query axis instead, so
scores and the weighted sum are one batched matmul each over the key/value heads, no copy:

    queries (batch, kv_heads * groups, q_len, head_dim) -> (batch, kv_heads, groups * q_len, head_dim)
    scores  (batch, kv_heads, groups * q_len, kv_len) = queries @ keys^T,  softmax in float32

The arithmetic is eager's (scores scaled, the additive mask, float32 softmax cast back): in float32
its outputs equal eager's within rounding (tested), and its gradients too.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch
from torch import nn

from .hardware import native_bf16

NAME = "grouped"
"""The name transformers knows this kernel by (`attn_implementation`)."""
GROUPED_MAX_BYTES = 2 ** 30
"""`auto` trains with the grouped kernel only while the attention probabilities it keeps for the
backward pass (`probability_bytes`) fit in this; a longer batch runs the model's own kernel (SDPA
keeps none: its memory grows linearly with the sequence, the grouped kernel's quadratically)."""
FLOAT32_BYTES = 4


def grouped_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                      **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention interface: query (batch, heads, q_len, head_dim), key and value
    (batch, kv_heads, kv_len, head_dim), `attention_mask` additive (batch, 1, q_len, kv_len) or None
    (then a causal module's queries are the last q_len positions) -> ((batch, q_len, heads,
    head_dim), None)."""
    batch, heads, q_len, head_dim = query.shape
    kv_heads, kv_len = key.shape[1], key.shape[2]
    groups = heads // kv_heads
    scale = head_dim ** -0.5 if scaling is None else scaling
    stacked = query.reshape(batch, kv_heads, groups * q_len, head_dim)
    scores = torch.matmul(stacked, key.transpose(2, 3)).view(batch, heads, q_len, kv_len) * scale
    if attention_mask is not None:
        scores = scores + attention_mask[:, :, :, :kv_len]
    elif q_len > 1 and getattr(module, "is_causal", False):  # no mask given: causal, the queries the last positions
        future = torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device).triu(kv_len - q_len + 1)
        scores = scores.masked_fill(future, float("-inf"))
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    if dropout and module.training:
        weights = nn.functional.dropout(weights, p=dropout)
    out = torch.matmul(weights.view(batch, kv_heads, groups * q_len, kv_len), value)
    return out.view(batch, heads, q_len, head_dim).transpose(1, 2).contiguous(), None


@functools.cache
def register() -> None:
    """Make `"grouped"` a kernel transformers' models accept (`from_pretrained(attn_implementation=...)`,
    `set_attn_implementation`), with eager's additive mask. Runs once per process (every training
    step's `kernel` asks)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

    AttentionInterface.register(NAME, grouped_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, eager_mask)


def probability_bytes(batch: int, heads: int, q_len: int, kv_len: int, layers: int, element_bytes: int) -> int:
    """Bytes of the attention probabilities an eager or grouped kernel keeps for the backward pass
    of one forward: every layer's float32 softmax and, when the model computes in a narrower
    dtype (`element_bytes`), its cast (batch x heads x q_len x kv_len each)."""
    per_element = FLOAT32_BYTES + (element_bytes if element_bytes < FLOAT32_BYTES else 0)
    return batch * heads * q_len * kv_len * layers * per_element


def training_kernel(setting: str, device: torch.device, dtype: torch.dtype, kept_bytes: float = 0) -> str | None:
    """The kernel the LLM runs forward passes with gradients in, for `model.llm.train_attn_implementation`
    with weights of `dtype` on `device`: None keeps the model's own (`attn_implementation`); `auto`
    picks `grouped` where it measured faster, bfloat16 on a CPU that multiplies it in hardware
    (`hardware.native_bf16`), while the probabilities it would keep (`kept_bytes`, see `probability_bytes`)
    fit in `GROUPED_MAX_BYTES`; the model's own elsewhere: a GPU's fused SDPA kernels beat two
    matmuls, in float32 it was no faster (a DeSTA2.5-style step at 0.94-0.95x), and a CPU without bf16 units
    emulates the grouped kernel's bf16 matmuls (one layer 3-4x slower than SDPA there)."""
    if setting == "model":
        return None
    if setting == "auto":
        fits = kept_bytes <= GROUPED_MAX_BYTES
        return NAME if device.type == "cpu" and dtype == torch.bfloat16 and native_bf16(device) and fits else None
    return setting


@contextlib.contextmanager
def kernel(llm: nn.Module, name: str | None) -> Iterator[None]:
    """Run `llm`'s attention with the kernel `name` inside the block (None: leave it), then put
    its own back, also when the block raises."""
    own = llm.config._attn_implementation
    if name is None or name == own:
        yield
        return
    register()
    llm.set_attn_implementation(name)
    try:
        yield
    finally:
        llm.set_attn_implementation(own)
