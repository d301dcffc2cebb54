"""Token layout of one example inside the LLM's chat template.

    <template prefix up to the user content> audio_start [AUDIO] transcript audio_end "\\n" instruction
    <template suffix: end of user turn, start of assistant turn> target <end of turn>

The template pieces come from the tokenizer's own chat template, rendered once around a sentinel,
so any chat LLM works. Text that comes from data (transcript, instruction, target) is tokenized
with `split_special_tokens=True`: a transcript that contains "<|im_end|>" stays text.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import PromptConfig
from ..errors import SpeechLLMError

_SENTINEL = "\u2063SPEECHLLM_CONTENT\u2063"
_SENTINEL_2 = "\u2063SPEECHLLM_ANSWER\u2063"


class ChatTemplateError(SpeechLLMError, ValueError):
    """The tokenizer has no usable chat template."""


def description_prompt(description: str, instruction: str) -> str:
    """The text LLM's user turn about a clip it cannot hear: its description, then the instruction
    (DeSTA2's self-output prompt; also what the text reference reads in evaluation)."""
    return f"{description}\n\n{instruction}"


@dataclass
class PromptPieces:
    before_audio: list[int]
    """Template prefix and `audio_start`; the audio embeddings follow."""
    after_audio: list[int]
    """Transcript, `audio_end`, instruction and the template up to the assistant's first token."""


class PromptBuilder:
    """Turns (has_audio, transcript, instruction[, target]) into token id pieces."""

    def __init__(self, tokenizer, cfg: PromptConfig, system_prompt: str | None = None):
        if not getattr(tokenizer, "chat_template", None):
            raise ChatTemplateError(f"{tokenizer.name_or_path}: the tokenizer has no chat template; "
                                    "speechllm needs a chat (instruct) model")
        self.tokenizer, self.cfg = tokenizer, cfg
        messages = [{"role": "system", "content": system_prompt}] if system_prompt is not None else []
        self.system = tuple(messages)
        gen = tokenizer.apply_chat_template(messages + [{"role": "user", "content": _SENTINEL}],
                                            tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(
            messages + [{"role": "user", "content": _SENTINEL}, {"role": "assistant", "content": _SENTINEL_2}],
            tokenize=False)
        if gen.count(_SENTINEL) != 1 or full.count(_SENTINEL_2) != 1:
            raise ChatTemplateError(f"{tokenizer.name_or_path}: the chat template does not place the message "
                                    "content verbatim")
        prefix, suffix = gen.split(_SENTINEL)
        if not full.startswith(gen):
            raise ChatTemplateError(f"{tokenizer.name_or_path}: the generation prompt is not a prefix of the "
                                    "rendered conversation")
        end_of_turn = full.split(_SENTINEL_2, 1)[1].rstrip()
        self.prefix_ids = self._control(prefix)
        self.suffix_ids = self._control(suffix)
        self.end_of_turn_ids = self._control(end_of_turn) if end_of_turn else [tokenizer.eos_token_id]
        self.audio_start_ids = self._control(cfg.audio_start) if cfg.audio_start else []
        self.audio_end_ids = self._control(cfg.audio_end) if cfg.audio_end else []
        self.newline_ids = self._control("\n")

    def conversation(self, turns: list[tuple[str, str]], user_text: str) -> list[int]:
        """The chat prompt for `user_text` after earlier (user, assistant) `turns` (worked
        examples), up to the assistant's first token. The template is rendered around sentinels,
        so every content stays data text (never control tokens); with no turns this is exactly
        `pieces(user_text, None, has_audio=False)` joined."""
        if not turns:
            pieces = self.pieces(user_text, None, has_audio=False)
            return pieces.before_audio + pieces.after_audio
        contents = [text for turn in turns for text in turn] + [user_text]
        marks = [f"\u2063SPEECHLLM_TURN_{i}\u2063" for i in range(len(contents))]
        messages = list(self.system)
        for i, mark in enumerate(marks):
            messages.append({"role": "user" if i % 2 == 0 else "assistant", "content": mark})
        rendered = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids: list[int] = []
        for mark, content in zip(marks, contents):
            before, found, rendered = rendered.partition(mark)
            if not found:
                raise ChatTemplateError(f"{self.tokenizer.name_or_path}: the chat template does not place every "
                                        "turn's content verbatim")
            ids += self._control(before) + self.text(content)
        return ids + self._control(rendered)

    def _control(self, text: str) -> list[int]:
        """Trusted template text: control strings become their special tokens."""
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def text(self, text: str) -> list[int]:
        """Untrusted data text: never produces special tokens."""
        return self.tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]

    def pieces(self, instruction: str, transcript: str | None = None, has_audio: bool = True) -> PromptPieces:
        """The user turn around the audio slot. With no audio and no transcript this is exactly the
        base LLM's chat prompt for `instruction`."""
        if not has_audio and not transcript:
            return PromptPieces(before_audio=list(self.prefix_ids),
                                after_audio=self.text(instruction) + self.suffix_ids)
        transcript_ids = self.text(transcript.strip())[: self.cfg.max_transcript_tokens] if transcript else []
        return PromptPieces(
            before_audio=self.prefix_ids + (self.audio_start_ids if has_audio else []),
            after_audio=(transcript_ids + (self.audio_end_ids if has_audio else []) + self.newline_ids
                         + self.text(instruction) + self.suffix_ids),
        )

    def target(self, target: str, complete: bool = True) -> list[int]:
        """The assistant answer followed by the template's end-of-turn tokens (both in the loss);
        an answer cut at a length limit (`complete=False`) gets no end-of-turn."""
        return self.text(target) + (self.end_of_turn_ids if complete else [])

    @property
    def stop_ids(self) -> list[int]:
        """Token ids that end generation."""
        ids = {self.end_of_turn_ids[-1]}
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return sorted(ids)
