"""Frozen Whisper encoder run on input trimmed to each clip's real length, tapping several layers.

transformers' `WhisperEncoder.forward` insists on 30 s (3000 mel frames). Here the same modules
run on the real frames only: positional embeddings are sliced to the sequence length, clips of
different lengths share a batch through a key-padding mask, and the first convolution's output is
zeroed past each clip's end so that a padded clip sees exactly what it would see alone.

Trimmed and 30 s-padded inputs do not give identical states over the real frames: in the padded
run every real frame also attends to the padding frames. `scripts/measure_trim.py` measures the
difference on real speech (the README quotes it).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..io.audio import SAMPLE_RATE


def conv_output_length(length: torch.Tensor | int, conv: nn.Conv1d) -> torch.Tensor | int:
    """Frames out of `conv` for `length` frames in (PyTorch's Conv1d arithmetic)."""
    k, s, p, d = conv.kernel_size[0], conv.stride[0], conv.padding[0], conv.dilation[0]
    if isinstance(length, torch.Tensor):
        return torch.div(length + 2 * p - d * (k - 1) - 1, s, rounding_mode="floor") + 1
    return (length + 2 * p - d * (k - 1) - 1) // s + 1


@dataclass
class EncoderOutput:
    states: list[torch.Tensor]
    """One tensor per tapped layer, each (batch, frames, width); frames past `lengths` are padding."""
    lengths: torch.Tensor
    """(batch,) number of real encoder frames per clip."""


class WhisperTappedEncoder(nn.Module):
    """Wraps a transformers `WhisperEncoder` (frozen) and its feature extractor.

    Args:
        encoder: a `transformers.WhisperEncoder` with loaded weights.
        feature_extractor: the matching `WhisperFeatureExtractor` (log-mel settings).
        layers: tapped hidden states, transformers' `output_hidden_states` indexing (0 = input
            embeddings, i = output of block i; the last block's output gets the final LayerNorm).
    """

    def __init__(self, encoder: nn.Module, feature_extractor, layers: list[int]):
        super().__init__()
        n_blocks = len(encoder.layers)
        if not layers:
            raise ValueError("encoder.layers: tap at least one layer")
        bad = [i for i in layers if not 0 <= i <= n_blocks]
        if bad:
            raise ValueError(f"encoder.layers: {bad} out of range; this encoder has hidden states 0..{n_blocks}")
        if feature_extractor.sampling_rate != SAMPLE_RATE:
            raise ValueError(f"feature extractor expects {feature_extractor.sampling_rate} Hz, speechllm uses {SAMPLE_RATE}")
        self.encoder = encoder
        self.feature_extractor = feature_extractor
        self.layers = list(layers)
        self.max_frames = encoder.embed_positions.num_embeddings
        """Longest encoder sequence (Whisper: 1500 frames = 30 s)."""
        self.hop_length = feature_extractor.hop_length
        self.mel_frames_per_second = SAMPLE_RATE / self.hop_length
        self.frames_per_second = self.mel_frames_per_second * self.max_frames / feature_extractor.nb_max_frames
        """Encoder frames per second (Whisper: 100 mel frames/s halved by conv2 = 50)."""
        self.requires_grad_(False)
        self.eval()

    @property
    def width(self) -> int:
        return self.encoder.config.d_model

    @property
    def max_seconds(self) -> float:
        return self.max_frames / self.frames_per_second

    def output_frames(self, mel_frames: torch.Tensor | int) -> torch.Tensor | int:
        """Encoder frames produced from `mel_frames` log-mel frames."""
        return conv_output_length(conv_output_length(mel_frames, self.encoder.conv1), self.encoder.conv2)

    def features(self, waveforms: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        """16 kHz waveforms -> log-mel (batch, n_mels, max_mel_frames) zero-padded, and (batch,) lengths.

        Each clip is featurised alone (Whisper's normalisation depends on the clip's own maximum),
        without Whisper's 30 s padding."""
        feats = []
        for i, wav in enumerate(waveforms):
            seconds = len(wav) / SAMPLE_RATE
            if seconds > self.max_seconds + 1e-6:
                raise ValueError(f"clip {i}: {seconds:.1f} s is longer than the encoder's {self.max_seconds:.0f} s")
            f = self.feature_extractor(wav, sampling_rate=SAMPLE_RATE, padding="longest", return_tensors="np",
                                       return_attention_mask=False)["input_features"][0]
            feats.append(torch.from_numpy(f))
        lengths = torch.tensor([f.shape[-1] for f in feats])
        out = torch.zeros(len(feats), feats[0].shape[0], int(lengths.max()))
        for i, f in enumerate(feats):
            out[i, :, : f.shape[-1]] = f
        return out, lengths

    def forward(self, features: torch.Tensor, mel_lengths: torch.Tensor) -> EncoderOutput:
        """features: (batch, n_mels, mel_frames) zero-padded log-mel; mel_lengths: (batch,)."""
        enc = self.encoder
        dtype = enc.conv1.weight.dtype
        x = features.to(dtype)
        mel_mask = torch.arange(x.shape[-1], device=x.device)[None, :] < mel_lengths.to(x.device)[:, None]
        x = F.gelu(enc.conv1(x)) * mel_mask[:, None, :].to(dtype)
        x = F.gelu(enc.conv2(x))
        x = x.permute(0, 2, 1)  # (batch, frames, width)
        frames = x.shape[1]
        if frames > self.max_frames:
            raise ValueError(f"{frames} encoder frames exceed Whisper's {self.max_frames}")
        lengths = self.output_frames(mel_lengths.to(x.device))
        x = x + enc.embed_positions.weight[:frames].to(dtype)
        keep = torch.arange(frames, device=x.device)[None, :] < lengths[:, None]  # (batch, frames)
        attn_mask = torch.zeros(keep.shape, dtype=dtype, device=x.device)
        attn_mask = attn_mask.masked_fill(~keep, torch.finfo(dtype).min)[:, None, None, :]
        hidden = [x]
        last_block = max(self.layers)
        for i, block in enumerate(enc.layers[:last_block]):
            x = block(x, attn_mask)
            if i + 1 == len(enc.layers):
                x = enc.layer_norm(x)
            hidden.append(x)
        return EncoderOutput(states=[hidden[i] for i in self.layers], lengths=lengths)

    def encode(self, waveforms: list[np.ndarray]) -> EncoderOutput:
        """Convenience: waveforms -> tapped states on this module's device."""
        device = self.encoder.conv1.weight.device
        feats, lengths = self.features(waveforms)
        return self(feats.to(device), lengths.to(device))


_ENCODER_PREFIXES = ("model.encoder.", "encoder.")


def _local_folder(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(name_or_path, allow_patterns=["*.json", "*.safetensors", "*.txt"]))


def load_whisper_encoder(name_or_path: str, layers: list[int], dtype: torch.dtype = torch.float32) -> WhisperTappedEncoder:
    """Build the tapped encoder from a Whisper folder (or hub id) holding a full Whisper model
    (`WhisperForConditionalGeneration` / `WhisperModel`) or an encoder alone; only encoder weights
    are read."""
    from safetensors import safe_open
    from transformers import WhisperConfig, WhisperFeatureExtractor
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    folder = _local_folder(name_or_path)
    config = WhisperConfig.from_pretrained(folder)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder}: no *.safetensors weights (pytorch .bin is not read: no pickle)")
    with torch.device("meta"):
        encoder = WhisperEncoder(config)
    state = {}
    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            for key in sf.keys():
                for prefix in _ENCODER_PREFIXES:
                    if key.startswith(prefix):
                        state[key[len(prefix):]] = sf.get_tensor(key).to(dtype)
                        break
    if not state:  # an encoder saved alone has no prefix
        for f in files:
            with safe_open(str(f), framework="pt") as sf:
                state.update({k: sf.get_tensor(k).to(dtype) for k in sf.keys()})
    encoder.load_state_dict(state, strict=True, assign=True)
    feature_extractor = WhisperFeatureExtractor.from_pretrained(folder)
    return WhisperTappedEncoder(encoder, feature_extractor, layers)

