"""The shared prompt prefix, computed once: every prompt of a batch starts with the same token ids
(the chat template's head, the system prompt, `audio_start`), and a causal LLM's keys and values
at a position depend only on the positions before it, so those ids' KV cache is computed once (a
batch of 1) and expanded over the batch. The rest of each sequence follows it; in generation the
rest is left-padded, so the padding sits between the prefix and the rest (middle padding), and
positions come from the attention mask's cumulative sum (the same positions a left-padded batch
of the whole prompts gets). Results equal the whole-prompt path within float tolerance (tested).

The prefix's KV depends on the LLM's weights: with a frozen LLM it is a constant, kept by
`FrozenPrefixCache` across forward passes (training steps, generation batches) until a weight
changes (an in-place edit, LoRA merged, new weights loaded, another dtype or device); with LoRA it is
computed with gradients in every forward pass (reuse within a step), and its gradient is the sum
over the batch, as autograd gives through the expansion.
"""

from __future__ import annotations

import functools
import inspect
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from transformers import DynamicCache

def shared_prefix_length(sequences: list[list[int]], limit: int) -> int:
    """How many leading ids all `sequences` share, at most `limit` (the caller leaves each sequence
    a position after the prefix to predict from); 0 for fewer than two sequences (nothing to
    share)."""
    if len(sequences) < 2:
        return 0
    first = sequences[0]
    n = 0
    while n < limit and all(n < len(s) and s[n] == first[n] for s in sequences):
        n += 1
    return n


def prompt_prefix_length(prompts: list[list[int]]) -> int:
    """How many leading ids all prompts share, each keeping its last id after the prefix (the
    position that predicts its answer's first token): what generation computes once."""
    return shared_prefix_length(prompts, min(map(len, prompts), default=1) - 1)


def has_trainable_weights(llm: nn.Module) -> bool:
    """True when some LLM weight gets gradients (LoRA, an unfrozen LLM): the prefix's KV then
    changes with every optimizer step."""
    return any(p.requires_grad for p in llm.parameters())


def cache_kwarg(llm: nn.Module) -> str:
    """The name under which this transformers release passes a KV cache into a model's forward (and
    `generate`) and returns it from the output: `cache` from 5.2x on, `past_key_values` before."""
    return _cache_kwarg_of(type(llm.get_decoder()))


@functools.cache
def _cache_kwarg_of(decoder_class: type) -> str:
    """`cache_kwarg` by decoder class (read once per class: every forward pass asks)."""
    return "cache" if "cache" in inspect.signature(decoder_class.forward).parameters else "past_key_values"


def prefix_cache(llm: nn.Module, prefix_ids: list[int]) -> DynamicCache:
    """The KV cache of `prefix_ids` for one sequence (batch 1), through the LLM's decoder (no LM
    head). Gradients flow into it when the LLM has trainable weights and grad mode is on."""
    from transformers import DynamicCache

    device = llm.get_input_embeddings().weight.device
    ids = torch.tensor([prefix_ids], dtype=torch.long, device=device)
    with torch.set_grad_enabled(torch.is_grad_enabled() and has_trainable_weights(llm)):
        name = cache_kwarg(llm)
        out = llm.get_decoder()(input_ids=ids, use_cache=True, **{name: DynamicCache(config=llm.config)})
    return getattr(out, name)


def weights_state(llm: nn.Module) -> tuple | None:
    """What tells whether the LLM's weights changed: each parameter's storage, dtype and in-place
    version counter (`load_state_dict` and optimizer steps bump the counter, `merge_lora` bumps it
    after peft's merge, which writes through `.data` and would not; `.to()`
    and new parameters change the storage). None when a parameter keeps no version counter (made
    under `torch.inference_mode`): then nothing can tell, and nothing is reused."""
    try:
        return tuple((p.data_ptr(), p.dtype, p._version) for p in llm.parameters())
    except RuntimeError:
        return None


class FrozenPrefixCache:
    """The batch-1 KV cache of the last prefix, reused while the LLM's weights stay the same.

    Only for an LLM without trainable weights (`has_trainable_weights` false): then the prefix's KV
    carries no gradient and is the same in every forward pass, so a training run computes it once
    instead of once per step. Anything else (LoRA, an unfrozen LLM) computes it every call.
    """

    def __init__(self):
        self._key: tuple | None = None
        self._cache: DynamicCache | None = None
        self.computed = 0
        """How many times the prefix was run (the rest of the calls reused it)."""

    def get(self, llm: nn.Module, prefix_ids: list[int]) -> DynamicCache:
        """The batch-1 cache of `prefix_ids` (leave it unchanged: `expand_cache` it per batch)."""
        state = None if has_trainable_weights(llm) else weights_state(llm)
        if state is None:
            self.computed += 1
            return prefix_cache(llm, prefix_ids)
        key = (tuple(prefix_ids), state)
        if key != self._key:
            with torch.no_grad():
                self._cache, self._key = prefix_cache(llm, prefix_ids), key
            self.computed += 1
        return self._cache


def expand_cache(llm: nn.Module, cache: DynamicCache, batch: int) -> DynamicCache:
    """A new cache holding `cache`'s (batch 1) keys and values repeated over `batch` sequences;
    `cache` itself is left unchanged (generation appends to the new one)."""
    from transformers import DynamicCache

    layers = [(layer.keys.expand(batch, -1, -1, -1), layer.values.expand(batch, -1, -1, -1))
              for layer in cache.layers]
    return DynamicCache(ddp_cache_data=layers, config=llm.config)


def with_prefix_mask(prefix_length: int, attention_mask: torch.Tensor) -> torch.Tensor:
    """The attention mask over prefix + rest: ones for the prefix, then `attention_mask`
    (batch, rest) -> (batch, prefix_length + rest)."""
    ones = attention_mask.new_ones(attention_mask.shape[0], prefix_length)
    return torch.cat([ones, attention_mask], dim=1)


def rest_positions(full_mask: torch.Tensor, prefix_length: int) -> torch.Tensor:
    """Position ids of the positions after the prefix, from the full mask's cumulative sum (padding
    gets 0; it is masked): (batch, prefix + rest) -> (batch, rest)."""
    positions = full_mask.long().cumsum(-1) - 1
    return positions.masked_fill(full_mask == 0, 0)[:, prefix_length:]


def states_after_prefix(llm: nn.Module, full_mask: torch.Tensor, prefix_length: int, cache, **inputs) -> torch.Tensor:
    """The decoder's last hidden states of the positions after a prefix whose KV, expanded over the
    batch, is `cache` (None: no prefix; `full_mask` is then the inputs' own mask): `inputs` are
    `input_ids` or `inputs_embeds` of the rest, (batch, rest[, width]); `full_mask` covers prefix +
    rest, positions come from it (`rest_positions`) -> (batch, rest, hidden)."""
    decoder = llm.get_decoder()
    if cache is None:
        return decoder(attention_mask=full_mask, **inputs).last_hidden_state
    return decoder(attention_mask=full_mask, use_cache=True, position_ids=rest_positions(full_mask, prefix_length),
                   **{cache_kwarg(llm): cache}, **inputs).last_hidden_state
