"""The benchmarks' FLOP counts (`scripts/bounds.py`) against what torch counts on real models.

A bound is only as honest as its arithmetic: each formula is held against torch's `FlopCounterMode`
running the model itself (tiny random configs, the eager attention kernel, whose matmuls the
counter sees): a forgotten layer, projection or LM head shows as a mismatch.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import LlamaConfig, LlamaForCausalLM, WhisperConfig, WhisperForConditionalGeneration

from speechllm.model.prefix import cache_kwarg

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from bounds import LLMFlops, WhisperFlops  # noqa: E402

MEL_FRAMES = 100
"""The tiny Whisper's window: 1 s at Whisper's 100 mel frames per second (50 encoder positions)."""


def _counted(fn) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def _tiny_whisper() -> WhisperForConditionalGeneration:
    config = WhisperConfig(vocab_size=120, num_mel_bins=8, d_model=32, encoder_layers=2, decoder_layers=3,
                           encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                           decoder_ffn_dim=48, max_source_positions=MEL_FRAMES // 2, max_target_positions=32,
                           pad_token_id=0, bos_token_id=0, eos_token_id=0, decoder_start_token_id=1)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    return WhisperForConditionalGeneration(config).eval()


def test_llm_forward_flops_match_torch_count():
    config = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    config._attn_implementation = "eager"  # the full square of scores, as the counter sees it
    torch.manual_seed(0)
    llm = LlamaForCausalLM(config).eval()
    positions = 7
    counted = _counted(lambda: llm(torch.randint(0, 100, (1, positions))))
    assert counted == LLMFlops.of(llm).forward(positions, positions * positions, positions)


def test_llm_training_flops_match_torch_count():
    """Forward and backward with the LLM frozen (the gradient flows to the input embeddings, as to
    an adapter's outputs): every matmul of both passes is in the formula."""
    config = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    llm = LlamaForCausalLM(config).eval().requires_grad_(False)
    positions = 7
    embeds = torch.randn(1, positions, 32, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        llm(inputs_embeds=embeds).logits.sum().backward()
    assert embeds.grad is not None
    assert counter.get_total_flops() == LLMFlops.of(llm).training(positions, positions * positions, positions)


def test_whisper_encoder_flops_match_torch_count():
    model = _tiny_whisper()
    flops = WhisperFlops.of(model.config)
    seconds = MEL_FRAMES / flops.mel_frames_per_second
    counted = _counted(lambda: model.model.encoder(torch.randn(1, 8, MEL_FRAMES)))
    assert counted == flops.encoder(seconds)


def test_whisper_greedy_decoding_flops_match_torch_count():
    """A greedy loop with the KV cache, as CTranslate2 decodes: the cross-attention keys and
    values once, then one position per step through every layer and the LM head."""
    model = _tiny_whisper()
    flops = WhisperFlops.of(model.config)
    states = model.model.encoder(torch.randn(1, 8, MEL_FRAMES))
    new, name = 5, cache_kwarg(model)

    def decode():
        ids, cache = torch.tensor([[model.config.decoder_start_token_id]]), None
        for _ in range(new):
            out = model(encoder_outputs=states, decoder_input_ids=ids, use_cache=True, **{name: cache})
            cache, ids = getattr(out, name), out.logits[:, -1:].argmax(-1)

    counted = _counted(decode)
    assert counted == flops.decoder(MEL_FRAMES / flops.mel_frames_per_second, prompt=1, new=new)


def test_whisper_window_padding_counts_as_whisper_runs_it():
    flops = WhisperFlops(width=384, encoder_layers=4, decoder_layers=4, encoder_ffn=1536, decoder_ffn=1536,
                         mels=80, vocab=51864)
    short = flops.transcription(3.0, prompt=2, new=12, padded=True)
    assert short == flops.transcription(30.0, prompt=2, new=12, padded=True)  # every clip costs a whole window
    assert flops.transcription(3.0, prompt=2, new=12, padded=False) < short / 5
