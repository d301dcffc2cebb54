"""A KV cache written in place: greedy decoding's cache without a copy of the whole cache per step.

transformers' `DynamicLayer.update` grows a layer's keys and values by `torch.cat`, so each decoding
step copies every cached position of every layer once more: at the demo's evaluation sizes (batch
32, ~250 positions, 30 layers, 3 KV heads of 64, float32) ~370 MB per step, beside ~9 GFLOP of
matmuls; on a 2-core CPU 3-5% of generation's time (profiles in the README's Speed section) and
1.12x over 128 new tokens at batch 64. `PreallocatedLayer` keeps one buffer per layer sized for the
whole answer (`capacity` positions), writes each step's keys and values into the next free
positions and hands attention a view of the filled ones: the same keys and values, so the same
answers (tested against transformers' `generate`). `greedy_decode` uses it on a CPU only.

Dropping finished sequences (`batch_select_indices`) copies the kept rows' filled positions into
a smaller buffer once per drop; a layer that runs past its capacity doubles it (never needed by
`greedy_decode`, which sizes the buffer for prompt + `max_new_tokens`).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


class PreallocatedLayer(DynamicLayer):
    """One layer's keys and values, (batch, kv_heads, positions, head_dim), in a buffer of
    `capacity` positions; `keys` / `values` are views of the filled positions (what attention and
    `get_seq_length` read)."""

    def __init__(self, capacity: int):
        super().__init__()
        if capacity < 1:
            raise ValueError(f"a KV cache needs room for at least one position, got capacity={capacity}")
        self.capacity = capacity
        """Positions the buffers hold before they have to grow."""
        self.length = 0
        """Positions filled so far."""
        self._key_buffer: torch.Tensor | None = None
        self._value_buffer: torch.Tensor | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write (batch, kv_heads, new, head_dim) keys and values after the filled positions;
        returns the views of all filled positions."""
        if self._key_buffer is None:
            self.device, self.is_initialized = key_states.device, True
            self._key_buffer = self._empty(key_states, max(self.capacity, key_states.shape[-2]))
            self._value_buffer = self._empty(value_states, self._key_buffer.shape[-2])
        end = self.length + key_states.shape[-2]
        if end > self._key_buffer.shape[-2]:
            self._resize(max(end, 2 * self._key_buffer.shape[-2]))
        self._key_buffer[:, :, self.length:end] = key_states
        self._value_buffer[:, :, self.length:end] = value_states
        self.length = end
        self.keys, self.values = self._key_buffer[:, :, :end], self._value_buffer[:, :, :end]
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep only the sequences `indices` (a new, smaller buffer with their filled positions)."""
        if self._key_buffer is None:
            return
        self._key_buffer = self._copy_rows(self._key_buffer, indices)
        self._value_buffer = self._copy_rows(self._value_buffer, indices)
        self.keys, self.values = self._key_buffer[:, :, :self.length], self._value_buffer[:, :, :self.length]

    def _resize(self, positions: int) -> None:
        """Grow the buffers to `positions`, the filled part copied over."""
        self._key_buffer = self._copy_rows(self._key_buffer, None, positions)
        self._value_buffer = self._copy_rows(self._value_buffer, None, positions)

    def _copy_rows(self, buffer: torch.Tensor, rows: torch.Tensor | None, positions: int | None = None
                   ) -> torch.Tensor:
        """A new buffer of `positions` (default: the current size) holding `rows` (default: all) of
        `buffer`'s filled positions."""
        filled = buffer[:, :, :self.length] if rows is None else buffer[rows, :, :self.length]
        new = buffer.new_empty(filled.shape[0], buffer.shape[1], positions or buffer.shape[2], buffer.shape[3])
        new[:, :, :self.length] = filled
        return new

    @staticmethod
    def _empty(states: torch.Tensor, positions: int) -> torch.Tensor:
        b, h, _, d = states.shape
        return states.new_empty(b, h, positions, d)


