"""Greedy decoding that drops finished sequences from the batch.

transformers' `generate` keeps every sequence of a batch in every decoding step until the last one
stops: the finished ones are fed padding, so a batch whose answers are mostly short ("The speaker
is male.") and one long one runs every row for the long one's length. On the demo's evaluation
answers three quarters of the decoding rows were such padding (self-output adapter: 25% useful on
the audio tasks, 24% on the forgetting items). Here a sequence leaves the batch as soon as it emits
a stop token: its rows of the input, the attention mask and the KV cache are dropped
(`Cache.batch_select_indices`), so each step computes only the sequences still answering.

Greedy only (no sampling, no repetition penalty): the answers are those of `generate` up to float
rounding of a smaller batch (tested equal in fp32). Sampling keeps `generate`, whose random stream a
shrinking batch would change.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

import torch
from torch import nn

from .packed import packed_linears
from .prefix import cache_kwarg, rest_positions


@dataclass
class Decoded:
    tokens: list[int]
    """Generated ids, the stop token (when one came) included."""
    finished: bool
    """True when the sequence emitted a stop token within the step budget."""


@functools.cache
def _takes_logits_to_keep(model_class: type) -> bool:
    """Whether a model class's forward can compute the LM head on the last position only."""
    return "logits_to_keep" in inspect.signature(model_class.forward).parameters


@torch.no_grad()
def greedy_decode(llm: nn.Module, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor,
                  max_new_tokens: int, stop_ids: list[int], cache=None, kv_in_place: bool = True,
                  packed_weights: bool = True) -> list[Decoded]:
    """Greedy answers of a causal LM to a batch of prompts.

    Args:
        llm: a transformers causal LM.
        inputs_embeds: (batch, seq, width) the prompts' embeddings after any cached positions;
            each prompt ends in the last column (padding before its real positions).
        attention_mask: (batch, cached + seq), 1 for real positions, the cached ones included.
        max_new_tokens: most ids generated per sequence.
        stop_ids: ids that end a sequence (end of turn, eos).
        cache: a KV cache of the first `cached` positions (batch rows as `inputs_embeds`), or None.
        kv_in_place: on a CPU, keep keys and values in a cache sized for the whole answer and
            written in place (`kv_cache.py`; `cache` is copied into it, itself left unchanged);
            False, or another device, grows transformers' cache by concatenation (`cache` itself
            then grows): on a GPU the copy is cheap (an H200 measured no gain) and the strided
            views change bf16 attention's rounding.
        packed_weights: on a CPU in float32, multiply by the LLM's linear weights in oneDNN's packed
            layout (`packed.py`; `cache`'s positions are computed before, by the caller).
    Returns:
        one `Decoded` per prompt, in input order.
    """
    from transformers import DynamicCache

    from .kv_cache import preallocated_cache

    batch = inputs_embeds.shape[0]
    name = cache_kwarg(llm)
    if kv_in_place and inputs_embeds.device.type == "cpu":
        cache = preallocated_cache(llm, attention_mask.shape[1] + max_new_tokens, cache)
    elif cache is None:
        cache = DynamicCache(config=llm.config)
    stop = set(stop_ids)
    mask = attention_mask
    positions = rest_positions(mask, mask.shape[1] - inputs_embeds.shape[1])
    last_only = {"logits_to_keep": 1} if _takes_logits_to_keep(type(llm)) else {}
    x = inputs_embeds
    embed = llm.get_input_embeddings()
    rows = list(range(batch))  # which prompt each live row answers
    out: list[list[int]] = [[] for _ in range(batch)]
    finished = [False] * batch
    with packed_linears(llm, packed_weights):
        for step in range(max_new_tokens):
            result = llm(inputs_embeds=x, attention_mask=mask, position_ids=positions, use_cache=True,
                         **last_only, **{name: cache})
            cache = getattr(result, name)
            token = result.logits[:, -1].argmax(-1)
            ids = token.tolist()  # the step's one wait for the device
            live = [i for i, t in enumerate(ids) if t not in stop]
            for row, t in zip(rows, ids):
                out[row].append(t)
                finished[row] = t in stop
            if step == max_new_tokens - 1 or not live:
                break
            last = positions[:, -1]
            if len(live) < len(rows):  # the finished sequences leave the batch
                keep = torch.tensor(live, device=token.device)
                cache.batch_select_indices(keep)
                rows, token, mask, last = [rows[i] for i in live], token[keep], mask[keep], last[keep]
            mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)
            positions = (last + 1).unsqueeze(1)
            x = embed(token).unsqueeze(1)
    return [Decoded(tokens, done) for tokens, done in zip(out, finished)]
