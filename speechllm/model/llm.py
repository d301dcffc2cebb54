"""The one place a frozen chat LLM is loaded (the speech model, the targets generator, the text
reference and the KL baseline all come through `load_llm`)."""

from __future__ import annotations

import torch

from ..config import LLMConfig
from ..hub import weights
from . import attention

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""`model.llm.dtype` names -> torch dtypes."""
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length")
"""Config attributes that give an LLM's context length, by family."""


def llm_identity(cfg: LLMConfig) -> dict:
    """What makes the frozen LLM answer as it does: its name, weights fingerprint, system prompt,
    dtype (bf16 and fp32 answer differently) and the attention kernel when one is chosen. Every
    saved answer or score made by the base LLM (answer caches, targets provenance, the curve's
    reference, target NLL) records it."""
    identity = {"model": cfg.name, "fingerprint": weights.fingerprint(cfg.name), "system_prompt": cfg.system_prompt,
                "dtype": cfg.dtype}
    if cfg.attn_implementation != "auto":
        identity["attn_implementation"] = cfg.attn_implementation
    return identity


def text_config(llm):
    """The config of `llm`'s text decoder: a multimodal model's `text_config`, else its own."""
    return getattr(llm.config, "text_config", llm.config)


def context_length(llm) -> int | None:
    """Most positions `llm` takes (prompt and answer together), from its config; None when its
    config names none."""
    for key in CONTEXT_KEYS:
        value = getattr(llm.config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def load_llm(cfg: LLMConfig, device: str | torch.device = "cpu", tokenizer: bool = True):
    """(causal LM in eval mode on `device`, its tokenizer or None) for the LLM `cfg` names (an
    embedded name, a hub id or a local folder), in `cfg.dtype`. Custom modelling code runs only
    with `cfg.trust_remote_code`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = weights.resolve(cfg.name)
    attention.register()
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code) if tokenizer else None
    kernel = {} if cfg.attn_implementation == "auto" else {"attn_implementation": cfg.attn_implementation}
    llm = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[cfg.dtype], trust_remote_code=cfg.trust_remote_code,
                                               **kernel)
    return llm.to(device).eval(), tok
