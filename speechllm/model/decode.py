"""Greedy decoding that drops finished sequences from the batch, and fills their rows with waiting prompts.

transformers' `generate` keeps every sequence of a batch in every decoding step until the last one
stops: the finished ones are fed padding, so a batch whose answers are mostly short ("The speaker
is male.") and one long one runs every row for the long one's length. On the demo's evaluation
answers three quarters of the decoding rows were such padding (self-output adapter: 25% useful on
the audio tasks, 24% on the forgetting items). Here a sequence leaves the batch as soon as it emits
a stop token: its rows of the input, the attention mask and the KV cache are dropped
(`Cache.batch_select_indices`), so each step computes only the sequences still answering.

A batch that thins out still runs a step per token of its longest answer with few rows, and a step
reads every weight whatever its rows (continuous batching, as LLM servers decode). Given more prompts
than rows (`refill`), the freed rows are filled: once a quarter of the rows are free (`REFILL_SHARE`)
the next prompts are run through the LLM (their prefill, a batch of their own) and their KV cache
joins the running one (`kv_cache.join_caches`: right-aligned, the columns nobody attends dropped),
so the decoding steps keep their rows busy until the prompts run out.

Greedy only (no sampling, no repetition penalty): the answers are those of `generate` up to float
rounding of another batch (tested equal in fp32). Sampling keeps `generate`, whose random stream a
changing batch would change.
"""

from __future__ import annotations

import functools
import inspect
import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .packed import packed_linears
from .prefix import cache_kwarg, rest_positions

REFILL_SHARE = 0.25
"""Share of the batch's rows that must be free before waiting prompts are run and join it: each
refill is one more forward pass (the new prompts' prefill) and one copy of the KV cache. On the
demo's evaluation prompts (2-core AVX2 CPU, fp32, batches of 64, best of 2) 0.125 / 0.25 / 0.5
took 192.2 / 181.4 / 179.3 s: refilling more often costs more than it gains; a half and a quarter
are within this machine's run-to-run spread."""


@dataclass
class Decoded:
    tokens: list[int]
    """Generated ids, the stop token (when one came) included."""
    finished: bool
    """True when the sequence emitted a stop token within the step budget."""


@dataclass
class Prompts:
    """Prompts ready for the LLM: a left-padded batch after any cached positions."""
    inputs_embeds: torch.Tensor
    """(rows, seq, width): each prompt ends in the last column (padding before its real positions)."""
    attention_mask: torch.Tensor
    """(rows, cached + seq): 1 for real positions, the cached ones included."""
    cache: object | None = None
    """KV cache of the first `cached` positions (rows as `inputs_embeds`), or None."""


Refill = Callable[[int], "Prompts | None"]
"""Asked for at most n more prompts; None when none are left."""


@functools.cache
def _takes_logits_to_keep(model_class: type) -> bool:
    """Whether a model class's forward can compute the LM head on the last position only."""
    return "logits_to_keep" in inspect.signature(model_class.forward).parameters


