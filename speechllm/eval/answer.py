"""The two systems every check compares, answering in batches.

* the **speech model**: audio (+ ASR transcript) and an instruction -> answer;
* the **reference**: the same base LLM reading the clip's text description and the instruction
  (the user turn the self-output targets were made from: ``description\\n\\ninstruction``).

Both sort their inputs by length in LLM positions so that a batch pads little, and return answers in
input order.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..config import GenerationConfig
from ..model.prompt import PromptBuilder, description_prompt
from ..model.speechllm import Example, SpeechLLM
from ..model.generate import Generation, TextGenerator

OnBatch = Callable[[int], None]
"""Called after each batch with the number of answers it produced (progress bars)."""


def reference_prompt(description: str, instruction: str) -> str:
    """The reference's user turn: the same text the self-output targets were generated from."""
    return description_prompt(description, instruction)


@torch.inference_mode()
def speech_answers(model: SpeechLLM, examples: list[Example], gen: GenerationConfig, batch_size: int,
                   on_batch: OnBatch | None = None) -> list[str]:
    """The speech model's answers, at most `batch_size` decoded at once, taken in order of prompt
    length in LLM positions (audio embeddings, transcript and instruction: a batch of similar
    lengths pads little); greedy decoding fills the rows of finished answers with the next
    examples (`decode.py`)."""
    order = sorted(range(len(examples)), key=lambda i: (model.example_positions(examples[i]), i))
    out: list[str | None] = [None] * len(examples)
    for i, text in zip(order, model.generate([examples[i] for i in order], gen, batch_size)):
        out[i] = text
    if on_batch is not None:
        on_batch(len(examples))
    return out  # type: ignore[return-value]


def text_path_is_reference(model: SpeechLLM, reference: "Reference", texts: list[str]) -> bool:
    """True when the speech model's text path is the base LLM itself (no LoRA) and lays out every
    text of `texts` as a user turn with the reference's token ids: its greedy answers to them are
    then the reference's (the text path gives the base LLM's logits exactly, tested), so they need
    not be generated a second time."""
    if model.lora is not None:
        return False
    for text in texts:
        pieces = model.prompt.pieces(text, None, has_audio=False)
        if pieces.before_audio + pieces.after_audio != reference.generator.prompt_ids(text):
            return False
    return True


class Reference:
    """The base LLM reading text descriptions. Shares the speech model's LLM when that LLM is
    unchanged (frozen, no LoRA); with LoRA a fresh copy of the base LLM is loaded, so the
    reference never sees the speech training."""

    def __init__(self, generator: TextGenerator):
        self.generator = generator

    @classmethod
    def for_model(cls, model: SpeechLLM) -> "Reference":
        """The reference for `model`'s base LLM: the model's own LLM when unchanged (frozen, no
        LoRA), else a freshly loaded copy of the base."""
        if model.lora is None:
            llm = model.llm
        else:
            from .retention import load_base_llm

            llm = load_base_llm(model)
        prompt = PromptBuilder(model.tokenizer, model.config.prompt, model.config.llm.system_prompt)
        return cls(TextGenerator(llm, model.tokenizer, prompt, model.config.llm.name))

    def answer_text(self, instructions: list[str], gen: GenerationConfig, batch_size: int,
                    on_batch: OnBatch | None = None) -> list[Generation]:
        """The base LLM answering plain text prompts (no description): the text-only checks."""
        prompts = [self.generator.prompt_ids(q) for q in instructions]
        callback = (lambda n, _tokens: on_batch(n)) if on_batch is not None else None
        return self.generator.generate(prompts, gen, batch_size, on_batch=callback)

    def answer(self, descriptions: list[str], instructions: list[str], gen: GenerationConfig, batch_size: int,
               on_batch: OnBatch | None = None) -> list[Generation]:
        if len(descriptions) != len(instructions):
            raise ValueError(f"{len(descriptions)} descriptions for {len(instructions)} instructions")
        prompts = [self.generator.prompt_ids(reference_prompt(d, q)) for d, q in zip(descriptions, instructions)]
        callback = (lambda n, _tokens: on_batch(n)) if on_batch is not None else None
        return self.generator.generate(prompts, gen, batch_size, on_batch=callback)
