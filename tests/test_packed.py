"""Linear layers in oneDNN's packed layout while a CPU decodes in float32 (speechllm/model/packed.py):
the same answers as `F.linear`'s, weights changed between generations seen, and the layers their own
(trainable) again after the block."""

import dataclasses

import pytest
import torch
from torch import nn

from speechllm.config import GenerationConfig, LoRAConfig, load_config
from speechllm.model import Example
from speechllm.model import packed
from speechllm.model.generate import TextGenerator
from speechllm.model.lora import apply_lora
from speechllm.model.packed import packed_linears, packing_available

from conftest import TINY_CONFIG

pytestmark = pytest.mark.skipif(not packing_available(), reason="this torch build has no oneDNN packed linear")

QUESTIONS = ["Hi.", "What is the speaker's gender, and how fast do they speak?", "Describe it."]


def packings(monkeypatch) -> list[nn.Linear]:
    """Records every layer whose weight gets packed."""
    seen = []
    pack = packed._packed_weight
    monkeypatch.setattr(packed, "_packed_weight", lambda layer: seen.append(layer) or pack(layer))
    return seen


def test_text_answers_equal_f_linears_and_every_linear_layer_is_packed(monkeypatch):
    generator = TextGenerator.from_config(load_config(TINY_CONFIG, ["model.llm.system_prompt=Answer briefly."]))
    prompts = [generator.prompt_ids(q) for q in QUESTIONS]
    plain = GenerationConfig(max_new_tokens=10, packed_weights=False)
    seen = packings(monkeypatch)
    want = generator.generate(prompts, plain, batch_size=3)
    assert seen == []
    got = generator.generate(prompts, dataclasses.replace(plain, packed_weights=True), batch_size=3)
    assert got == want
    linears = [m for m in generator.llm.modules() if type(m) is nn.Linear]
    assert set(map(id, seen)) == set(map(id, linears))  # the LM head included
    kept = dataclasses.replace(plain, packed_weights=True, drop_finished=False)  # transformers' generate
    assert generator.generate(prompts, kept, batch_size=3) == generator.generate(prompts, plain, batch_size=3)


def test_speech_answers_with_lora_follow_the_weights_a_step_changed(tiny_model, sample_wav, monkeypatch):
    apply_lora(tiny_model, LoRAConfig(r=4, alpha=8))
    model = tiny_model.eval()
    exs = [Example(q, sample_wav[: 16000 * (1 + i)], "unless to be rather cold hearted") for i, q in enumerate(QUESTIONS)]
    plain = GenerationConfig(max_new_tokens=10, packed_weights=False)
    on = dataclasses.replace(plain, packed_weights=True)
    seen = packings(monkeypatch)
    before = model.generate(exs, on)
    assert before == model.generate(exs, plain)
    lora = {id(m) for name, m in model.llm.named_modules() if ".lora_" in name and type(m) is nn.Linear}
    assert lora and lora <= set(map(id, seen))  # the LoRA branches are packed with the base layers
    with torch.no_grad():  # as an optimizer step does: LoRA's B (zeros at init) changes in place
        for name, p in model.llm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    after = model.generate(exs, on)
    assert after == model.generate(exs, plain)
    assert after != before  # the new weights were packed, not the cached ones used


def test_a_layer_is_packed_once_until_its_weight_changes():
    net = nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 8, bias=False))
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        with packed_linears(net) as n:
            first = packed._PACKED[net[0]][1]
            torch.testing.assert_close(net(x), net[2](torch.relu(nn.functional.linear(x, net[0].weight, net[0].bias))))
        assert n == 2
        with packed_linears(net):
            assert packed._PACKED[net[0]][1] is first  # unchanged weight: the same packed copy
        net[0].weight.mul_(2)
        with packed_linears(net):
            assert packed._PACKED[net[0]][1] is not first
            got = net(x)
    torch.testing.assert_close(got, net[2](torch.relu(nn.functional.linear(x, net[0].weight, net[0].bias))))


def test_layers_are_trainable_again_after_the_block_even_after_an_error():
    net = nn.Sequential(nn.Linear(16, 24), nn.Linear(24, 8))
    with pytest.raises(RuntimeError, match="no_grad"):
        with packed_linears(net):
            pass
    with torch.no_grad(), pytest.raises(KeyError):
        with packed_linears(net):
            raise KeyError("boom")
    assert all("forward" not in vars(m) for m in net)
    net(torch.randn(3, 16)).sum().backward()  # the packed product has no gradient: F.linear is back
    assert net[0].weight.grad is not None


def test_other_dtypes_replaced_forwards_and_nested_blocks_are_left_alone():
    half = nn.Linear(8, 8).to(torch.bfloat16)
    hooked = nn.Linear(8, 8)
    hooked.forward = lambda x: x  # as accelerate's hooks replace a forward
    outer = nn.Linear(8, 8)
    with torch.no_grad():
        with packed_linears(nn.Sequential(half, hooked)) as n:
            assert n == 0
        assert hooked(torch.ones(1, 8)).eq(1).all()
        with packed_linears(outer) as n_outer, packed_linears(outer) as n_inner:
            assert (n_outer, n_inner) == (1, 0)
        assert "forward" not in vars(outer)
        with packed_linears(outer, enabled=False) as n:
            assert n == 0 and "forward" not in vars(outer)


def test_weights_made_under_inference_mode_are_packed_every_time():
    with torch.inference_mode():
        net = nn.Sequential(nn.Linear(16, 8))
        x = torch.randn(2, 16)
        with packed_linears(net) as n:
            got = net(x)
    assert n == 1 and net[0] not in packed._PACKED  # no version counter: nothing kept
    torch.testing.assert_close(got, nn.functional.linear(x, net[0].weight, net[0].bias))


def test_packing_that_would_crowd_memory_is_skipped_with_one_notice(monkeypatch, capsys):
    net = nn.Sequential(nn.Linear(64, 64, bias=False), nn.Linear(64, 64, bias=False))
    layer_bytes = 64 * 64 * 4
    monkeypatch.setattr(packed, "available_memory", lambda: 4 * layer_bytes)
    with torch.no_grad():
        with packed_linears(net) as n:
            assert n == 2  # the copies take half of what is available: allowed
        net[0].weight.mul_(2)  # one layer to pack again, of half as much available: allowed
        monkeypatch.setattr(packed, "available_memory", lambda: 2 * layer_bytes)
        with packed_linears(net) as n:
            assert n == 2
        net[0].weight.mul_(2)
        net[1].weight.mul_(2)  # both again: all of it
        with packed_linears(net) as first, packed_linears(net) as nested:
            pass
        with packed_linears(net) as again:
            x = torch.randn(3, 64)
            got = net(x)
    assert (first, nested, again) == (0, 0, 0)
    torch.testing.assert_close(got, net[1](net[0](x)))
    assert capsys.readouterr().err.count("packed weights skipped") == 1