@torch.no_grad()
def greedy_decode(llm: nn.Module, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor,
                  max_new_tokens: int, stop_ids: list[int], cache=None, kv_in_place: bool = True,
                  packed_weights: bool = True, refill: Refill | None = None,
                  on_finish: Callable[[int, Decoded], None] | None = None) -> list[Decoded]:
    """Greedy answers of a causal LM to a batch of prompts, and to the prompts `refill` hands over
    as rows free up.

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
        refill: more prompts, asked for (`refill(n)`, at most n) whenever `REFILL_SHARE` of the
            batch's `batch` rows are free, until it returns None. A cache whose layers cannot be
            joined (a sliding window's) takes the next prompts only once the batch is empty.
        on_finish: called with (index, answer) as each answer ends (progress, saving as you go).
    Returns:
        one `Decoded` per prompt: the batch's in input order, then the refilled ones in the
        order handed over.
    """
    from transformers import DynamicCache

    from .kv_cache import join_caches, joinable, preallocated_cache

    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    in_place = kv_in_place and inputs_embeds.device.type == "cpu"
    name = cache_kwarg(llm)
    stop = set(stop_ids)
    last_only = {"logits_to_keep": 1} if _takes_logits_to_keep(type(llm)) else {}
    embed = llm.get_input_embeddings()
    capacity = inputs_embeds.shape[0]
    threshold = max(1, math.ceil(capacity * REFILL_SHARE))
    out: list[list[int]] = []
    finished: list[bool] = []

    def prefill(prompts: Prompts, start):
        """(cache, first tokens, last position of each row) of a batch of prompts."""
        mask = prompts.attention_mask
        positions = rest_positions(mask, mask.shape[1] - prompts.inputs_embeds.shape[1])
        result = llm(inputs_embeds=prompts.inputs_embeds, attention_mask=mask, position_ids=positions,
                     use_cache=True, **last_only, **{name: start})
        return getattr(result, name), result.logits[:, -1].argmax(-1), positions[:, -1]

    def record(rows: list[int], token: torch.Tensor) -> list[int]:
        """Append each row's new token; the indices of the rows that go on."""
        going_on = []
        for i, (row, t) in enumerate(zip(rows, token.tolist())):  # the step's one wait for the device
            out[row].append(t)
            finished[row] = t in stop
            if finished[row] or len(out[row]) == max_new_tokens:
                if on_finish is not None:
                    on_finish(row, Decoded(out[row], finished[row]))
            else:
                going_on.append(i)
        return going_on

    def admit(prompts: Prompts) -> list[int]:
        """Rows for new prompts."""
        first = len(out)
        n = prompts.inputs_embeds.shape[0]
        out.extend([] for _ in range(n))
        finished.extend([False] * n)
        return list(range(first, first + n))

    def start_cache(prompts: Prompts, joining: bool):
        """The cache a batch of prompts is run into: on a CPU one written in place when it starts
        the batch, transformers' own when it joins running rows (`join_caches` copies it)."""
        if in_place and not joining:
            return preallocated_cache(llm, prompts.attention_mask.shape[1] + max_new_tokens, prompts.cache)
        return prompts.cache if prompts.cache is not None else DynamicCache(config=llm.config)

    with packed_linears(llm, packed_weights):
        waiting: Prompts | None = Prompts(inputs_embeds, attention_mask, cache)
        rows: list[int] = []
        mask = token = last = None
        more = refill is not None
        while True:
            room = capacity - len(rows)
            if waiting is None and more and room >= threshold and (not rows or joinable(cache)):
                waiting = refill(room)
                more = waiting is not None
            if waiting is not None:  # run the waiting prompts; those still answering join the rows
                new_cache, new_token, new_last = prefill(waiting, start_cache(waiting, joining=bool(rows)))
                new_rows, new_mask = admit(waiting), waiting.attention_mask
                waiting = None
                keep = record(new_rows, new_token)
                if len(keep) < len(new_rows):
                    if not keep:
                        continue
                    idx = torch.tensor(keep, device=new_token.device)
                    new_cache.batch_select_indices(idx)
                    new_rows, new_token, new_mask, new_last = ([new_rows[i] for i in keep], new_token[idx],
                                                               new_mask[idx], new_last[idx])
                if rows:
                    cache, mask = join_caches(cache, mask, new_cache, new_mask, max_new_tokens)
                    rows, token, last = rows + new_rows, torch.cat([token, new_token]), torch.cat([last, new_last])
                else:
                    cache, mask, rows, token, last = new_cache, new_mask, new_rows, new_token, new_last
                continue  # more rows may still be free
            if not rows:
                break
            mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)
            positions = (last + 1).unsqueeze(1)
            result = llm(inputs_embeds=embed(token).unsqueeze(1), attention_mask=mask, position_ids=positions,
                         use_cache=True, **last_only, **{name: cache})
            cache, token, last = getattr(result, name), result.logits[:, -1].argmax(-1), positions[:, 0]
            keep = record(rows, token)
            if len(keep) < len(rows):  # the finished sequences leave the batch
                if not keep:
                    rows = []
                    continue
                idx = torch.tensor(keep, device=token.device)
                cache.batch_select_indices(idx)
                rows, token, mask, last = [rows[i] for i in keep], token[idx], mask[idx], last[idx]
    return [Decoded(tokens, done) for tokens, done in zip(out, finished)]


def greedy_decode_in_order(llm: nn.Module, count: int, prompts_of: Callable[[list[int]], Prompts], rows: int,
                           max_new_tokens: int, stop_ids: list[int], kv_in_place: bool = True,
                           packed_weights: bool = True,
                           on_finish: Callable[[int, Decoded], None] | None = None) -> list[Decoded]:
    """`greedy_decode` of `count` prompts taken in order, at most `rows` at once: `prompts_of(indices)`
    lays out a batch of them (the first `rows`, then each refill); answers come back in prompt
    order, `on_finish(index, answer)` is called with the prompt's index."""
    if count == 0:
        return []
    taken = list(range(min(rows, count)))

    def refill(n: int) -> Prompts | None:
        idx = list(range(len(taken), min(len(taken) + n, count)))
        taken.extend(idx)
        return prompts_of(idx) if idx else None

    done = None if on_finish is None else (lambda row, d: on_finish(taken[row], d))
    first = prompts_of(taken)
    decoded = greedy_decode(llm, first.inputs_embeds, first.attention_mask, max_new_tokens, stop_ids, first.cache,
                            kv_in_place, packed_weights, refill=refill, on_finish=done)
    out: list[Decoded | None] = [None] * count
    for i, d in zip(taken, decoded):
        out[i] = d
    return out  # type: ignore[return-value]
