"""Measure how much trimming Whisper's input (no 30 s padding) changes the tapped encoder states.

In the padded run every real frame also attends to ~25 s of padding frames, so the states differ;
this prints, per hidden state, the relative L2 difference and the mean cosine similarity over the
real frames, on real speech.

    python scripts/measure_trim.py [--model whisper-tiny.en] [AUDIO ...]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from speechllm.hub import weights
from speechllm.io.audio import load_audio
from speechllm.model.encoder import load_whisper_encoder

SAMPLES = sorted((Path(__file__).resolve().parent.parent / "samples").glob("*.wav"))


def measure(model: str, files: list[Path]) -> list[dict]:
    probe = load_whisper_encoder(weights.resolve(model), layers=[0])
    n_blocks = len(probe.encoder.layers)
    enc = load_whisper_encoder(weights.resolve(model), layers=list(range(n_blocks + 1)))
    rows = []
    for f in files:
        wav = load_audio(f)
        trimmed = enc.encode([wav])
        padded = enc.feature_extractor(wav, sampling_rate=16000, return_tensors="pt")["input_features"]
        with torch.no_grad():
            full = enc(padded, torch.tensor([padded.shape[-1]]))
        n = int(trimmed.lengths[0])
        for layer, (a, b) in enumerate(zip(trimmed.states, full.states)):
            a, b = a[0, :n], b[0, :n]
            rows.append({"file": f.name, "layer": layer,
                         "rel_l2": float((a - b).norm() / b.norm()),
                         "cosine": float(torch.nn.functional.cosine_similarity(a, b, dim=-1).mean())})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="whisper-tiny.en", help="Whisper model name, folder or hub id")
    p.add_argument("audio", nargs="*", type=Path, help="clips (default: samples/*.wav)")
    args = p.parse_args()
    rows = measure(args.model, args.audio or SAMPLES)
    print(f"{'file':32} {'hidden state':>12} {'rel L2 diff':>12} {'mean cosine':>12}")
    for r in rows:
        print(f"{r['file']:32} {r['layer']:>12} {r['rel_l2']:>12.4f} {r['cosine']:>12.4f}")


if __name__ == "__main__":
    main()
