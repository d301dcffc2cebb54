"""The grouped attention kernel (speechllm/model/attention.py) and the kernel training runs with."""

import pytest
import torch

from speechllm.model import Example
from speechllm.model import attention
from speechllm.model.attention import grouped_attention, kernel, probability_bytes, register, training_kernel


def _attention_inputs(q_len: int, kv_len: int, heads: int = 6, kv_heads: int = 2, head_dim: int = 8):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, heads, q_len, head_dim, generator=g, requires_grad=True)
    k = torch.randn(2, kv_heads, kv_len, head_dim, generator=g, requires_grad=True)
    v = torch.randn(2, kv_heads, kv_len, head_dim, generator=g, requires_grad=True)
    return q, k, v


class _Causal(torch.nn.Module):
    is_causal = True


def test_grouped_attention_equals_sdpa_with_its_key_value_heads_repeated():
    """Query heads sharing a key/value head attend it as SDPA does with that head copied to each
    (grouped-query attention), under a mask with padding and a prefix, gradients included."""
    q_len, kv_len, groups = 5, 9, 3
    q, k, v = _attention_inputs(q_len, kv_len)
    allowed = torch.ones(q_len, kv_len, dtype=torch.bool).tril(kv_len - q_len).repeat(2, 1, 1, 1)
    allowed[1, :, :, :2] = False  # the second sequence's first two keys are padding
    additive = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
    ours, _ = grouped_attention(_Causal(), q, k, v, additive, scaling=0.3)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1), attn_mask=allowed, scale=0.3)
    assert ours.shape == (2, q_len, 6, 8)  # (batch, q_len, heads, head_dim), as transformers expects
    torch.testing.assert_close(ours, ref.transpose(1, 2))
    grads = torch.autograd.grad(ours.square().sum(), (q, k, v))
    ref_grads = torch.autograd.grad(ref.transpose(1, 2).square().sum(), (q, k, v))
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want)


def test_grouped_attention_without_a_mask_is_causal_for_a_causal_module():
    """No mask given: a causal module's queries (the last q_len positions) see no later key; a
    module that is not causal sees every key."""
    q, k, v = _attention_inputs(4, 7)
    causal, _ = grouped_attention(_Causal(), q, k, v, None)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1),
        attn_mask=torch.ones(4, 7, dtype=torch.bool).tril(3))
    torch.testing.assert_close(causal, ref.transpose(1, 2))
    full, _ = grouped_attention(torch.nn.Module(), q, k, v, None)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1))
    torch.testing.assert_close(full, ref.transpose(1, 2))


def test_training_kernel_auto_is_grouped_for_bf16_on_a_cpu_with_bf16_units_while_what_it_keeps_fits(monkeypatch):
    cpu, bf16, fp32 = torch.device("cpu"), torch.bfloat16, torch.float32
    monkeypatch.setattr(attention, "native_bf16", lambda device="cpu": True)
    assert training_kernel("auto", cpu, bf16) == "grouped"
    assert training_kernel("auto", cpu, bf16, kept_bytes=attention.GROUPED_MAX_BYTES) == "grouped"
    assert training_kernel("auto", cpu, bf16, kept_bytes=attention.GROUPED_MAX_BYTES + 1) is None  # SDPA: linear
    assert training_kernel("grouped", cpu, bf16, kept_bytes=attention.GROUPED_MAX_BYTES + 1) == "grouped"  # asked
    assert training_kernel("auto", cpu, fp32) is None  # in float32 the two kernels train alike
    assert training_kernel("auto", torch.device("cuda", 0), bf16) is None
    assert training_kernel("model", cpu, bf16) is None
    assert training_kernel("eager", torch.device("cuda", 0), bf16) == "eager"
    # a CPU that emulates bf16 runs the grouped kernel's bf16 matmuls slower than SDPA
    monkeypatch.setattr(attention, "native_bf16", lambda device="cpu": False)
    assert training_kernel("auto", cpu, bf16) is None
    assert training_kernel("grouped", cpu, bf16) == "grouped"
    # the demo's bf16 batches (8 x ~140 positions, 9 heads, 30 layers): float32 softmax + bf16 cast
    assert probability_bytes(8, 9, 140, 140, 30, 2) == 8 * 9 * 140 * 140 * 30 * 6
    assert probability_bytes(8, 9, 140, 140, 30, 4) == 8 * 9 * 140 * 140 * 30 * 4  # float32: the cast is no copy


