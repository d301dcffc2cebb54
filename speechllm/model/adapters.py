"""Adapters: tapped encoder states -> embeddings in the LLM's input space.

Chosen through `ADAPTERS` (a registry, `@register_adapter("name")`); each adapter owns
`output_length`, so nothing else hard-codes how many embeddings a clip becomes.

Every adapter is built as `cls(cfg, encoder_width=..., num_taps=..., llm_width=...)` and called as
`adapter(states, lengths) -> (embeddings (batch, L, llm_width), embedding_lengths (batch,))`; it
also says what one training forward keeps for backward and costs (`saved_elements(batch, frames)`,
`forward_flops(batch, frames)`, used by `speechllm plan`).
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..config import AdapterConfig, MLPConfig, QFormerConfig

ADAPTERS: dict[str, tuple[type[nn.Module], str]] = {}
"""kind -> (class, name of its settings field in `AdapterConfig`)."""


def register_adapter(kind: str, settings_field: str) -> Callable[[type], type]:
    def wrap(cls: type) -> type:
        ADAPTERS[kind] = (cls, settings_field)
        return cls
    return wrap


def build_adapter(cfg: AdapterConfig, encoder_width: int, num_taps: int, llm_width: int) -> nn.Module:
    if cfg.kind not in ADAPTERS:
        raise ValueError(f"model.adapter.kind: unknown adapter '{cfg.kind}'; known: {', '.join(ADAPTERS)}")
    cls, field_name = ADAPTERS[cfg.kind]
    return cls(getattr(cfg, field_name), encoder_width=encoder_width, num_taps=num_taps, llm_width=llm_width)


class InputStandardizer(nn.Module):
    """Per tapped layer and channel: (states - mean) / std, with `mean` and `std` (taps, width)
    fitted once on training clips (`fit`) and saved with the adapter. Unfitted, it is the
    identity (mean 0, std 1).

    Whisper's hidden states carry a few channels hundreds of times larger than the rest (and a
    per-layer offset shared by every clip); a fresh adapter sees mostly those, and on the embedded
    default it learns a prefix that is the same for every clip. Standardized inputs make what
    differs between clips (the speaker, the words) the bulk of the signal."""

    MIN_STD = 1e-4
    """Floor on a channel's deviation (a constant channel becomes 0, not inf)."""

    def __init__(self, num_taps: int, width: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(num_taps, width))
        self.register_buffer("std", torch.ones(num_taps, width))

    @torch.no_grad()
    def fit(self, clips: Iterable[list[torch.Tensor]]) -> int:
        """Set mean and std from every frame of `clips` (each: taps x (frames, width)); returns
        the number of frames. Sums run in float64, so the order of the clips does not matter
        beyond rounding."""
        taps, width = self.mean.shape
        total = torch.zeros(taps, width, dtype=torch.float64)
        squares = torch.zeros(taps, width, dtype=torch.float64)
        frames = 0
        for clip in clips:
            if len(clip) != taps:
                raise ValueError(f"a clip has {len(clip)} tapped layers, the standardizer {taps}")
            x = torch.stack([s.detach().to("cpu", torch.float64) for s in clip])  # (taps, frames, width)
            total += x.sum(dim=1)
            squares += (x * x).sum(dim=1)
            frames += x.shape[1]
        if frames == 0:
            raise ValueError("no frames to fit the input standardization on")
        mean = total / frames
        std = (squares / frames - mean * mean).clamp_min(0).sqrt().clamp_min(self.MIN_STD)
        self.mean.copy_(mean.to(self.mean.dtype))
        self.std.copy_(std.to(self.std.dtype))
        return frames

    def forward(self, states: list[torch.Tensor]) -> list[torch.Tensor]:
        """states: taps x (batch, frames, width) -> the same, standardized. Padding frames are
        changed too; the adapters mask them by length."""
        return [(s - m.to(s.dtype)) / d.to(s.dtype) for s, m, d in zip(states, self.mean, self.std)]


