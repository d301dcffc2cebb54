"""Where the time of a training step and of batched generation goes (torch.profiler), on the
embedded default: operators by self CPU time, and the named parts of each.

- train: one optimizer step of `--batch-size` examples (precomputed encoder states as from the
  feature cache, the shared prefix run once), parts: forward (the prefix in it), backward,
  optimizer;
- generate: the batched engine answering `--n` description prompts (the demo's system prompt),
  parts: the shared prefix, prefill (the first forward pass of the batch) and decoding (the rest).

    python scripts/profile_speed.py [--stage train|generate|both] [--batch-size 8] [--n 32]
                                    [--max-new-tokens 16] [--rows 12] [--threads N]
                                    [--dtype auto|float32|bfloat16]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from bench_targets import descriptions
from bounds import add_dtype_arg, resolve_dtype
from speechllm.config import GenerationConfig, load_config
from speechllm.demo import SYSTEM_PROMPT
from speechllm.io.audio import load_audio
from speechllm.model import Example, build_model
from speechllm.model import generate as generate_module
from speechllm.model.generate import TextGenerator

SAMPLES = Path(__file__).resolve().parent.parent / "samples"
TARGET = "A man with a low voice reads a sentence from a novel aloud, slowly and calmly: {text}"


def top(prof, rows: int) -> None:
    """The operators that took the most self CPU time."""
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=48))


def parts(prof, names: list[str], within: str | None = None) -> None:
    """Seconds of each named part (record_function) and its share of their sum, or of the part
    `within` that holds them."""
    totals = {e.key: e.cpu_time_total / 1e6 for e in prof.key_averages() if e.key in [*names, within]}
    whole = totals.get(within, 0) if within else sum(totals.get(n, 0) for n in names)
    print("  ".join(f"{n} {totals.get(n, 0):.2f} s ({totals.get(n, 0) / whole:.0%})" for n in names))


def profile_train(cfg, batch_size: int, rows: int) -> None:
    torch.manual_seed(0)
    model = build_model(cfg)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    waves = [load_audio(p) for p in sorted(SAMPLES.glob("*.wav"))]
    texts = ["unless to be rather cold hearted", "he might even have been made amiable himself"]
    exs = []
    for i in range(batch_size):
        wav = waves[i % len(waves)][: 16000 * (3 + i % 4)]
        enc = model.encoder.encode([wav])
        states = [s[0, : int(enc.lengths[0])] for s in enc.states]
        exs.append(Example("What can you hear?", None, texts[i % 2], TARGET.format(text=texts[i % 2]), states=states))

    shared = model._prefix_cache

    def labelled_prefix(batch):
        with record_function("prefix"):
            return shared(batch)

    model._prefix_cache = labelled_prefix

    def step():
        batch = model.build_batch(exs, reuse_prefix=True)
        with record_function("forward"):
            loss = model(batch)
        with record_function("backward"):
            loss.backward()
        with record_function("optimizer"):
            opt.step()
            opt.zero_grad()

    step()  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    print(f"train: one step of {batch_size} examples")
    parts(prof, ["forward", "backward", "optimizer"])
    parts(prof, ["prefix"], within="forward")
    top(prof, rows)


def profile_generate(cfg, n: int, max_new_tokens: int, rows: int) -> None:
    cfg.model.llm.system_prompt = SYSTEM_PROMPT
    gen = TextGenerator.from_config(cfg)
    prompts = [gen.prompt_ids(d) for d in descriptions(n)]
    sampling = GenerationConfig(max_new_tokens=max_new_tokens)
    gen.generate(prompts[:2], sampling, batch_size=2)  # warm-up
    calls = []
    forward = gen.llm.forward

    def labelled(*args, **kwargs):  # the first forward pass of a batch is the prefill
        with record_function("prefill" if not calls else "decode"):
            calls.append(1)
            return forward(*args, **kwargs)

    prefix_cache = generate_module.prefix_cache

    def labelled_prefix(*args):
        with record_function("prefix"):
            return prefix_cache(*args)

    gen.llm.forward, generate_module.prefix_cache = labelled, labelled_prefix
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        gen.generate(prompts, sampling, batch_size=n)
    gen.llm.forward, generate_module.prefix_cache = forward, prefix_cache
    print(f"generate: {n} prompts, {max_new_tokens} new tokens, {len(calls)} forward passes")
    parts(prof, ["prefix", "prefill", "decode"])
    top(prof, rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="model config (default: the embedded default)")
    p.add_argument("--stage", choices=("train", "generate", "both"), default="both")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--n", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--rows", type=int, default=12)
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice; 1 on a machine shared with "
                   "other work, where a thread waiting for a descheduled one inflates every small operator)")
    add_dtype_arg(p)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = [f"model.llm.dtype={resolve_dtype(args.dtype)}"]
    if args.stage in ("train", "both"):
        profile_train(load_config(args.config, overrides), args.batch_size, args.rows)
    if args.stage in ("generate", "both"):
        profile_generate(load_config(args.config, overrides), args.n, args.max_new_tokens, args.rows)


if __name__ == "__main__":
    main()