def test_kernel_switches_inside_the_block_and_puts_the_models_own_back_even_on_error(tiny_model):
    llm = tiny_model.llm
    own = llm.config._attn_implementation
    with kernel(llm, "grouped"):
        assert llm.config._attn_implementation == "grouped"
    assert llm.config._attn_implementation == own
    with pytest.raises(RuntimeError, match="boom"), kernel(llm, "grouped"):
        raise RuntimeError("boom")
    assert llm.config._attn_implementation == own
    with kernel(llm, None):
        assert llm.config._attn_implementation == own


def test_training_runs_the_grouped_kernel_with_the_same_loss_and_gradients_answers_keep_their_own(
        tiny_model, sample_wav, monkeypatch):
    """With `train_attn_implementation=grouped` a forward pass with gradients runs the LLM's
    attention with the grouped kernel, one without (evaluation, target NLL) and generation with the
    model's own; in fp32 the loss and the adapter's gradients equal the model's own kernel's within
    float tolerance; `model` keeps the model's own kernel in training too, and so does `auto` for
    float32 weights; `auto` weighs the probabilities the batch would keep."""
    from speechllm.model import speechllm

    register()
    monkeypatch.setattr(tiny_model.config.llm, "train_attn_implementation", "grouped")
    seen = []
    tiny_model.llm.get_decoder().layers[0].self_attn.register_forward_pre_hook(
        lambda module, args: seen.append(module.config._attn_implementation))
    own = tiny_model.llm.config._attn_implementation
    exs = [Example("What can you hear?", sample_wav, "cold hearted", "a calm voice"),
           Example("Describe the voice.", sample_wav[:20000], None, "low and slow, a longer answer here")]

    def loss_and_grads(reuse: bool):
        tiny_model.zero_grad()
        loss = tiny_model(tiny_model.build_batch(exs, reuse_prefix=reuse))
        loss.backward()
        return float(loss.detach()), [p.grad.clone() for p in tiny_model.adapter.parameters() if p.grad is not None]

    for reuse in (False, True):
        seen.clear()
        grouped = loss_and_grads(reuse)
        assert seen[-1] == "grouped" and tiny_model.llm.config._attn_implementation == own
        with monkeypatch.context() as m:
            m.setattr(tiny_model.config.llm, "train_attn_implementation", "model")
            seen.clear()
            mine = loss_and_grads(reuse)
        assert set(seen) == {own}
        assert grouped[0] == pytest.approx(mine[0], rel=1e-5)
        for a, b in zip(grouped[1], mine[1]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    seen.clear()
    with torch.no_grad():
        tiny_model(tiny_model.build_batch(exs))
    tiny_model.generate([Example(e.instruction, e.audio, e.transcript) for e in exs])
    assert set(seen) == {own}

    monkeypatch.setattr(tiny_model.config.llm, "train_attn_implementation", "auto")
    asked = []
    monkeypatch.setattr(speechllm, "training_kernel", lambda *a: asked.append(a) or training_kernel(*a))
    seen.clear()
    batch = tiny_model.build_batch(exs, reuse_prefix=True)
    loss_and_grads(True)
    assert set(seen) == {own}  # float32 weights: the model's own
    c = tiny_model.llm.config
    rows, q_len = batch.inputs_embeds.shape[:2]
    kept = probability_bytes(rows, c.num_attention_heads, q_len, q_len + len(batch.prefix_ids),
                             c.num_hidden_layers, 4)
    assert asked[-1] == ("auto", torch.device("cpu"), torch.float32, kept) and kept > 0
