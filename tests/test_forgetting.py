"""Forgetting-rate arithmetic and its interval; the text-retention check catches a changed LLM."""

import pytest
import torch

from speechllm.eval.forgetting import forgetting_rate, relative_delta
from speechllm.eval.retention import load_base_llm, text_kl


def test_delta_arithmetic_and_breakdown():
    speech = [True, False, True, False, True, False, False, True]  # 4/8
    ref = [True, True, True, True, True, False, True, True]  # 7/8
    kinds = ["json", "json", "lower", "lower", "lower", "quotes", "quotes", "quotes"]
    res = forgetting_rate(speech, ref, kinds, seed=0)
    assert res.ifrate == 0.5 and res.ifrate_ref == 0.875
    assert res.delta == pytest.approx((0.5 - 0.875) / 0.875)
    assert res.ci_low <= res.delta <= res.ci_high
    assert res.per_constraint["json"] == {"items": 2, "ifrate": 0.5, "ifrate_ref": 1.0, "delta": -0.5}
    assert res.per_constraint["quotes"]["delta"] == pytest.approx((1 / 3 - 2 / 3) / (2 / 3))
    assert relative_delta(0.3, 0.0) is None


def test_interval_is_seeded_and_narrows_with_more_items():
    a = forgetting_rate([True, False] * 10, [True] * 20, seed=1)
    again = forgetting_rate([True, False] * 10, [True] * 20, seed=1)
    assert (a.ci_low, a.ci_high) == (again.ci_low, again.ci_high)
    big = forgetting_rate([True, False] * 500, [True] * 1000, seed=1)
    assert big.delta == a.delta == -0.5
    assert big.ci_high - big.ci_low < a.ci_high - a.ci_low
    same = forgetting_rate([True, True, False], [True, True, False])
    assert same.delta == 0 and same.ci_low <= 0 <= same.ci_high
    with pytest.raises(ValueError, match="equally long"):
        forgetting_rate([True], [True, False])


def test_text_retention_is_exactly_zero_and_catches_a_perturbed_llm(tiny_model):
    base = load_base_llm(tiny_model)
    clean = text_kl(tiny_model, base)
    assert clean["kl"] == 0.0 and clean["kl_max"] == 0.0
    with torch.no_grad():
        w = tiny_model.llm.model.layers[0].mlp.down_proj.weight
        w.add_(0.05 * torch.randn_like(w))
    assert text_kl(tiny_model, base)["kl"] > 1e-4


def test_text_retention_sees_trained_lora(tiny_model, sample_wav):
    from speechllm.config import LoRAConfig
    from speechllm.model import Example
    from speechllm.model.lora import apply_lora

    base = load_base_llm(tiny_model)
    apply_lora(tiny_model, LoRAConfig(r=4, alpha=8, dropout=0.0))
    assert text_kl(tiny_model, base)["kl"] == 0.0  # LoRA starts as the identity (B = 0)
    opt = torch.optim.AdamW([p for p in tiny_model.parameters() if p.requires_grad], lr=1e-2)
    tiny_model([Example("Hi", sample_wav, None, "A man.")]).backward()
    opt.step()
    assert text_kl(tiny_model, base)["kl"] > 0