class Attention(nn.Module):
    """Multi-head attention with separate q/k/v projections; `kv_mask` (batch, keys) True = keep."""

    def __init__(self, width: int, heads: int, dropout: float):
        super().__init__()
        if width % heads:
            raise ValueError(f"adapter width {width} is not divisible by {heads} heads")
        self.heads, self.dropout = heads, dropout
        self.q, self.k, self.v, self.o = (nn.Linear(width, width) for _ in range(4))

    def forward(self, x: torch.Tensor, kv: torch.Tensor, kv_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, n, w = x.shape
        split = lambda t: t.view(b, -1, self.heads, w // self.heads).transpose(1, 2)  # noqa: E731
        mask = None if kv_mask is None else kv_mask[:, None, None, :]
        out = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(kv)), split(self.v(kv)), attn_mask=mask,
                                             dropout_p=self.dropout if self.training else 0.0)
        return self.o(out.transpose(1, 2).reshape(b, n, w))


class QFormerBlock(nn.Module):
    """Pre-LayerNorm block: self-attention over queries, cross-attention to audio, FFN."""

    def __init__(self, width: int, heads: int, ffn_width: int, dropout: float):
        super().__init__()
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(width), nn.LayerNorm(width), nn.LayerNorm(width)
        self.self_attn = Attention(width, heads, dropout)
        self.cross_attn = Attention(width, heads, dropout)
        self.ffn = nn.Sequential(nn.Linear(width, ffn_width), nn.GELU(), nn.Linear(ffn_width, width))
        self.drop = nn.Dropout(dropout)

    def forward(self, q: torch.Tensor, audio: torch.Tensor, audio_mask: torch.Tensor) -> torch.Tensor:
        """q: (batch, queries, width); audio: (batch, frames, width); audio_mask: (batch, frames)."""
        h = self.norm1(q)
        q = q + self.drop(self.self_attn(h, h))
        q = q + self.drop(self.cross_attn(self.norm2(q), audio, audio_mask))
        return q + self.drop(self.ffn(self.norm3(q)))


