"""The decoding's KV cache written in place (speechllm/model/kv_cache.py): the keys and values
transformers' concatenating cache holds, in one buffer per layer that later steps do not copy."""

import pytest
import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from speechllm.config import load_config
from speechllm.model.generate import TextGenerator
from speechllm.model.kv_cache import PreallocatedLayer, join_caches, joinable, preallocated_cache

from conftest import TINY_CONFIG


def states(batch: int, positions: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, positions, 8, generator=g), torch.randn(batch, 3, positions, 8, generator=g)


def test_a_layer_holds_what_concatenation_holds_without_moving_its_buffer():
    ours, theirs = PreallocatedLayer(capacity=12), DynamicLayer()
    buffers = set()
    for step, positions in enumerate([5, 1, 1, 1]):
        k, v = states(4, positions, step)
        got, want = ours.update(k, v), theirs.update(k, v)
        assert all(torch.equal(a, b) for a, b in zip(got, want))
        buffers.add(got[0].untyped_storage().data_ptr())
        assert ours.get_seq_length() == theirs.get_seq_length() == 5 + step
    assert len(buffers) == 1  # written in place: no new storage per step


def test_dropping_sequences_and_running_past_the_capacity_keep_the_right_rows():
    ours, theirs = PreallocatedLayer(capacity=4), DynamicLayer()
    for layer in (ours, theirs):
        layer.update(*states(4, 3, 0))
    keep = torch.tensor([0, 2, 3])
    ours.batch_select_indices(keep)
    theirs.batch_select_indices(keep)
    for step in range(1, 4):  # 3 + 3 positions: past the capacity of 4
        k, v = states(3, 1, step)
        got, want = ours.update(k, v), theirs.update(k, v)
        assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert ours.keys.shape == (3, 3, 6, 8)
    with pytest.raises(ValueError, match="at least one position"):
        PreallocatedLayer(0)


def test_a_cache_started_from_a_prefix_holds_it_and_leaves_the_prefix_unchanged():
    generator = TextGenerator.from_config(load_config(TINY_CONFIG))
    llm = generator.llm
    layers = llm.config.num_hidden_layers
    start = DynamicCache(config=llm.config)
    for i in range(layers):
        start.update(*states(1, 2, i), layer_idx=i)
    kept = [layer.keys.clone() for layer in start.layers]
    cache = preallocated_cache(llm, capacity=8, start=start)
    assert all(isinstance(layer, PreallocatedLayer) for layer in cache.layers)
    assert cache.get_seq_length() == 2
    cache.update(*states(1, 1, 99), layer_idx=0)
    assert cache.layers[0].keys.shape[-2] == 3 and start.layers[0].keys.shape[-2] == 2
    assert all(torch.equal(layer.keys, k) for layer, k in zip(start.layers, kept))
    assert all(torch.equal(c.keys[:, :, :2], k) for c, k in zip(cache.layers, kept))
    short = DynamicCache(config=llm.config)
    short.layers = short.layers[:-1]
    with pytest.raises(ValueError, match="layers"):
        preallocated_cache(llm, capacity=8, start=short)


def test_greedy_generation_on_a_cpu_writes_in_place_unless_told_not_to(monkeypatch):
    import dataclasses

    from speechllm.config import GenerationConfig
    from speechllm.model.prefix import cache_kwarg

    generator = TextGenerator.from_config(load_config(TINY_CONFIG, ["model.llm.system_prompt=Answer briefly."]))
    llm = generator.llm
    kinds = []
    forward = llm.forward
    monkeypatch.setattr(llm, "forward", lambda *a, **k: kinds.append(type(k[cache_kwarg(llm)].layers[0]))
                        or forward(*a, **k))
    prompts = [generator.prompt_ids(q) for q in ("Hi.", "Describe the weather in one sentence.")]
    in_place = GenerationConfig(max_new_tokens=6)
    got = generator.generate(prompts, in_place, batch_size=2)
    assert set(kinds) == {PreallocatedLayer}
    kinds.clear()
    grown = generator.generate(prompts, dataclasses.replace(in_place, kv_in_place=False), batch_size=2)
    assert set(kinds) == {DynamicLayer}
    assert got == grown


def one_layer_cache(layer, keys: torch.Tensor, values: torch.Tensor) -> DynamicCache:
    cache = DynamicCache()
    layer.update(keys, values)
    cache.layers = [layer]
    return cache


@pytest.mark.parametrize("in_place", [True, False])
def test_joined_caches_right_align_each_row_and_drop_the_columns_nobody_attends(in_place):
    # running rows: 6 positions, the first 2 attended by no row any more; new rows: 3 positions
    run_k, run_v = states(2, 6, 0)
    new_k, new_v = states(1, 3, 1)
    run = one_layer_cache(PreallocatedLayer(8) if in_place else DynamicLayer(), run_k, run_v)
    new = one_layer_cache(DynamicLayer(), new_k, new_v)
    mask = torch.tensor([[0, 0, 1, 1, 0, 1], [0, 0, 0, 1, 1, 1]])
    joined, joined_mask = join_caches(run, mask, new, torch.tensor([[0, 1, 1]]), room=5)
    layer = joined.layers[0]
    assert type(layer) is (PreallocatedLayer if in_place else DynamicLayer)
    assert joined_mask.tolist() == [[1, 1, 0, 1], [0, 1, 1, 1], [0, 0, 1, 1]]
    assert torch.equal(layer.keys[:2], run_k[:, :, 2:]) and torch.equal(layer.values[:2], run_v[:, :, 2:])
    assert torch.equal(layer.keys[2, :, 2:], new_k[0, :, 1:]) and not layer.keys[2, :, :2].any()  # zeros, never NaN
    assert joined.get_seq_length() == 4
    if in_place:  # room for the answers: later steps write in place
        buffer = layer.keys.untyped_storage().data_ptr()
        layer.update(*states(3, 1, 2))
        assert layer.keys.untyped_storage().data_ptr() == buffer and layer.keys.shape[-2] == 5
    assert joinable(joined)
    sliding = DynamicCache()
    sliding.layers = [DynamicSlidingWindowLayer(sliding_window=4)]
    assert not joinable(sliding)
