"""Optional LoRA on the frozen LLM through peft."""

from __future__ import annotations

from ..config import LoRAConfig


def apply_lora(model, cfg: LoRAConfig) -> None:
    """Wrap `model.llm` with peft LoRA adapters (trainable); the base weights stay frozen."""
    from peft import LoraConfig, get_peft_model

    peft_cfg = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                          target_modules=list(cfg.target_modules), bias="none", task_type="CAUSAL_LM")
    model.llm = get_peft_model(model.llm, peft_cfg)
    model.lora = cfg
