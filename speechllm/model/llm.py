"""The one place a frozen chat LLM is loaded (the speech model, the targets generator, the text
reference and the KL baseline all come through `load_llm`)."""

from __future__ import annotations

import torch

from ..config import LLMConfig
from ..hub import weights

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""`model.llm.dtype` names -> torch dtypes."""
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length")
"""Config attributes that give an LLM's context length, by family."""


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
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code) if tokenizer else None
    llm = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[cfg.dtype], trust_remote_code=cfg.trust_remote_code)
    return llm.to(device).eval(), tok
