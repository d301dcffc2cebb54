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


@pytest.mark.parametrize("kind", ["qformer", "mlp"])
def test_forward_flops_and_saved_elements_are_what_torch_counts(kind):
    """The figures `speechllm plan` takes from an adapter: its forward FLOPs against torch's FLOP
    counter, its saved elements against autograd's saved tensors (within 10%)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from speechllm.config import AdapterConfig, QFormerConfig
    from speechllm.model.adapters import build_adapter

    cfg = AdapterConfig(kind=kind, qformer=QFormerConfig(num_queries=8, hidden_size=64, num_layers=2, num_heads=4))
    adapter = build_adapter(cfg, encoder_width=96, num_taps=3, llm_width=128).train()
    batch, frames = 2, 150
    states = [torch.randn(batch, frames, 96) for _ in range(3)]
    lengths = torch.full((batch,), frames)
    counter = FlopCounterMode(display=False)
    with counter:
        adapter(states, lengths)
    assert abs(adapter.forward_flops(batch, frames) - counter.get_total_flops()) <= 0.1 * counter.get_total_flops()
    params = {p.untyped_storage().data_ptr() for p in adapter.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            saved[t.untyped_storage().data_ptr()] = t.numel()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        adapter(states, lengths)
    measured = sum(saved.values())
    assert abs(adapter.saved_elements(batch, frames) - measured) <= 0.1 * measured, (adapter.saved_elements(batch, frames),
                                                                                     measured)
