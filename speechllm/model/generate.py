"""The one batched text generator of the frozen base LLM (targets, the eval reference, serve):
prompts sorted by length, the prompts' shared first tokens computed once (`prefix.py`) with the
padding after them, KV cache, greedy or seeded sampling (a `GenerationConfig`), and a per-answer
record of whether it finished."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import Config, GenerationConfig
from .llm import context_length, load_llm
from .decode import Decoded, Prompts, greedy_decode_in_order
from .packed import packed_linears
from .prefix import cache_kwarg, expand_cache, prefix_cache, prompt_prefix_length
from .prompt import PromptBuilder


@dataclass
class Generation:
    text: str
    """The decoded answer, special tokens removed, stripped."""
    tokens: int
    """Generated tokens before the stop token."""
    finished: bool
    """True when the model emitted a stop token within `max_new_tokens`."""


def provenance(gen: GenerationConfig) -> dict:
    """The decoding settings a generated target records (sampling settings only when sampling)."""
    out = {"max_new_tokens": gen.max_new_tokens, "do_sample": gen.do_sample, "seed": gen.seed}
    if gen.do_sample:
        out.update(temperature=gen.temperature, top_p=gen.top_p)
    if gen.repetition_penalty != 1.0:
        out.update(repetition_penalty=gen.repetition_penalty)
    return out


class TextGenerator:
    """The base LLM answering user turns (text only, data text never becomes control tokens)."""

    def __init__(self, llm, tokenizer, prompt: PromptBuilder, model_name: str):
        self.llm, self.tokenizer, self.prompt, self.model_name = llm.eval(), tokenizer, prompt, model_name
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else prompt.stop_ids[0]

    @classmethod
    def from_config(cls, cfg: Config, device: str | torch.device = "cpu") -> "TextGenerator":
        """The base LLM of `cfg.model.llm`, with its system prompt."""
        llm, tokenizer = load_llm(cfg.model.llm, device)
        prompt = PromptBuilder(tokenizer, cfg.model.prompt, cfg.model.llm.system_prompt)
        return cls(llm, tokenizer, prompt, cfg.model.llm.name)

    @property
    def context_length(self) -> int | None:
        """Most positions the LLM takes (prompt and answer together); None when unknown."""
        return context_length(self.llm)

    def prompt_ids(self, user_text: str, examples: list[tuple[str, str]] = ()) -> list[int]:
        """The chat prompt for one user turn, after worked-example (user, assistant) turns if any,
        up to the assistant's first token."""
        return self.prompt.conversation(list(examples), user_text)

    def target_length(self, text: str) -> int:
        """Tokens the answer takes as a training target (end-of-turn included)."""
        return len(self.prompt.target(text))

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], sampling: GenerationConfig, batch_size: int,
                 on_batch=None, stop_ids: list[int] | None = None) -> list[Generation]:
        """Answers to token-id prompts, in input order, at most `batch_size` decoded at once.
        Prompts are taken in order of length (less padding); with sampling, batch k is seeded with
        `seed + k`. Generation stops on `stop_ids` (default: the end of the assistant's turn and
        eos). With `sampling.reuse_prefix` the ids every prompt starts with are run once for the
        whole call and their KV cache expanded over each batch; each batch is then laid out as
        [shared prefix][padding][rest of the prompt] (batch, prefix + longest rest). Greedy decoding
        drops each answer from its batch once it stops and fills the freed rows with the next
        prompts (`sampling.drop_finished`, `decode.py`). `on_batch(answers, tokens)` is called as
        answers end (per answer when decoding greedily, per batch when sampling)."""
        device = self.llm.get_input_embeddings().weight.device
        order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), i))
        stop = set(self.prompt.stop_ids if stop_ids is None else stop_ids)
        n_prefix = prompt_prefix_length(prompts) if sampling.reuse_prefix else 0
        shared = prefix_cache(self.llm, prompts[0][:n_prefix]) if n_prefix else None
        out: list[Generation | None] = [None] * len(prompts)

        def layout(idx: list[int]) -> tuple[torch.Tensor, torch.Tensor, object]:
            """(ids, mask, prefix cache) of the prompts `idx`: [shared prefix][padding][rest]."""
            width = max(len(prompts[i]) for i in idx)
            ids = torch.full((len(idx), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):
                p = prompts[i]
                ids[row, :n_prefix] = torch.tensor(p[:n_prefix], dtype=torch.long)
                ids[row, width - len(p) + n_prefix:] = torch.tensor(p[n_prefix:], dtype=torch.long)
                mask[row, :n_prefix] = 1
                mask[row, width - len(p) + n_prefix:] = 1
            cache = expand_cache(self.llm, shared, len(idx)) if shared is not None else None
            return ids.to(device), mask.to(device), cache

        def answer(i: int, kept: list[int], finished: bool) -> Generation:
            out[i] = Generation(text=self.tokenizer.decode(kept, skip_special_tokens=True).strip(),
                                tokens=len(kept), finished=finished)
            return out[i]

        if sampling.drops_finished:
            embed = self.llm.get_input_embeddings()

            def prompts_of(positions: list[int]) -> Prompts:
                ids, mask, cache = layout([order[j] for j in positions])
                return Prompts(embed(ids[:, n_prefix:]), mask, cache)

            def done(j: int, d: Decoded) -> None:
                g = answer(order[j], d.tokens[:-1] if d.finished else d.tokens, d.finished)
                if on_batch is not None:
                    on_batch(1, g.tokens)

            greedy_decode_in_order(self.llm, len(order), prompts_of, batch_size, sampling.max_new_tokens, sorted(stop),
                                   sampling.kv_in_place, sampling.packed_weights, on_finish=done)
            return out  # type: ignore[return-value]
        for k, start in enumerate(range(0, len(order), batch_size)):
            idx = order[start: start + batch_size]
            ids, mask, cache = layout(idx)
            for i, (kept, finished) in zip(idx, self._transformers_generate(ids, mask, n_prefix, cache, sampling,
                                                                           sorted(stop), k)):
                answer(i, kept, finished)
            if on_batch is not None:
                on_batch(len(idx), sum(out[i].tokens for i in idx))
        return out  # type: ignore[return-value]

    def _transformers_generate(self, ids: torch.Tensor, mask: torch.Tensor, n_prefix: int, cache,
                               sampling: GenerationConfig, stop: list[int], batch_index: int
                               ) -> list[tuple[list[int], bool]]:
        """(ids before the stop token, finished) per row, by transformers' `generate` (sampling seeded
        with `sampling.seed + batch_index`)."""
        kwargs = dict(max_new_tokens=sampling.max_new_tokens, do_sample=sampling.do_sample, eos_token_id=stop,
                      pad_token_id=self.pad_id, use_cache=True, repetition_penalty=sampling.repetition_penalty)
        if cache is not None:
            kwargs[cache_kwarg(self.llm)] = cache
        if sampling.do_sample:
            torch.manual_seed(sampling.seed + batch_index)
            kwargs.update(temperature=sampling.temperature, top_p=sampling.top_p)
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        with packed_linears(self.llm, sampling.packed_weights):
            new = self.llm.generate(input_ids=ids, attention_mask=mask, **kwargs)[:, ids.shape[1]:]
        rows = []
        for toks in new.tolist():
            end = next((j for j, t in enumerate(toks) if t in stop), None)
            rows.append((toks if end is None else toks[:end], end is not None))
        return rows
