"""`scripts/bench_train.py`'s DeSTA2.5-style baseline trains the objective ours trains: its loss, as
DeSTA2.5's model computes it (the LLM's own forward with `labels=`: transformers' causal-LM loss
over logits at every position), equals `SpeechLLM.forward`'s (the LM head at target positions
only) on a batch padded as the baseline pads it, and so do the adapter's gradients. Only then is the
benchmark's speedup one of speed alone."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from speechllm.model import Batch, Example
from speechllm.model.speechllm import IGNORE_INDEX

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from bench_train import transformers_loss  # noqa: E402

PADDING = 9
"""Positions of padding after the longest sequence (the baseline pads every batch to 300)."""


def test_desta_style_full_logits_loss_equals_ours(tiny_model, sample_wav):
    exs = [Example("What can you hear?", sample_wav, "cold hearted", "a calm voice"),
           Example("Describe the voice.", sample_wav[:20000], None, "low and slow, a longer answer here")]

    def loss_and_grads(loss_of):
        tiny_model.zero_grad()
        b = tiny_model.build_batch(exs)  # the adapter runs in it: a fresh graph per backward
        loss = loss_of(Batch(F.pad(b.inputs_embeds, (0, 0, 0, PADDING)), F.pad(b.attention_mask, (0, PADDING)),
                             F.pad(b.labels, (0, PADDING), value=IGNORE_INDEX)))
        loss.backward()
        return float(loss.detach()), [p.grad.clone() for p in tiny_model.adapter.parameters() if p.grad is not None]

    ours = loss_and_grads(tiny_model)
    desta = loss_and_grads(lambda batch: transformers_loss(tiny_model, batch))
    assert desta[0] == pytest.approx(ours[0], rel=1e-5)
    assert len(desta[1]) == len(ours[1]) > 0
    for a, b in zip(desta[1], ours[1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
