"""Throughput of target generation: batched (speechllm's engine) vs per-sample `generate`, side by
side on the same prompts, and the decoding bound of this machine.

The bound: a decoding step must read every weight once, so one sequence cannot decode faster than
  memory-copy bandwidth / weight bytes   tokens per second,
with the bandwidth measured here by copying a large tensor (bytes read + written per second, the
STREAM "copy" convention). Batching shares each weight read among the batch.

    python scripts/bench_targets.py [--n 32] [--batch-size 32] [--max-new-tokens 48]
"""

from __future__ import annotations

import argparse
import time

import torch

from speechllm.config import load_config
from speechllm.config import GenerationConfig
from speechllm.model.generate import TextGenerator

PITCHES, SPEEDS, GENDERS = ("Low", "Normal", "High"), ("Slow", "Normal", "Fast"), ("Male", "Female")
SENTENCES = [
    "The small boat drifted slowly toward the rocky shore at dawn",
    "Please leave the spare key under the blue flower pot",
    "The farmers market opens early on Saturday morning",
    "He might even have been made amiable himself",
]
COPY_BYTES = 512 * 2 ** 20


def descriptions(n: int) -> list[str]:
    out = []
    for i in range(n):
        out.append(f'[00:00-00:0{3 + i % 5}] "{SENTENCES[i % len(SENTENCES)]}" (Gender: {GENDERS[i % 2]}, '
                   f'Pitch: {PITCHES[i % 3]}, Speaking speed: {SPEEDS[(i // 3) % 3]}, Volume: Normal, '
                   f'Noise: Clean)\n\nWhat can you hear?')
    return out


def copy_bandwidth(repeats: int = 5) -> float:
    """Bytes read + written per second by a large tensor copy (best of `repeats`)."""
    src = torch.ones(COPY_BYTES // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return 2 * COPY_BYTES / best


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of distinct parameter storage (tied embeddings count once)."""
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="config whose model.llm generates (default: the embedded default)")
    p.add_argument("--n", type=int, default=32, help="prompts")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=48)
    args = p.parse_args()

    cfg = load_config(args.config)
    gen = TextGenerator.from_config(cfg)
    prompts = [gen.prompt_ids(d) for d in descriptions(args.n)]
    sampling = GenerationConfig(max_new_tokens=args.max_new_tokens)
    print(f"model {gen.model_name}, {args.n} prompts, max {args.max_new_tokens} new tokens, "
          f"{torch.get_num_threads()} threads")

    gen.generate(prompts[:2], sampling, batch_size=2)  # warm-up
    t0 = time.perf_counter()
    single = [gen.generate([q], sampling, batch_size=1)[0] for q in prompts]
    t_single = time.perf_counter() - t0
    t0 = time.perf_counter()
    batched = gen.generate(prompts, sampling, batch_size=args.batch_size)
    t_batched = time.perf_counter() - t0

    tok_single = sum(g.tokens for g in single) / t_single
    tok_batched = sum(g.tokens for g in batched) / t_batched
    agree = sum(a.text == b.text for a, b in zip(single, batched))
    bw = copy_bandwidth()
    wbytes = weight_bytes(gen.llm)
    bound = bw / wbytes
    print(f"per-sample generate: {sum(g.tokens for g in single)} tokens in {t_single:.1f} s = {tok_single:.1f} tok/s")
    print(f"batched (batch {args.batch_size}, length-sorted, left-padded, KV cache): "
          f"{sum(g.tokens for g in batched)} tokens in {t_batched:.1f} s = {tok_batched:.1f} tok/s")
    print(f"identical answers: {agree}/{args.n}")
    print(f"memory-copy bandwidth {bw / 1e9:.1f} GB/s, weights {wbytes / 1e6:.0f} MB -> decoding bound "
          f"{bound:.1f} tok/s for one sequence")
    print(f"per-sample reaches {tok_single / bound:.0%} of the one-sequence bound; "
          f"batched reaches {tok_batched / bound:.0%} of it")
    print(f"speedup {tok_batched / tok_single:.1f}")


if __name__ == "__main__":
    main()
