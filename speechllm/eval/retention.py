"""Text-only retention: does the speech model, given no audio, still behave like the base LLM?

The speech model's text path (no audio; LoRA active if trained with it) and the base LLM (a
freshly loaded copy, `load_base_llm`, when LoRA changed the model's own) score the same chat prompts; the mean KL divergence of their next-token
distributions over every prompt position is reported. A frozen LLM without LoRA gives exactly 0.
"""

from __future__ import annotations

import torch

DEFAULT_PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three uses of a paperclip, as bullet points.",
    "Answer in JSON with keys name and age: who wrote Hamlet, and how old was he when he died?",
    "Explain in one sentence why the sky is blue.",
    "Translate 'good morning' into Spanish.",
    "Reply in all lowercase letters: what is your favourite colour?",
    "Summarise the plot of Cinderella in fewer than 30 words.",
]


@torch.no_grad()
def text_kl(model, base_llm, prompts: list[str] = DEFAULT_PROMPTS) -> dict:
    """Mean and max over prompts of the per-position mean KL(base || speech text path), in nats."""
    per_prompt = []
    for text in prompts:
        pieces = model.prompt.pieces(text, None, has_audio=False)
        ids = torch.tensor([pieces.before_audio + pieces.after_audio], device=model.device)
        ours = model.text_logits(ids).float().log_softmax(-1)
        ref = base_llm(input_ids=ids.to(base_llm.device)).logits.float().log_softmax(-1).to(ours.device)
        kl = (ref.exp() * (ref - ours)).sum(-1).mean()
        per_prompt.append(float(kl.clamp_min(0.0)))
    return {"kl": sum(per_prompt) / len(per_prompt), "kl_max": max(per_prompt), "prompts": len(prompts)}


def load_base_llm(model):
    """A fresh copy of the speech model's base LLM, loaded from its weights (not shared)."""
    from ..model.llm import load_llm

    return load_llm(model.config.llm, model.device, tokenizer=False)[0]