@register_adapter("qformer", "qformer")
class QFormerAdapter(nn.Module):
    """DeSTA2's connector: one Q-Former shared across tapped layers.

    Each tapped layer has its own `num_queries` learned queries that cross-attend to that layer's
    states through the shared blocks; a softmax weight per query over layers mixes the per-layer
    results; LayerNorm + Linear map to the LLM width. A clip always becomes `num_queries`
    embeddings, whatever its length."""

    no_weight_decay = ("layer_logits",)
    """Mixing logits, not a projection: the optimizer leaves them out of weight decay."""

    def __init__(self, cfg: QFormerConfig, encoder_width: int, num_taps: int, llm_width: int):
        super().__init__()
        width = cfg.hidden_size or encoder_width
        heads = cfg.num_heads or max(1, width // 64)
        self.num_queries = cfg.num_queries
        self.in_proj = nn.Linear(encoder_width, width) if width != encoder_width else nn.Identity()
        self.queries = nn.Parameter(torch.randn(num_taps, cfg.num_queries, width) * 0.02)
        self.blocks = nn.ModuleList(QFormerBlock(width, heads, cfg.ffn_multiplier * width, cfg.dropout)
                                    for _ in range(cfg.num_layers))
        self.layer_logits = nn.Parameter(torch.zeros(cfg.num_queries, num_taps))
        self.norm = nn.LayerNorm(width)
        self.proj = nn.Linear(width, llm_width)

    def output_length(self, frames: torch.Tensor) -> torch.Tensor:
        """Embeddings per clip for `frames` encoder frames: always `num_queries`."""
        return torch.full_like(frames, self.num_queries)

    def saved_elements(self, batch: int, frames: int) -> int:
        """Elements autograd keeps for backward in one training forward of `batch` clips of
        `frames` encoder frames (for `speechllm plan`): the tapped states, their projection, each
        block's keys and values over the frames, and per query ~13 tensors of the block's width
        and 2 of its FFN width (counted with autograd's saved-tensor hooks)."""
        taps, width = self.queries.shape[0], self.proj.in_features
        ffn = self.blocks[0].ffn[0].out_features
        encoder_width = self.in_proj.in_features if isinstance(self.in_proj, nn.Linear) else width
        audio, queries = taps * batch * frames, taps * batch * self.num_queries
        projected = audio * width if isinstance(self.in_proj, nn.Linear) else 0
        per_block = 2 * audio * width + queries * (13 * width + 2 * ffn)
        return audio * encoder_width + projected + len(self.blocks) * per_block

    def forward_flops(self, batch: int, frames: int) -> int:
        """FLOPs of one forward over `batch` clips of `frames` encoder frames (for `speechllm
        plan`): per tap, the input projection over the frames; per block, the queries' self- and
        cross-attention projections and FFN, the keys / values over the frames and the attention
        products; then the output projection per clip."""
        taps, q, width = self.queries.shape[0], self.num_queries, self.proj.in_features
        ffn = self.blocks[0].ffn[0].out_features
        per_tap = 2 * frames * self.in_proj.in_features * width if isinstance(self.in_proj, nn.Linear) else 0
        per_tap += len(self.blocks) * (2 * q * (6 * width * width + 2 * width * ffn)  # q/k/v/o, cross q/o, FFN
                                       + 2 * frames * 2 * width * width  # cross-attention keys and values
                                       + 4 * q * (q + frames) * width)  # scores and weighted sums
        return batch * (taps * per_tap + 2 * q * width * self.proj.out_features)

    def forward(self, states: list[torch.Tensor], lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """states: taps x (batch, frames, encoder_width); lengths: (batch,) -> (batch, num_queries, llm_width)."""
        taps, batch = len(states), states[0].shape[0]
        audio = self.in_proj(torch.cat(states, dim=0))  # (taps*batch, frames, width), tap-major
        mask = (torch.arange(audio.shape[1], device=audio.device)[None, :] < lengths[:, None]).repeat(taps, 1)
        q = self.queries.to(audio.dtype).repeat_interleave(batch, dim=0)  # (taps*batch, queries, width)
        for block in self.blocks:
            q = block(q, audio, mask)
        q = q.view(taps, batch, self.num_queries, -1)
        weights = self.layer_logits.softmax(dim=-1).to(q.dtype)  # (queries, taps)
        mixed = torch.einsum("tbqw,qt->bqw", q, weights)
        return self.proj(self.norm(mixed)), self.output_length(lengths)


@register_adapter("mlp", "mlp")
class MLPAdapter(nn.Module):
    """Frame stacking + MLP: the tapped layers are concatenated per frame, `stack` consecutive
    frames are concatenated, and a 2-layer MLP maps them to the LLM width."""

    def __init__(self, cfg: MLPConfig, encoder_width: int, num_taps: int, llm_width: int):
        super().__init__()
        self.stack = cfg.stack
        hidden = cfg.hidden_size or llm_width
        self.mlp = nn.Sequential(nn.Linear(encoder_width * num_taps * cfg.stack, hidden), nn.GELU(),
                                 nn.Linear(hidden, llm_width))

    def output_length(self, frames: torch.Tensor) -> torch.Tensor:
        """Embeddings per clip for `frames` encoder frames: ceil(frames / stack)."""
        return torch.div(frames + self.stack - 1, self.stack, rounding_mode="floor")

    def saved_elements(self, batch: int, frames: int) -> int:
        """Elements autograd keeps for backward in one training forward of `batch` clips of
        `frames` encoder frames (for `speechllm plan`): the stacked input and the hidden layer
        before and after its activation."""
        first = self.mlp[0]
        embeddings = -(-frames // self.stack)
        return batch * embeddings * (first.in_features + 2 * first.out_features)

    def forward_flops(self, batch: int, frames: int) -> int:
        """FLOPs of one forward over `batch` clips of `frames` encoder frames: the MLP per embedding."""
        embeddings = -(-frames // self.stack)
        weights = sum(m.in_features * m.out_features for m in self.mlp if isinstance(m, nn.Linear))
        return 2 * batch * embeddings * weights

    def forward(self, states: list[torch.Tensor], lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """states: taps x (batch, frames, encoder_width) -> (batch, ceil(frames/stack), llm_width)."""
        x = torch.cat(states, dim=-1)
        keep = torch.arange(x.shape[1], device=x.device)[None, :, None] < lengths[:, None, None]
        x = x * keep.to(x.dtype)  # padding frames never leak into a clip's last stacked group
        pad = (-x.shape[1]) % self.stack
        x = F.pad(x, (0, 0, 0, pad))
        b, t, w = x.shape
        x = x.reshape(b, t // self.stack, w * self.stack)
        return self.mlp(x), self.output_length(lengths)