def preallocated_cache(llm: nn.Module, capacity: int, start: DynamicCache | None = None) -> DynamicCache:
    """A cache for `llm` whose full-attention layers are `PreallocatedLayer`s of `capacity`
    positions (any other kind of layer, a sliding window's, stays transformers' own), holding
    `start`'s keys and values first when given (a prefix cache, expanded over the batch). A config
    from which transformers makes no layers up front gets transformers' own cache (`start`)."""
    cache = DynamicCache(config=llm.config)
    if not cache.layers:  # a config that names no layers: transformers adds them as they come
        return start if start is not None else cache
    cache.layers = [PreallocatedLayer(capacity) if type(layer) is DynamicLayer else layer for layer in cache.layers]
    if start is not None:
        if len(start.layers) != len(cache.layers):
            raise ValueError(f"the cache to start from has {len(start.layers)} layers, the LLM {len(cache.layers)}")
        for layer, kept in zip(cache.layers, start.layers):
            if kept.is_initialized and kept.keys.numel():
                layer.update(kept.keys, kept.values)
    return cache


def joinable(cache: DynamicCache) -> bool:
    """Whether `join_caches` can add rows to `cache`: every layer keeps all positions
    (transformers' `DynamicLayer` or a `PreallocatedLayer`; a sliding window's layer cannot)."""
    return all(type(layer) in (DynamicLayer, PreallocatedLayer) for layer in cache.layers)


def leading_unattended(mask: torch.Tensor) -> int:
    """Columns at the left of a (rows, positions) attention mask that no row attends."""
    attended = mask.any(dim=0).nonzero()
    return int(attended[0]) if len(attended) else mask.shape[1]


def join_caches(cache: DynamicCache, mask: torch.Tensor, other: DynamicCache, other_mask: torch.Tensor,
                room: int) -> tuple[DynamicCache, torch.Tensor]:
    """One cache (and attention mask) holding `cache`'s rows, then `other`'s.

    Each cache's positions are right-aligned to the same last column, columns no row of either
    attends at the left are dropped, and what either lacks is zeros that its mask leaves out.
    Positions (rotary angles) are already in the keys, so moving a row's columns changes nothing it
    attends to. The layers of `cache` decide the result's: `PreallocatedLayer`s come back with
    `room` free positions after the filled ones, transformers' layers exactly filled.

    Args:
        cache, other: KV caches of one LLM, both `joinable`, (rows, kv_heads, positions, head_dim) per layer.
        mask, other_mask: (rows, positions) attention masks of their filled positions.
        room: free positions to leave in a `PreallocatedLayer`.
    """
    if len(cache.layers) != len(other.layers):
        raise ValueError(f"caches of {len(cache.layers)} and {len(other.layers)} layers cannot be joined")
    start, other_start = leading_unattended(mask), leading_unattended(other_mask)
    spans = mask.shape[1] - start, other_mask.shape[1] - other_start
    width = max(spans)
    rows = mask.shape[0]

    def joined(a: torch.Tensor, b: torch.Tensor, extra: int) -> torch.Tensor:
        out = a.new_zeros(a.shape[0] + b.shape[0], *a.shape[1:-2], width + extra, a.shape[-1])
        out[:rows, ..., width - spans[0]: width, :] = a[..., start:, :]
        out[rows:, ..., width - spans[1]: width, :] = b[..., other_start:, :]
        return out

    layers = []
    for layer, new in zip(cache.layers, other.layers):
        if type(layer) is PreallocatedLayer:
            merged = PreallocatedLayer(width + room)
            merged._key_buffer = joined(layer.keys, new.keys, room)
            merged._value_buffer = joined(layer.values, new.values, room)
            merged.length = width
            merged.keys, merged.values = merged._key_buffer[:, :, :width], merged._value_buffer[:, :, :width]
        else:
            merged = DynamicLayer()
            merged.keys, merged.values = joined(layer.keys, new.keys, 0), joined(layer.values, new.values, 0)
        merged.device, merged.is_initialized = layer.keys.device, True
        layers.append(merged)
    cache.layers = layers
    joined_mask = mask.new_zeros(rows + other_mask.shape[0], width)
    joined_mask[:rows, width - spans[0]:] = mask[:, start:]
    joined_mask[rows:, width - spans[1]:] = other_mask[:, other_start:]
    return cache, joined_mask
