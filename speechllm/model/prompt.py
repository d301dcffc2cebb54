"""Token layout of one example inside the LLM's chat template.

    <template prefix up to the user content> audio_start [AUDIO] transcript audio_end "\\n" instruction
    <template suffix: end of user turn, start of assistant turn> target <end of turn>

The template pieces come from the tokenizer's own chat template, rendered once around sentinels,
so any chat LLM works (tested with the real templates of Llama 3 / 3.1, Qwen2.5 / 3, Gemma 2 / 3,
Mistral v0.1 / v0.3, Phi-3 and SmolLM2). Text that comes from data (transcript, instruction,
target) is tokenized with `split_special_tokens=True`: a transcript that contains "<|im_end|>"
stays text.

Templates differ in ways the layout handles:
- A template that rejects a system message (Gemma 2, Mistral v0.1), drops it, or moves it (Mistral
  v0.3 puts it into the last user turn only): the system prompt is folded into the first user turn
  (`system + "\\n\\n" + content`, what Gemma 3's own template does), and a line on stderr says so.
- A template that puts text between the generation prompt and an answer (Qwen3's empty
  `<think>\\n\\n</think>\\n\\n`, its no-thinking mode): the prompt ends with that text, so the frozen
  LLM answers, and the adapter is trained, in that mode. Whitespace there (Mistral v0.3's " ")
  belongs to the answer and is tokenized with it.
- The end of turn is the first special token after an answer (`<|eot_id|>`, `<end_of_turn>`,
  `</s>`, `<|im_end|>`, `<|end|>`); generation stops on it and on the eos token.
- With no audio the prompt is the tokenization of the whole rendered text, exactly the ids of the
  tokenizer's own `apply_chat_template(..., tokenize=True)` (templates of SentencePiece families
  merge a space across the content's boundary, so piecewise tokenization would differ), unless the
  content holds control strings: then it is tokenized piecewise and stays text.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from ..config import PromptConfig
from ..errors import SpeechLLMError

_SENTINEL = "\u2063SPEECHLLM_CONTENT\u2063"
_SENTINEL_2 = "\u2063SPEECHLLM_ANSWER\u2063"
SYSTEM_FOLD_SEPARATOR = "\n\n"
"""Between a folded system prompt and the first user turn's content (as Gemma 3's template joins them)."""


class ChatTemplateError(SpeechLLMError, ValueError):
    """The tokenizer has no usable chat template."""


def description_prompt(description: str, instruction: str) -> str:
    """The text LLM's user turn about a clip it cannot hear: its description, then the instruction
    (DeSTA2's self-output prompt; also what the text reference reads in evaluation)."""
    return f"{description}\n\n{instruction}"


@dataclass
class PromptPieces:
    before_audio: list[int]
    """Template prefix and `audio_start`; the audio embeddings follow. Without audio and transcript:
    the whole prompt."""
    after_audio: list[int]
    """Transcript, `audio_end`, instruction and the template up to the assistant's first token."""


class PromptBuilder:
    """Turns (has_audio, transcript, instruction[, target]) into token id pieces.

    Attributes set from the template: `prefix_ids`, `suffix_ids` (the prompt around the user
    content), `end_of_turn_ids` (after a target), `folded_system` (the system prompt is folded into
    the first user turn), `answer_lead` (whitespace the template puts before an answer)."""

    def __init__(self, tokenizer, cfg: PromptConfig, system_prompt: str | None = None):
        if not getattr(tokenizer, "chat_template", None):
            raise ChatTemplateError(f"{self._name(tokenizer)}: the tokenizer has no chat template; "
                                    "speechllm needs a chat (instruct) model")
        self.tokenizer, self.cfg, self.system_prompt = tokenizer, cfg, system_prompt
        self.special_ids = ({i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
                            | set(tokenizer.all_special_ids))
        """Ids that plain text never produces (`split_special_tokens=True`)."""
        self.folded_system = False
        native_problem, layout = None, None
        if system_prompt is not None:
            try:
                layout = self._layout()
            except ChatTemplateError as err:
                native_problem = err
                self.folded_system = True
        if layout is None:
            try:
                layout = self._layout()
            except ChatTemplateError as err:
                if native_problem is not None:
                    raise ChatTemplateError(f"{native_problem}; with the system prompt folded into the user turn: "
                                            f"{err}") from None
                raise
        prefix, suffix, lead, end = layout
        if native_problem is not None:
            print(f"[speechllm] {self._name(tokenizer)}: the chat template takes no system message "
                  f"({native_problem}); the system prompt is folded into the first user turn, as this model's "
                  "users do", file=sys.stderr, flush=True)
        self.system = ({"role": "system", "content": system_prompt},) if system_prompt is not None \
            and not self.folded_system else ()
        self.prefix_text, self.suffix_text, self.answer_lead = prefix, suffix, lead
        self.prefix_ids = self._control(prefix)
        self.suffix_ids = self._control(suffix)
        self.end_of_turn_ids = self._end_of_turn(end)
        self.audio_start_ids = self._control(cfg.audio_start) if cfg.audio_start else []
        self.audio_end_ids = self._control(cfg.audio_end) if cfg.audio_end else []
        self.newline_ids = self._control("\n")

    # ------------------------------------------------------------------ the template

    @staticmethod
    def _name(tokenizer) -> str:
        return getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__

    def _messages(self, contents: list[str]) -> list[dict]:
        """Alternating user / assistant messages with the system prompt, native or folded."""
        messages = []
        if self.system_prompt is not None and not self.folded_system:
            messages.append({"role": "system", "content": self.system_prompt})
        for i, content in enumerate(contents):
            if i == 0 and self.folded_system and self.system_prompt is not None:
                content = self.system_prompt + SYSTEM_FOLD_SEPARATOR + content
            messages.append({"role": "user" if i % 2 == 0 else "assistant", "content": content})
        return messages

    def _render(self, contents: list[str], add_generation_prompt: bool) -> str:
        try:
            text = self.tokenizer.apply_chat_template(self._messages(contents), tokenize=False,
                                                      add_generation_prompt=add_generation_prompt)
        except Exception as err:  # jinja2's TemplateError from raise_exception, or a template bug
            roles = "system + user" if self.system_prompt is not None and not self.folded_system else "user"
            raise ChatTemplateError(f"{self._name(self.tokenizer)}: the chat template fails on a {roles} "
                                    f"conversation ({type(err).__name__}: {err})") from None
        if not isinstance(text, str):
            raise ChatTemplateError(f"{self._name(self.tokenizer)}: the chat template renders no text")
        return text

    def _layout(self) -> tuple[str, str, str, str]:
        """(prefix, suffix, answer lead, text after an answer) of the template, rendered around
        sentinels; `ChatTemplateError` when the template does not place contents verbatim, drops
        the system prompt or does not continue its generation prompt with the answer."""
        name = self._name(self.tokenizer)
        gen = self._render([_SENTINEL], add_generation_prompt=True)
        full = self._render([_SENTINEL, _SENTINEL_2], add_generation_prompt=False)
        if gen.count(_SENTINEL) != 1 or full.count(_SENTINEL) != 1 or full.count(_SENTINEL_2) != 1:
            raise ChatTemplateError(f"{name}: the chat template does not place the message content verbatim "
                                    "(once, unchanged), so speechllm cannot put audio into the user turn")
        if self.system_prompt and not self.folded_system and not (self.system_prompt.strip() in gen
                                                                  and self.system_prompt.strip() in full):
            raise ChatTemplateError(f"{name}: the chat template drops or moves the system message")
        prefix, suffix = gen.split(_SENTINEL)
        head, end = full.split(_SENTINEL_2)
        if not head.startswith(gen):
            raise ChatTemplateError(f"{name}: the generation prompt is not a prefix of the rendered conversation")
        between = head[len(gen):]
        if between.strip():
            suffix += between  # e.g. Qwen3's empty think block: the template's no-thinking mode
            print(f"[speechllm] {name}: the chat template puts {between!r} before an answer; prompts end with "
                  "it", file=sys.stderr, flush=True)
            between = ""
        return prefix, suffix, between, end

    def _end_of_turn(self, after_answer: str) -> list[int]:
        """The template's text after an answer up to its first special token (the end-of-turn
        token); the eos token when that text holds none."""
        ids = self._control(after_answer)
        for i, token in enumerate(ids):
            if token in self.special_ids:
                return ids[: i + 1]
        if self.tokenizer.eos_token_id is None:
            raise ChatTemplateError(f"{self._name(self.tokenizer)}: the chat template ends a turn with no special "
                                    "token and the tokenizer has no eos token: generation could not stop")
        return [self.tokenizer.eos_token_id]

    # ------------------------------------------------------------------ tokenizing

    def _control(self, text: str) -> list[int]:
        """Trusted template text: control strings become their special tokens."""
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def text(self, text: str) -> list[int]:
        """Untrusted data text: never produces special tokens."""
        return self.tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]

    def _specials(self, ids: list[int]) -> int:
        return sum(i in self.special_ids for i in ids)

    def _filled(self, template_parts: list[str], contents: list[str]) -> list[int]:
        """The ids of template text interleaved with data contents (`template_parts` has one more
        item): the whole text tokenized at once, as the model's own tokenizer does, when that makes
        no special token beyond the template's; else piece by piece, contents as text."""
        pieces: list[int] = []
        for part, content in zip(template_parts, contents):
            pieces += self._control(part) + self.text(content)
        pieces += self._control(template_parts[-1])
        whole_text = "".join(p + c for p, c in zip(template_parts, contents)) + template_parts[-1]
        whole = self._control(whole_text)
        return whole if self._specials(whole) == self._specials(pieces) else pieces

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
        rendered = self._render(marks, add_generation_prompt=True)
        parts = []
        for mark in marks:
            before, found, rendered = rendered.partition(mark)
            if not found:
                raise ChatTemplateError(f"{self._name(self.tokenizer)}: the chat template does not place every "
                                        "turn's content verbatim")
            parts.append(before)
        if self.suffix_text.startswith(rendered):
            rendered = self.suffix_text  # the answer preamble (Qwen3) the single-turn prompt ends with
        return self._filled(parts + [rendered], contents)

    def pieces(self, instruction: str, transcript: str | None = None, has_audio: bool = True) -> PromptPieces:
        """The user turn around the audio slot. With no audio and no transcript this is exactly the
        base LLM's chat prompt for `instruction` (the ids of its own `apply_chat_template`)."""
        if not has_audio and not transcript:
            return PromptPieces(before_audio=self._filled([self.prefix_text, self.suffix_text], [instruction]),
                                after_audio=[])
        transcript_ids = self.text(transcript.strip())[: self.cfg.max_transcript_tokens] if transcript else []
        return PromptPieces(
            before_audio=self.prefix_ids + (self.audio_start_ids if has_audio else []),
            after_audio=(transcript_ids + (self.audio_end_ids if has_audio else []) + self.newline_ids
                         + self.text(instruction) + self.suffix_ids),
        )

    def target(self, target: str, complete: bool = True) -> list[int]:
        """The assistant answer followed by the template's end-of-turn token (both in the loss);
        an answer cut at a length limit (`complete=False`) gets no end-of-turn."""
        return self.text(self.answer_lead + target) + (self.end_of_turn_ids if complete else [])

    @property
    def user_turn_open_ids(self) -> list[int]:
        """The chat template up to and including the user turn's header, with the system prompt
        (native, or folded into the user turn where the template takes none): what Magpie feeds
        the LLM so that it writes a user's message."""
        return list(self.prefix_ids)

    @property
    def user_turn_end_ids(self) -> list[int]:
        """The token that closes a user turn: the first special token of the template after the
        user content (`<|im_end|>`, `<|eot_id|>`, `<end_of_turn>`, `[/INST]`, `<|end|>`). A
        template that closes the user turn with plain text (Mistral v0.1's " [/INST]") is a
        `ChatTemplateError`: a model never emits that text as one token to stop on."""
        for token in self.suffix_ids:
            if token in self.special_ids:
                return [token]
        raise ChatTemplateError(f"{self._name(self.tokenizer)}: the chat template closes a user turn with plain text "
                                f"({self.suffix_text!r}), not a special token, so the end of an instruction the "
                                "model writes cannot be detected")

    @property
    def stop_ids(self) -> list[int]:
        """Token ids that end generation: the end-of-turn token and the eos token."""
        ids = {self.end_of_turn_ids[-1]}
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return sorted(ids)
