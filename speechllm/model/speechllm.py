"""SpeechLLM(encoder, adapter, llm): a frozen Whisper encoder feeds a trainable adapter whose
embeddings sit inside the user turn of a frozen chat LLM.

Invariant (tested): with no audio and no LoRA, the text path gives exactly the base LLM's logits.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import SpeechLLMError
from ..hub import weights
from ..config import Config, GenerationConfig, ModelConfig, config_from_dict, to_dict
from .adapters import build_adapter
from .encoder import WhisperTappedEncoder, load_whisper_encoder
from .llm import DTYPES, load_llm
from .prompt import PromptBuilder

ADAPTER_WEIGHTS = "adapter.safetensors"
CHECKPOINT_CONFIG = "config.json"
CHECKPOINT_FORMAT = "speechllm-adapter/1"
IGNORE_INDEX = -100


class CheckpointError(SpeechLLMError, ValueError):
    """A checkpoint folder that cannot be loaded, or that does not match the base models."""


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
    """(batch, seq, llm_width)."""
    attention_mask: torch.Tensor
    """(batch, seq), 1 for real positions."""
    labels: torch.Tensor | None
    """(batch, seq), target token ids, IGNORE_INDEX elsewhere; None for generation batches."""


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

    # ------------------------------------------------------------------ building

    @classmethod
    def from_config(cls, config: ModelConfig, device: str | torch.device = "cpu") -> "SpeechLLM":
        """Resolve and load the base models named in `config` and build a fresh adapter."""
        dtype = DTYPES[config.llm.dtype]
        encoder = load_whisper_encoder(weights.resolve(config.encoder.name), config.encoder.layers, dtype=dtype)
        llm, tokenizer = load_llm(config.llm)
        adapter = build_adapter(config.adapter, encoder_width=encoder.width, num_taps=len(config.encoder.layers),
                                llm_width=llm.get_input_embeddings().embedding_dim)
        return cls(encoder, adapter, llm, tokenizer, config).to(device)

    @property
    def device(self) -> torch.device:
        return self.llm.get_input_embeddings().weight.device

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Every parameter that requires grad, by qualified name (adapter; LoRA when enabled)."""
        return {n: p.detach() for n, p in self.named_parameters() if p.requires_grad}

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
        embeds, out_lengths = self.adapter([s.to(adapter_dtype) for s in states], lengths)
        if self.embedding_norm is not None:
            embeds = embeds * (self.embedding_norm / embeds.norm(dim=-1, keepdim=True).clamp_min(1e-6))
        return embeds.to(self.llm.dtype), out_lengths

    def build_batch(self, examples: list[Example], for_generation: bool = False) -> Batch:
        """Lay out each example's tokens and audio embeddings; right-pad for training, left-pad
        for generation."""
        if not examples:
            raise ValueError("empty batch")
        embed = self.llm.get_input_embeddings()
        audio_idx = [i for i, ex in enumerate(examples) if ex.has_audio]
        audio_embeds = audio_lengths = None
        if audio_idx and all(examples[i].states is not None for i in audio_idx):
            audio_embeds, audio_lengths = self.adapt_states([examples[i].states for i in audio_idx])
        elif audio_idx:
            if any(examples[i].audio is None for i in audio_idx):
                raise ValueError("a batch mixes precomputed states and waveforms; give one kind")
            audio_embeds, audio_lengths = self.encode_audio([examples[i].audio for i in audio_idx])
        device = self.device
        seqs, labels = [], []
        for i, ex in enumerate(examples):
            pieces = self.prompt.pieces(ex.instruction, ex.transcript, has_audio=ex.has_audio)
            target = ([] if for_generation or ex.target is None
                      else self.prompt.target(ex.target, complete=ex.target_complete))
            if ex.target is None and not for_generation:
                raise ValueError(f"example {ex.id or i} has no target to train on")
            parts = [embed(torch.tensor(pieces.before_audio, device=device))]
            n_audio = 0
            if ex.has_audio:
                j = audio_idx.index(i)
                n_audio = int(audio_lengths[j])
                parts.append(audio_embeds[j, :n_audio])
            parts.append(embed(torch.tensor(pieces.after_audio + target, device=device, dtype=torch.long)))
            seqs.append(torch.cat(parts, dim=0))
            n_prompt = len(pieces.before_audio) + n_audio + len(pieces.after_audio)
            target_labels = list(target)
            if ex.target_mask is not None and target:
                n_text = len(target) - (len(self.prompt.end_of_turn_ids) if ex.target_complete else 0)
                for j, keep in enumerate(ex.target_mask[:n_text]):
                    if not keep:
                        target_labels[j] = IGNORE_INDEX
            labels.append([IGNORE_INDEX] * n_prompt + target_labels)
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
        return Batch(inputs, mask, None if for_generation else lab)

    # ------------------------------------------------------------------ forward / generate

    def forward(self, batch: "Batch | list[Example]") -> torch.Tensor:
        """Mean cross-entropy over target tokens only. The LM head runs only on the positions
        that predict a target token. Takes a built batch or the examples themselves (then the
        audio path runs inside forward, as distributed wrappers expect)."""
        if isinstance(batch, list):
            batch = self.build_batch(batch)
        if batch.labels is None:
            raise ValueError("forward needs a training batch (with labels)")
        backbone = self.llm.get_decoder()
        hidden = backbone(inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask).last_hidden_state
        shifted = batch.labels[:, 1:]
        predict = shifted != IGNORE_INDEX
        if not predict.any():
            raise ValueError("batch has no target tokens")
        logits = self.llm.get_output_embeddings()(hidden[:, :-1][predict]).float()
        return nn.functional.cross_entropy(logits, shifted[predict])

    def text_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of the speech model's text path (no audio): (batch, seq, vocab)."""
        embeds = self.llm.get_input_embeddings()(input_ids)
        return self.llm(inputs_embeds=embeds, attention_mask=attention_mask).logits

    @torch.no_grad()
    def generate(self, examples: list[Example], gen: GenerationConfig | None = None) -> list[str]:
        """Answers for a batch of examples (clips of different lengths welcome)."""
        gen = gen or GenerationConfig()
        batch = self.build_batch(examples, for_generation=True)
        kwargs = dict(max_new_tokens=gen.max_new_tokens, do_sample=gen.do_sample,
                      repetition_penalty=gen.repetition_penalty, eos_token_id=self.prompt.stop_ids,
                      pad_token_id=self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None
                      else self.prompt.stop_ids[0])
        if gen.do_sample:
            kwargs.update(temperature=gen.temperature, top_p=gen.top_p)
            torch.manual_seed(gen.seed)
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        out = self.llm.generate(inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask, **kwargs)
        return [t.strip() for t in self.tokenizer.batch_decode(out, skip_special_tokens=True)]

    # ------------------------------------------------------------------ checkpoints

    def save_pretrained(self, folder: str | Path, extra: dict | None = None) -> Path:
        """Write only the trainable weights (adapter.safetensors) and config.json naming the base
        models and their fingerprints into `folder` (other files there are left alone). Each file
        is written to a temporary name and renamed, config.json last."""
        from safetensors.torch import save_file

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
            "trainable_parameters": sum(v.numel() for v in state.values()),
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
    def from_pretrained(cls, folder: str | Path, device: str | torch.device = "cpu",
                        check_base: bool = True) -> "SpeechLLM":
        """Rebuild from a checkpoint folder: base models from their names, trainable weights from
        the safetensors file. The base models' fingerprints must match the recorded ones."""
        from safetensors.torch import load_file

        folder = Path(folder)
        try:
            meta = json.loads((folder / CHECKPOINT_CONFIG).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise CheckpointError(f"{folder}: not a speechllm checkpoint ({CHECKPOINT_CONFIG}: {err})") from None
        if meta.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointError(f"{folder}: format {meta.get('format')!r}, expected {CHECKPOINT_FORMAT!r}")
        config = config_from_dict(meta["model"], ModelConfig)
        model = cls.from_config(config, device=device)
        if meta.get("lora"):
            from ..config import LoRAConfig
            from .lora import apply_lora

            apply_lora(model, config_from_dict(meta["lora"], LoRAConfig))
        if check_base:
            for part in ("encoder", "llm"):
                rec = meta["base"][part]
                now = weights.fingerprint(rec["name"])
                if now != rec["fingerprint"]:
                    raise CheckpointError(f"{folder}: base {part} '{rec['name']}' has fingerprint {now}, but the "
                                          f"adapter was trained on {rec['fingerprint']}")
        state = load_file(str(folder / ADAPTER_WEIGHTS), device=str(device))
        expected = set(model.trainable_state_dict())
        if set(state) != expected:
            missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
            raise CheckpointError(f"{folder}: weights do not match the model: missing {missing[:5]}, "
                                  f"unexpected {unexpected[:5]}")
        model.load_state_dict(state, strict=False)
        return model


def build_model(cfg: Config | ModelConfig, device: str | torch.device = "cpu") -> SpeechLLM:
    """A fresh (untrained adapter) model from a full or model-only config."""
    return SpeechLLM.from_config(cfg.model if isinstance(cfg, Config) else cfg, device=device)
