import pytest
import torch

from speechllm.config import AdapterConfig, MLPConfig, QFormerConfig
from speechllm.model.adapters import ADAPTERS, build_adapter

ENC_W, TAPS, LLM_W = 32, 3, 48


def states(lengths, frames=None):
    torch.manual_seed(0)
    frames = frames or max(lengths)
    return [torch.randn(len(lengths), frames, ENC_W) for _ in range(TAPS)], torch.tensor(lengths)


@pytest.mark.parametrize("kind", sorted(ADAPTERS))
def test_shapes_and_output_length(kind):
    cfg = AdapterConfig(kind=kind, qformer=QFormerConfig(num_queries=5, hidden_size=16, num_heads=2),
                        mlp=MLPConfig(stack=4))
    adapter = build_adapter(cfg, encoder_width=ENC_W, num_taps=TAPS, llm_width=LLM_W)
    s, lengths = states([10, 7, 3])
    out, out_len = adapter(s, lengths)
    assert out.shape[0] == 3 and out.shape[2] == LLM_W
    assert out_len.tolist() == adapter.output_length(lengths).tolist()
    assert out.shape[1] == int(out_len.max())
    expected = {"qformer": [5, 5, 5], "mlp": [3, 2, 1]}[kind]
    assert out_len.tolist() == expected


@pytest.mark.parametrize("kind", sorted(ADAPTERS))
def test_padding_never_changes_a_clip(kind):
    cfg = AdapterConfig(kind=kind, qformer=QFormerConfig(num_queries=4, hidden_size=16, num_heads=2),
                        mlp=MLPConfig(stack=4))
    adapter = build_adapter(cfg, encoder_width=ENC_W, num_taps=TAPS, llm_width=LLM_W).eval()
    s, lengths = states([9, 9])
    padded = [torch.cat([t, 100 * torch.randn(2, 6, ENC_W)], dim=1) for t in s]  # garbage padding
    a, la = adapter(s, lengths)
    b, lb = adapter(padded, lengths)
    n = int(la[0])
    torch.testing.assert_close(a[:, :n], b[:, :n], atol=1e-5, rtol=1e-5)


def test_qformer_layer_weights_are_a_softmax_per_query():
    cfg = AdapterConfig(qformer=QFormerConfig(num_queries=6, hidden_size=16, num_heads=2))
    adapter = build_adapter(cfg, encoder_width=ENC_W, num_taps=TAPS, llm_width=LLM_W)
    assert adapter.layer_logits.shape == (6, TAPS)
    assert adapter.queries.shape == (TAPS, 6, 16)


def test_unknown_kind_lists_known():
    with pytest.raises(ValueError, match="unknown adapter 'conv'; known: qformer, mlp"):
        build_adapter(AdapterConfig(kind="conv"), encoder_width=ENC_W, num_taps=TAPS, llm_width=LLM_W)
