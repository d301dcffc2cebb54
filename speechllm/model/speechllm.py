"""SpeechLLM(encoder, adapter, llm): a frozen Whisper encoder feeds a trainable adapter whose
embeddings sit inside the user turn of a frozen chat LLM.

Invariant (tested): with no audio and no LoRA, the text path gives exactly the base LLM's logits.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn
from torch.autograd.graph import increment_version

from ..errors import SpeechLLMError
from ..hub import weights
from ..config import Config, ConfigError, GenerationConfig, LoRAConfig, ModelConfig, config_from_dict, to_dict
from .adapters import InputStandardizer, build_adapter
from .attention import kernel, probability_bytes, training_kernel
from ..io.audio import SAMPLE_RATE
from .encoder import WhisperTappedEncoder, load_whisper_encoder
from .llm import DTYPES, context_length, load_llm, text_config
from .decode import Prompts, greedy_decode_in_order
from .packed import packed_linears
from .prefix import (FrozenPrefixCache, cache_kwarg, expand_cache, shared_prefix_length, states_after_prefix,
                     with_prefix_mask)
from .prompt import PromptBuilder, PromptPieces

ADAPTER_WEIGHTS = "adapter.safetensors"
CHECKPOINT_CONFIG = "config.json"
CHECKPOINT_FORMAT = "speechllm-adapter/1"
IGNORE_INDEX = -100
BASE_PARTS = ("encoder", "llm")
"""The base models a checkpoint names and fingerprints."""
LOAD_ERRORS = (OSError, ValueError, KeyError, RuntimeError)
"""What transformers, safetensors and torch raise for a folder that is not the model it claims."""


class CheckpointError(SpeechLLMError, ValueError):
    """A checkpoint folder that cannot be loaded, or that does not match the base models."""


class LengthError(SpeechLLMError, ValueError):
    """An input longer than the LLM's context (prompt, audio and the answer's room together)."""


@dataclass
class Example:
    """One item for the model. `audio` None means a text-only example."""
    instruction: str
    audio: np.ndarray | None = None
    """16 kHz mono float32 waveform."""
    transcript: str | None = None
    target: str | None = None
    """The answer to learn (training only)."""
    states: list[torch.Tensor] | None = None
    """Precomputed tapped encoder states (one (frames, width) tensor per tap), e.g. from the
    feature cache; used instead of running the encoder on `audio`."""
    id: str | None = None
    """Record id, for error messages."""
    target_mask: list[bool] | None = None
    """Per target token (end-of-turn excluded), False leaves it out of the loss (token masking)."""
    target_complete: bool = True
    """False: the target was cut at the length limit; it is learned without the end-of-turn
    tokens, so the model learns its words but never to stop where it was cut."""

    @property
    def has_audio(self) -> bool:
        return self.audio is not None or self.states is not None


@dataclass
class Batch:
    inputs_embeds: torch.Tensor
    """(batch, seq, llm_width): the positions after `prefix_ids`."""
    attention_mask: torch.Tensor
    """(batch, seq), 1 for real positions (the prefix's positions are not in it)."""
    labels: torch.Tensor | None
    """(batch, seq), target token ids, IGNORE_INDEX elsewhere; None for generation batches."""
    prefix_ids: list[int] = field(default_factory=list)
    """Token ids every sequence starts with, before `inputs_embeds`: their KV cache is computed
    once for the batch and expanded over it (`prefix.py`). Empty: `inputs_embeds` holds the whole
    sequences."""

    @property
    def full_attention_mask(self) -> torch.Tensor:
        """(batch, prefix + seq): the mask over the prefix and the rest."""
        return with_prefix_mask(len(self.prefix_ids), self.attention_mask)


class SpeechLLM(nn.Module):
    """Composition of built modules; only the adapter is trainable by default.

    Args:
        encoder: a `WhisperTappedEncoder` (frozen).
        adapter: a registered adapter module (trainable).
        llm: a transformers causal LM (frozen).
        tokenizer: the LLM's tokenizer (with a chat template).
        config: the `ModelConfig` these were built from (saved with checkpoints).
    """

    def __init__(self, encoder: WhisperTappedEncoder, adapter: nn.Module, llm: nn.Module, tokenizer,
                 config: ModelConfig):
        super().__init__()
        self.encoder, self.adapter, self.llm, self.tokenizer, self.config = encoder, adapter, llm, tokenizer, config
        self.encoder.requires_grad_(False)
        self.llm.requires_grad_(False)
        self.llm.eval()
        self.prompt = PromptBuilder(tokenizer, config.prompt, config.llm.system_prompt)
        self.embedding_norm = None
        """Mean norm of the LLM's token embeddings, when audio embeddings are rescaled to it."""
        if config.adapter.match_embedding_norm:
            with torch.no_grad():
                self.embedding_norm = float(llm.get_input_embeddings().weight.float().norm(dim=-1).mean())
        self.lora = None
        """The LoRAConfig applied to the LLM (by `speechllm.model.lora.apply_lora`), if any."""
        self.lora_merged = False
        """True once `merge_lora` folded the LoRA weights into the LLM (inference only)."""
        self.standardizer = (InputStandardizer(len(config.encoder.layers), encoder.width)
                             if config.adapter.standardize else None)
        """Per-channel standardization of the tapped states before the adapter (fitted by the
        trainer, saved with the adapter), when `model.adapter.standardize`."""
        self.prefixes = FrozenPrefixCache()
        """The shared prompt prefix's KV, kept across forward passes while the LLM is frozen."""

    # ------------------------------------------------------------------ building

    @classmethod
    def from_config(cls, config: ModelConfig, device: str | torch.device = "cpu") -> "SpeechLLM":
        """Resolve and load the base models named in `config` and build a fresh adapter. A model
        that cannot be loaded, or a setting that does not fit it, is an error naming the key."""
        dtype = DTYPES[config.llm.dtype]
        for name in (config.encoder.name, config.llm.name):  # an unknown name fails now, not after retries
            weights.check_available(name)
        path = weights.resolve(config.encoder.name)
        try:
            encoder = load_whisper_encoder(path, config.encoder.layers, dtype=dtype)
        except ValueError as err:
            if str(err).startswith("encoder.layers"):  # the taps do not fit this encoder
                raise ConfigError(f"model.{err}") from None
            raise _load_error("model.encoder.name", config.encoder.name, err) from None
        except LOAD_ERRORS as err:
            raise _load_error("model.encoder.name", config.encoder.name, err) from None
        try:
            llm, tokenizer = load_llm(config.llm)
        except LOAD_ERRORS as err:
            raise _load_error("model.llm.name", config.llm.name, err) from None
        try:
            adapter = build_adapter(config.adapter, encoder_width=encoder.width, num_taps=len(config.encoder.layers),
                                    llm_width=llm.get_input_embeddings().embedding_dim)
        except ValueError as err:
            raise ConfigError(f"model.adapter: {err}") from None
        return cls(encoder, adapter, llm, tokenizer, config).to(device)

    @property
    def device(self) -> torch.device:
        return self.llm.get_input_embeddings().weight.device

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """What a checkpoint saves, by qualified name: every parameter that requires grad (adapter;
        LoRA when enabled) and the adapter's fitted input statistics (`standardizer.*`)."""
        state = {n: p.detach() for n, p in self.named_parameters() if p.requires_grad}
        if self.standardizer is not None:
            state.update({f"standardizer.{n}": b for n, b in self.standardizer.named_buffers()})
        return state

    # ------------------------------------------------------------------ inputs

    def encode_audio(self, waveforms: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        """waveforms -> adapter embeddings (batch, L, llm_width) and (batch,) lengths."""
        with torch.no_grad():
            enc = self.encoder.encode(waveforms)
        return self._adapt(enc.states, enc.lengths)

    def adapt_states(self, per_clip: list[list[torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Precomputed tapped states (per clip, per tap (frames, width)) -> adapter embeddings."""
        lengths = torch.tensor([clip[0].shape[0] for clip in per_clip], device=self.device)
        longest = int(lengths.max())
        taps = []
        for t in range(len(per_clip[0])):
            x = torch.zeros(len(per_clip), longest, per_clip[0][t].shape[-1], device=self.device)
            for i, clip in enumerate(per_clip):
                x[i, : clip[t].shape[0]] = clip[t].to(self.device, torch.float32)
            taps.append(x)
        return self._adapt(taps, lengths)

    def _adapt(self, states: list[torch.Tensor], lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        adapter_dtype = next(self.adapter.parameters()).dtype
        if self.standardizer is not None:
            states = self.standardizer([s.float() for s in states])
        embeds, out_lengths = self.adapter([s.to(adapter_dtype) for s in states], lengths)
        if self.embedding_norm is not None:
            embeds = embeds * (self.embedding_norm / embeds.norm(dim=-1, keepdim=True).clamp_min(1e-6))
        return embeds.to(self.llm.dtype), out_lengths

    @property
    def context_length(self) -> int | None:
        """Most positions the LLM takes (prompt and answer together); None when unknown."""
        return context_length(self.llm)

    def audio_positions(self, seconds: float | None = None, frames: int | None = None) -> int:
        """LLM positions the audio embeddings of a clip take: from its encoder `frames`, else its
        length in `seconds`, else (neither given) the longest clip's."""
        enc = self.encoder
        if frames is None:
            frames = enc.max_frames if seconds is None else math.ceil(seconds * enc.frames_per_second)
        return int(self._frame_positions(np.array([frames]))[0])

    def clip_positions(self, seconds: np.ndarray) -> np.ndarray:
        """`audio_positions` of many clips `seconds` long at once: (clips,) -> (clips,)."""
        return self._frame_positions(np.ceil(np.asarray(seconds, np.float64) * self.encoder.frames_per_second))

    def _frame_positions(self, frames: np.ndarray) -> np.ndarray:
        """Adapter output positions of clips of `frames` encoder frames (at least 1, at most the
        encoder's window): (clips,) -> (clips,)."""
        frames = np.clip(frames, 1, self.encoder.max_frames).astype(np.int64)
        return self.adapter.output_length(torch.from_numpy(frames)).numpy()

    def _example_audio_positions(self, ex: Example) -> int:
        """LLM positions of an example's audio embeddings (0 without audio)."""
        if not ex.has_audio:
            return 0
        if ex.states is not None:
            return self.audio_positions(frames=ex.states[0].shape[0])
        return self.audio_positions(seconds=len(ex.audio) / SAMPLE_RATE)

    def prompt_length(self, instruction: str, transcript: str | None = None, has_audio: bool = True,
                      seconds: float | None = None) -> int:
        """Positions before the answer: the template, transcript, instruction and (`has_audio`) the
        audio embeddings of a `seconds` long clip (None: the longest)."""
        pieces = self.prompt.pieces(instruction, transcript, has_audio=has_audio)
        audio = self.audio_positions(seconds) if has_audio else 0
        return len(pieces.before_audio) + audio + len(pieces.after_audio)

    def example_positions(self, ex: Example) -> int:
        """LLM positions of an example's prompt (its audio embeddings included, its target not):
        the length that batches of similar examples are sorted by (less padding)."""
        pieces = self.prompt.pieces(ex.instruction, ex.transcript, has_audio=ex.has_audio)
        return len(pieces.before_audio) + self._example_audio_positions(ex) + len(pieces.after_audio)

    def check_length(self, positions: int, reserve: int = 0, what: str = "the prompt") -> None:
        """`LengthError` when `positions` plus `reserve` answer tokens do not fit the LLM's context."""
        limit = self.context_length
        if limit is not None and positions + reserve > limit:
            room = f" + {reserve} answer tokens (generation.max_new_tokens)" if reserve else ""
            raise LengthError(f"{what}: {positions} positions{room} exceed the LLM's context of {limit} tokens; "
                              "shorten the instruction" + (" or ask for a shorter answer" if reserve else ""))

    def _audio_embeddings(self, examples: list[Example]) -> tuple[list[int], torch.Tensor | None, torch.Tensor | None]:
        """(indices of the examples with audio, their embeddings, their lengths)."""
        audio_idx = [i for i, ex in enumerate(examples) if ex.has_audio]
        if not audio_idx:
            return audio_idx, None, None
        if all(examples[i].states is not None for i in audio_idx):
            return (audio_idx, *self.adapt_states([examples[i].states for i in audio_idx]))
        if any(examples[i].audio is None for i in audio_idx):
            raise ValueError("a batch mixes precomputed states and waveforms; give one kind")
        return (audio_idx, *self.encode_audio([examples[i].audio for i in audio_idx]))

    def _target_labels(self, ex: Example, target: list[int]) -> list[int]:
        """The target's labels, tokens that token masking leaves out set to IGNORE_INDEX."""
        labels = list(target)
        if ex.target_mask is not None and target:
            n_text = len(target) - (len(self.prompt.end_of_turn_ids) if ex.target_complete else 0)
            for j, keep in enumerate(ex.target_mask[:n_text]):
                if not keep:
                    labels[j] = IGNORE_INDEX
        return labels

    def build_batch(self, examples: list[Example], for_generation: bool = False, reserve: int = 0,
                    reuse_prefix: bool = False) -> Batch:
        """Lay out each example's tokens and audio embeddings; right-pad for training, left-pad
        for generation. With `reuse_prefix` the token ids every example starts with go into
        `Batch.prefix_ids` (computed once in `forward` / `generate`) and the padding follows them.
        An example longer than the LLM's context (with `reserve` positions left for the answer)
        is a `LengthError` naming it, raised before any audio is encoded."""
        if not examples:
            raise ValueError("empty batch")
        layouts = []
        for i, ex in enumerate(examples):
            if ex.target is None and not for_generation:
                raise ValueError(f"example {ex.id or i} has no target to train on")
            pieces = self.prompt.pieces(ex.instruction, ex.transcript, has_audio=ex.has_audio)
            target = [] if for_generation else self.prompt.target(ex.target, complete=ex.target_complete)
            n_audio = self._example_audio_positions(ex)
            self.check_length(len(pieces.before_audio) + n_audio + len(pieces.after_audio) + len(target), reserve,
                              f"example {ex.id}" if ex.id else "the prompt")
            layouts.append((pieces, target))
        prefix = (self.shared_prefix(examples, [pieces for pieces, _ in layouts])
                  if reuse_prefix and not self._llm_dropout_active() else [])
        n_prefix = len(prefix)
        embed = self.llm.get_input_embeddings()
        audio_idx, audio_embeds, audio_lengths = self._audio_embeddings(examples)
        device = self.device

        def tokens(ids: list[int]) -> torch.Tensor:
            return embed(torch.tensor(ids, device=device, dtype=torch.long))

        seqs, labels = [], []
        for i, (ex, (pieces, target)) in enumerate(zip(examples, layouts)):
            n_audio = 0
            if ex.has_audio:
                j = audio_idx.index(i)
                n_audio = int(audio_lengths[j])
                parts = [tokens(pieces.before_audio[n_prefix:]), audio_embeds[j, :n_audio],
                         tokens(pieces.after_audio + target)]
            else:
                parts = [tokens((pieces.before_audio + pieces.after_audio)[n_prefix:] + target)]
            seqs.append(torch.cat(parts, dim=0))
            n_prompt = len(pieces.before_audio) + n_audio + len(pieces.after_audio)
            labels.append([IGNORE_INDEX] * (n_prompt - n_prefix) + self._target_labels(ex, target))
        return self._pad(seqs, labels, for_generation, prefix)

    def _llm_dropout_active(self) -> bool:
        """True when the LLM drops out (LoRA dropout or attention dropout while training): each
        sequence's prefix then gets its own dropout, so it is not computed once for the batch."""
        if not self.llm.training:
            return False
        return (any(isinstance(m, nn.Dropout) and m.p > 0 for m in self.llm.modules())
                or getattr(self.llm.config, "attention_dropout", 0.0) > 0)

    @staticmethod
    def shared_prefix(examples: list[Example], pieces: list[PromptPieces]) -> list[int]:
        """Leading token ids all examples share: up to the audio of an example with audio, up to
        the last prompt token of one without (the position that predicts its first answer token
        stays after the prefix)."""
        leading = [p.before_audio if ex.has_audio else p.before_audio + p.after_audio
                   for ex, p in zip(examples, pieces)]
        limit = min(len(ids) if ex.has_audio else len(ids) - 1 for ex, ids in zip(examples, leading))
        return leading[0][: shared_prefix_length(leading, limit)]

    def _pad(self, seqs: list[torch.Tensor], labels: list[list[int]], for_generation: bool,
             prefix_ids: list[int]) -> Batch:
        """One batch of the sequences (each after `prefix_ids`): right-padded for training,
        left-padded for generation."""
        device = self.device
        longest = max(s.shape[0] for s in seqs)
        width = seqs[0].shape[1]
        inputs = torch.zeros(len(seqs), longest, width, dtype=seqs[0].dtype, device=device)
        mask = torch.zeros(len(seqs), longest, dtype=torch.long, device=device)
        lab = torch.full((len(seqs), longest), IGNORE_INDEX, dtype=torch.long, device=device)
        for i, s in enumerate(seqs):
            n = s.shape[0]
            sl = slice(longest - n, longest) if for_generation else slice(0, n)
            inputs[i, sl] = s
            mask[i, sl] = 1
            lab[i, sl] = torch.tensor(labels[i], device=device)
        return Batch(inputs, mask, None if for_generation else lab, prefix_ids)

    def training_kernel(self, batch: Batch | None = None) -> str | None:
        """The attention kernel of forward passes with gradients (`model.llm.train_attn_implementation`
        on the LLM's device; `auto` weighs what the grouped kernel would keep for `batch`); None: the
        model's own."""
        setting, kept = self.config.llm.train_attn_implementation, 0
        if setting == "auto" and batch is not None:  # only auto weighs it
            c = text_config(self.llm)
            rows, q_len = batch.inputs_embeds.shape[:2]
            kept = probability_bytes(rows, c.num_attention_heads, q_len, q_len + len(batch.prefix_ids or ()),
                                     c.num_hidden_layers, self.llm.dtype.itemsize)
        weight = self.llm.get_input_embeddings().weight
        return training_kernel(setting, weight.device, weight.dtype, kept)

    def _prefix_cache(self, batch: Batch):
        """The KV cache of `batch.prefix_ids` expanded over the batch (None without a prefix); with a
        frozen LLM computed once and reused by later batches (`FrozenPrefixCache`)."""
        if not batch.prefix_ids:
            return None
        return expand_cache(self.llm, self.prefixes.get(self.llm, batch.prefix_ids), batch.inputs_embeds.shape[0])

    # ------------------------------------------------------------------ forward / generate

    def forward(self, batch: "Batch | list[Example]", per_example: bool = False, reuse_prefix: bool = False,
                reduction: Literal["mean", "sum"] = "mean"
                ) -> "torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]":
        """Cross-entropy over target tokens only, their mean (or with `reduction="sum"` their
        sum). The LM head runs only on the positions that predict a target token. Takes a built
        batch or the examples themselves (then the audio path runs inside forward, as distributed
        wrappers expect, and `reuse_prefix` says whether their shared first tokens are run once,
        see `build_batch`). `per_example`: also each example's summed token loss and its number of
        target tokens, both (batch,) and detached (for logging parts of a batch, e.g. its replay
        examples, apart)."""
        if isinstance(batch, list):
            batch = self.build_batch(batch, reuse_prefix=reuse_prefix)
        if batch.labels is None:
            raise ValueError("forward needs a training batch (with labels)")
        cache = self._prefix_cache(batch)  # with the model's own kernel: generation reuses it
        with kernel(self.llm, self.training_kernel(batch) if torch.is_grad_enabled() else None):
            hidden = states_after_prefix(self.llm, batch.attention_mask if cache is None else batch.full_attention_mask,
                                         len(batch.prefix_ids or ()), cache, inputs_embeds=batch.inputs_embeds)
        shifted = batch.labels[:, 1:]
        predict = shifted != IGNORE_INDEX
        if not predict.any():
            raise ValueError("batch has no target tokens")
        logits = self.llm.get_output_embeddings()(hidden[:, :-1][predict]).float()
        if not per_example:
            return nn.functional.cross_entropy(logits, shifted[predict], reduction=reduction)
        tokens = nn.functional.cross_entropy(logits, shifted[predict], reduction="none")
        rows = predict.nonzero()[:, 0]
        sums = torch.zeros(len(predict), device=tokens.device).index_add_(0, rows, tokens.detach())
        return (tokens.sum() if reduction == "sum" else tokens.mean()), sums, predict.sum(dim=1)

    def text_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of the speech model's text path (no audio): (batch, seq, vocab)."""
        embeds = self.llm.get_input_embeddings()(input_ids)
        return self.llm(inputs_embeds=embeds, attention_mask=attention_mask).logits

    @torch.no_grad()
    def generate(self, examples: list[Example], gen: GenerationConfig | None = None,
                 batch_size: int | None = None) -> list[str]:
        """Answers to examples (clips of different lengths welcome), in their order, at most
        `batch_size` (default: all) decoded at once, taken in the order given; with
        `gen.reuse_prefix` a batch's shared first tokens are run once (see `build_batch`); greedy
        decoding drops each answer from the batch once it stops and fills the freed rows with the
        next examples (`gen.drop_finished`, `decode.py`)."""
        gen = gen or GenerationConfig()
        rows = len(examples) if batch_size is None else batch_size
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if not examples:
            return []
        if not gen.drops_finished:
            return [a for start in range(0, len(examples), rows)
                    for a in self._transformers_generate(examples[start: start + rows], gen)]

        def prompts_of(idx: list[int]) -> Prompts:
            batch = self.build_batch([examples[i] for i in idx], for_generation=True, reserve=gen.max_new_tokens,
                                     reuse_prefix=gen.reuse_prefix)
            return Prompts(batch.inputs_embeds, batch.full_attention_mask, self._prefix_cache(batch))

        decoded = greedy_decode_in_order(self.llm, len(examples), prompts_of, rows, gen.max_new_tokens,
                                         self.prompt.stop_ids, gen.kv_in_place, gen.packed_weights)
        return [self.tokenizer.decode(d.tokens, skip_special_tokens=True).strip() for d in decoded]

    def _transformers_generate(self, examples: list[Example], gen: GenerationConfig) -> list[str]:
        """Answers to one batch of examples by transformers' `generate` (sampling, repetition penalty)."""
        batch = self.build_batch(examples, for_generation=True, reserve=gen.max_new_tokens,
                                 reuse_prefix=gen.reuse_prefix)
        kwargs = dict(max_new_tokens=gen.max_new_tokens, do_sample=gen.do_sample,
                      repetition_penalty=gen.repetition_penalty, eos_token_id=self.prompt.stop_ids,
                      pad_token_id=self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None
                      else self.prompt.stop_ids[0])
        if gen.do_sample:
            kwargs.update(temperature=gen.temperature, top_p=gen.top_p)
            torch.manual_seed(gen.seed)
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        inputs = batch.inputs_embeds
        if batch.prefix_ids:  # generate takes the whole sequence and runs the positions after the cache
            kwargs[cache_kwarg(self.llm)] = self._prefix_cache(batch)
            head = self.llm.get_input_embeddings()(torch.tensor(batch.prefix_ids, device=self.device))
            inputs = torch.cat([head.expand(inputs.shape[0], -1, -1), inputs], dim=1)
        with packed_linears(self.llm, gen.packed_weights):
            out = self.llm.generate(inputs_embeds=inputs, attention_mask=batch.full_attention_mask, **kwargs)
        return [t.strip() for t in self.tokenizer.batch_decode(out, skip_special_tokens=True)]

    def merge_lora(self) -> "SpeechLLM":
        """For inference: fold the LoRA weights into the LLM's (W + BA scaled, peft's
        `merge_and_unload`), so generation runs the plain LLM at the frozen model's speed; the
        answers are the LoRA model's up to float rounding (tested). `lora` stays set (the LLM is
        not the base LLM); the model can then no longer be trained or saved. No-op without LoRA."""
        if self.lora is not None and not self.lora_merged:
            self.llm = self.llm.merge_and_unload()
            self.llm.requires_grad_(False)
            # peft adds BA through `.data`, which moves neither storage nor version counter: bump the
            # counters so what is kept per weight state (the frozen prefix's KV, packed weights) is remade
            for p in self.llm.parameters():
                increment_version(p)
            self.lora_merged = True
        return self

    # ------------------------------------------------------------------ checkpoints

    def save_pretrained(self, folder: str | Path, extra: dict | None = None) -> Path:
        """Write only the trainable weights and the adapter's input statistics
        (adapter.safetensors) and config.json naming the base
        models and their fingerprints into `folder` (other files there are left alone). Each file
        is written to a temporary name and renamed, config.json last."""
        from safetensors.torch import save_file

        if self.lora_merged:
            raise ValueError("this model's LoRA weights were merged into the LLM for inference (merge_lora): "
                             "there are no LoRA weights left to save")
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.contiguous().cpu() for k, v in self.trainable_state_dict().items()}
        meta = {
            "format": CHECKPOINT_FORMAT,
            "model": to_dict(self.config),
            "lora": to_dict(self.lora) if self.lora is not None else None,
            "base": {
                "encoder": {"name": self.config.encoder.name, "fingerprint": weights.fingerprint(self.config.encoder.name)},
                "llm": {"name": self.config.llm.name, "fingerprint": weights.fingerprint(self.config.llm.name)},
            },
            "trainable_parameters": sum(p.numel() for p in self.parameters() if p.requires_grad),
            **(extra or {}),
        }
        tmp = folder / f".{ADAPTER_WEIGHTS}.{os.getpid()}.tmp"
        save_file(state, str(tmp), metadata={"format": CHECKPOINT_FORMAT})
        os.replace(tmp, folder / ADAPTER_WEIGHTS)
        tmp = folder / f".{CHECKPOINT_CONFIG}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(meta, indent=2) + "\n")
        os.replace(tmp, folder / CHECKPOINT_CONFIG)
        return folder

    @classmethod
    def from_pretrained(cls, folder: str | Path, device: str | torch.device = "cpu", check_base: bool = True,
                        trust_remote_code: bool = False) -> "SpeechLLM":
        """Rebuild from a checkpoint folder: base models from their names, trainable weights from
        the safetensors file.

        A checkpoint is data someone may hand you, so it never runs code: custom modelling code
        is allowed only by the caller's `trust_remote_code` (the checkpoint's own setting is
        ignored), the base models its config names must be the ones it records, and (with
        `check_base`) their fingerprints must match the recorded ones; all of this, and the
        weights file, is checked before any base model is loaded."""
        folder = Path(folder)
        meta = read_checkpoint(folder)
        config = _checkpoint_config(folder, meta, trust_remote_code)
        _check_base_models(folder, meta, config, check_base)
        state = read_weights(folder)
        try:
            model = cls.from_config(config, device=device)
            if meta.get("lora"):
                from .lora import apply_lora

                apply_lora(model, config_from_dict(meta["lora"], LoRAConfig))
        except SpeechLLMError as err:
            raise CheckpointError(f"{folder}: {err}{_custom_code_hint(config)}") from None
        _load_trainable(folder, model, state)
        return model


def _load_error(key: str, name: str, err: Exception) -> SpeechLLMError:
    """The error for the model `name` (set by `key`) that failed to load with `err` (kept as it
    is when it already is a clear one)."""
    if isinstance(err, SpeechLLMError):
        return err
    reason = (str(err).strip().splitlines() or [""])[0]
    return weights.WeightsError(f"{key} '{name}': cannot be loaded ({type(err).__name__}: {reason})")


def read_checkpoint(folder: Path) -> dict:
    """The checkpoint's config.json, checked for the fields loading needs."""
    path = folder / CHECKPOINT_CONFIG
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as err:
        raise CheckpointError(f"{folder}: not a speechllm checkpoint ({CHECKPOINT_CONFIG}: {err})") from None
    if not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise CheckpointError(f"{path}: format {found!r}, expected {CHECKPOINT_FORMAT!r}")
    base = meta.get("base")
    for part in BASE_PARTS:
        rec = base.get(part) if isinstance(base, dict) else None
        if not (isinstance(rec, dict) and isinstance(rec.get("name"), str) and isinstance(rec.get("fingerprint"), str)):
            raise CheckpointError(f"{path}: 'base.{part}' must record the {part}'s name and fingerprint")
    if not isinstance(meta.get("model"), dict) or not isinstance(meta.get("lora") or {}, dict):
        raise CheckpointError(f"{path}: 'model' (and 'lora', when present) must be JSON objects")
    return meta


def _checkpoint_config(folder: Path, meta: dict, trust_remote_code: bool) -> ModelConfig:
    """The model config a checkpoint records, with custom code allowed only as the caller says."""
    try:
        config = config_from_dict(meta["model"], ModelConfig)
        if meta.get("lora"):
            config_from_dict(meta["lora"], LoRAConfig)
    except ConfigError as err:
        raise CheckpointError(f"{folder / CHECKPOINT_CONFIG}: {err}") from None
    config.llm.trust_remote_code = trust_remote_code
    if "standardize" not in (meta["model"].get("adapter") or {}):
        config.adapter.standardize = False  # saved before the setting existed: trained without it
    return config


def _check_base_models(folder: Path, meta: dict, config: ModelConfig, check_fingerprints: bool) -> None:
    """The base models the config names are those the checkpoint records, with (when
    `check_fingerprints`) the recorded fingerprints; nothing is loaded."""
    for part, name in zip(BASE_PARTS, (config.encoder.name, config.llm.name)):
        rec = meta["base"][part]
        if rec["name"] != name:
            raise CheckpointError(f"{folder / CHECKPOINT_CONFIG}: model.{part}.name is '{name}', but the adapter was "
                                  f"trained on '{rec['name']}' (base.{part}); a checkpoint loads only its own base "
                                  "models")
        if not check_fingerprints:
            continue
        try:
            weights.check_available(name)
            weights.resolve(name)
            now = weights.fingerprint(name)
        except SpeechLLMError as err:
            raise CheckpointError(f"{folder}: base {part}: {err}") from None
        if now != rec["fingerprint"]:
            raise CheckpointError(f"{folder}: base {part} '{name}' has fingerprint {now}, but the adapter was "
                                  f"trained on {rec['fingerprint']}")


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The trainable weights of a checkpoint (on the CPU); a missing or damaged file is a `CheckpointError`."""
    from safetensors.torch import load_file

    path = folder / ADAPTER_WEIGHTS
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (the checkpoint has no weights)")
    try:
        return load_file(str(path))
    except Exception as err:  # safetensors raises its own error type, and OSError, for a damaged file
        raise CheckpointError(f"{path}: cannot be read ({type(err).__name__}: {err}); the file is damaged or "
                              "truncated, copy it again") from None


def _load_trainable(folder: Path, model: SpeechLLM, state: dict[str, torch.Tensor]) -> None:
    """Put the checkpoint's weights into `model`; names and shapes must match exactly."""
    expected = model.trainable_state_dict()
    if set(state) != set(expected):
        missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        raise CheckpointError(f"{folder}: weights do not match the model: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
             if state[k].shape != v.shape]
    if wrong:
        raise CheckpointError(f"{folder}: weights do not fit the model's shapes ({'; '.join(wrong[:3])}): the "
                              "checkpoint was trained with other base models or adapter settings")
    model.load_state_dict({k: v.to(expected[k].device) for k, v in state.items()}, strict=False)


def _custom_code_hint(config: ModelConfig) -> str:
    """A note for a base model folder that names custom code, which a checkpoint never enables."""
    if config.llm.trust_remote_code:
        return ""
    folder = Path(config.llm.name).expanduser()
    for name in ("config.json", "tokenizer_config.json"):
        try:
            if "auto_map" in json.loads((folder / name).read_text(encoding="utf-8")):
                return (f" ({folder / name} names custom code (auto_map), which a checkpoint never enables; "
                        "only your own model.llm.trust_remote_code=true does)")
        except (OSError, UnicodeDecodeError, ValueError):
            continue
    return ""


def build_model(cfg: Config | ModelConfig, device: str | torch.device = "cpu") -> SpeechLLM:
    """A fresh (untrained adapter) model from a full or model-only config."""
    return SpeechLLM.from_config(cfg.model if isinstance(cfg, Config) else cfg, device=device)
