"""Measure what `speechllm plan` estimates: peak memory (and step time) of real training steps at
known lengths, beside the plan's figures for exactly those lengths.

The examples carry precomputed tapped states when `train.feature_cache` is on (as training does),
else audio that the encoder reads inside each step.
CPU: peak RSS over the steps (the kernel's high-water mark, reset after the model is loaded)
minus the RSS before the model was built; CUDA: `torch.cuda.max_memory_allocated`. Prints one JSON
line: measured bytes, the plan's peak bytes, their ratio, the lengths, and the mean step seconds.

    python scripts/measure_plan.py [--config configs/default.yaml] [--device cpu|cuda] [--batch-size 8]
                                   [--steps 2] [--target-tokens 256] [--seconds 30] [KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from speechllm.config import load_config
from speechllm.io.audio import SAMPLE_RATE, load_audio
from speechllm.model import Example, build_model
from speechllm.training.plan import Lengths, make_plan
from speechllm.training.trainer import param_groups

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "samples" / "librivox_austen_0890.wav"
FILLER = ("the speaker reads a passage from a novel in a calm and even voice while the room stays quiet and "
          "nothing else can be heard in the recording ")
INSTRUCTION = "What can you hear in the audio? Describe the speaker and the recording."


def rss_bytes(field: str = "VmRSS") -> int:
    """This process's resident set (VmRSS) or its high-water mark (VmHWM), in bytes (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def text_of_tokens(model, n: int) -> str:
    """Filler text that is `n` tokens long (or a few less) for the model's tokenizer."""
    ids = model.prompt.text(FILLER * (n // 10 + 2))[:n]
    return model.tokenizer.decode(ids)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "default.yaml"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--target-tokens", type=int, default=None, help="default: train.max_target_tokens")
    p.add_argument("--seconds", type=float, default=None, help="clip length (default: model.encoder.max_seconds)")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    cfg = load_config(args.config, args.overrides)
    batch_size = args.batch_size or cfg.train.batch_size
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise SystemExit("measure_plan: --device cuda but torch sees no CUDA device")
    before = torch.cuda.memory_allocated() if cuda else rss_bytes()
    torch.manual_seed(0)
    model = build_model(cfg, device=args.device)
    model.train()
    seconds = min(args.seconds or cfg.model.encoder.max_seconds, model.encoder.max_seconds)
    wav = load_audio(SAMPLE)
    wav = np.resize(wav, int(seconds * SAMPLE_RATE)).astype(np.float32)
    transcript = text_of_tokens(model, cfg.model.prompt.max_transcript_tokens)
    n_eot = len(model.prompt.end_of_turn_ids)
    target = text_of_tokens(model, (args.target_tokens or cfg.train.max_target_tokens) - n_eot)
    if cfg.train.feature_cache:  # as training with the feature cache: tapped states computed before the step
        with torch.no_grad():
            enc = model.encoder.encode([wav])
        states = [s[0, : int(enc.lengths[0])].cpu() for s in enc.states]
        examples = [Example(INSTRUCTION, states=states, transcript=transcript, target=target)
                    for _ in range(batch_size)]
    else:  # the encoder runs inside every step
        examples = [Example(INSTRUCTION, audio=wav, transcript=transcript, target=target) for _ in range(batch_size)]
    pieces = model.prompt.pieces(INSTRUCTION, transcript, has_audio=True)
    n_transcript = min(len(model.prompt.text(transcript.strip())), cfg.model.prompt.max_transcript_tokens)
    n_instruction = len(model.prompt.text(INSTRUCTION))
    frames = int(model.encoder.output_frames(int(seconds * model.encoder.mel_frames_per_second)))
    lengths = Lengths(template=len(pieces.before_audio) + len(pieces.after_audio) - n_transcript - n_instruction,
                      instruction=n_instruction, transcript=n_transcript, audio=model.audio_positions(frames=frames),
                      target=len(model.prompt.target(target)), audio_frames=frames)
    opt = torch.optim.AdamW(param_groups(model, cfg.train.weight_decay), lr=cfg.train.lr)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.mixed_precision)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        reset_peak_rss()
    times, losses = [], []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        with torch.autocast(device_type="cuda" if cuda else "cpu", dtype=dtype, enabled=dtype is not None):
            loss = model(examples)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=False)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        losses.append(float(loss.detach()))
    peak = (torch.cuda.max_memory_allocated() if cuda else rss_bytes("VmHWM")) - before
    plan = make_plan(cfg, batch_size=batch_size, lengths=lengths, device="cuda" if cuda else "cpu")
    print(json.dumps({
        "device": args.device, "config": args.config, "batch_size": batch_size, "lengths": vars(lengths),
        "sequence_tokens": lengths.sequence, "measured_peak_bytes": peak, "plan_peak_bytes": plan.peak_bytes,
        "ratio": peak / plan.peak_bytes, "plan_activation_bytes": plan.activation_bytes,
        "plan_weights_bytes": plan.weights_bytes, "trainable_params": plan.trainable_params,
        "step_seconds": times, "losses": losses, "plan_flops_per_step": plan.flops_per_step,
    }))


if __name__ == "__main__":
    main()
