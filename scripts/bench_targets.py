"""Throughput of target generation, side by side on the same prompts (the demo's system prompt):
per-sample `generate`, and speechllm's batched engine with and without the shared prompt prefix
computed once (`generation.reuse_prefix`) and with finished sequences kept in the batch as
transformers' `generate` keeps them (`generation.drop_finished=false`; by default each leaves its
batch once it stops) and with the KV cache grown by concatenation as transformers' own cache grows
(`generation.kv_in_place=false`; by default a CPU writes it in place) and with the linear layers
multiplied by `F.linear` (`generation.packed_weights=false`; by default a CPU in float32 multiplies
by weights packed once in oneDNN's layout, `speechllm/model/packed.py`); the answers compared; and
the batch's bound on this machine (scripts/bounds.py):

    bound = min(batch x one-sequence memory bound, compute bound)   generated tokens per second
    one-sequence memory bound = copy bandwidth / weight bytes   (a decoding step reads every weight)
    compute bound = matmul peak x generated tokens / FLOPs of the whole job
                    (prefill included: every prompt position, the shared prefix once with reuse)

Padding and sequences that go on after their stop token are work the bound does not count.
The batched runs alternate (reuse, no reuse, finished kept, cache grown, unpacked) `--rounds` times and keep
each one's best time; `drop finished speedup` compares kept and dropped both on the grown cache. On
a machine shared with other work, `--threads 1 --cpu-time` times the process's CPU time instead of
wall time (the bounds are then those of one thread).

    python scripts/bench_targets.py [--n 32] [--batch-size 32] [--max-new-tokens 48] [--rounds 2]
                                    [--instruction "What can you hear?"]
                                    [--threads N] [--cpu-time] [--dtype auto|float32|bfloat16]
                                    [--attn auto|sdpa|eager|grouped]
"""

from __future__ import annotations

import argparse
import dataclasses

import torch

from bounds import (DTYPE_LABEL, LLMFlops, add_attention_arg, add_dtype_arg, clock, copy_bandwidth, matmul_peak,
                    resolve_dtype, weight_bytes)
from speechllm.config import GenerationConfig, load_config
from speechllm.demo import SYSTEM_PROMPT
from speechllm.model.generate import Generation, TextGenerator
from speechllm.model.prefix import prompt_prefix_length

PITCHES, SPEEDS, GENDERS = ("Low", "Normal", "High"), ("Slow", "Normal", "Fast"), ("Male", "Female")
SENTENCES = [
    "The small boat drifted slowly toward the rocky shore at dawn",
    "Please leave the spare key under the blue flower pot",
    "The farmers market opens early on Saturday morning",
    "He might even have been made amiable himself",
]


def descriptions(n: int, instruction: str = "What can you hear?") -> list[str]:
    """`n` description prompts of the demo's shape, each ending in `instruction`."""
    out = []
    for i in range(n):
        out.append(f'[00:00-00:0{3 + i % 5}] "{SENTENCES[i % len(SENTENCES)]}" (Gender: {GENDERS[i % 2]}, '
                   f'Pitch: {PITCHES[i % 3]}, Speaking speed: {SPEEDS[(i // 3) % 3]}, Volume: Normal, '
                   f'Noise: Clean)\n\n{instruction}')
    return out


def parse_args() -> argparse.Namespace:
    """The command line: see the module docstring."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="config whose model.llm generates (default: the embedded default)")
    p.add_argument("--system-prompt", default=SYSTEM_PROMPT, help="the LLM's system prompt (default: the demo's)")
    p.add_argument("--n", type=int, default=32, help="prompts")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--instruction", default="What can you hear?",
                   help="the question after each description (default: the demo's open one, whose answers run long; "
                        "a one-attribute question such as 'Is the speaker male or female?' gets short answers, "
                        "where dropping finished sequences matters)")
    p.add_argument("--rounds", type=int, default=2, help="alternating timed runs of each batched setting")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    p.add_argument("--cpu-time", action="store_true", help="time the process's CPU time, not wall time")
    add_dtype_arg(p)
    add_attention_arg(p)
    return p.parse_args()


def timed(gen: TextGenerator, prompts: list[list[int]], sampling: GenerationConfig, batch_size: int,
          now) -> tuple[list[Generation], float]:
    """(answers, seconds by the clock `now`) of one batched run."""
    t0 = now()
    out = gen.generate(prompts, sampling, batch_size=batch_size)
    return out, now() - t0


def main() -> None:
    """Time the three ways, compare the answers and print the bounds."""
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    now = clock(args.cpu_time)
    cfg = load_config(args.config, [f"model.llm.dtype={resolve_dtype(args.dtype)}",
                                    f"model.llm.attn_implementation={args.attn}"])
    cfg.model.llm.system_prompt = args.system_prompt
    gen = TextGenerator.from_config(cfg)
    prompts = [gen.prompt_ids(d) for d in descriptions(args.n, args.instruction)]
    lengths = [len(p) for p in prompts]
    shared = prompt_prefix_length(prompts)
    reuse = GenerationConfig(max_new_tokens=args.max_new_tokens)
    whole = dataclasses.replace(reuse, reuse_prefix=False)
    kept = dataclasses.replace(reuse, drop_finished=False)
    grown = dataclasses.replace(reuse, kv_in_place=False)
    plain = dataclasses.replace(reuse, packed_weights=False)
    batch = min(args.batch_size, args.n)
    print(f"model {gen.model_name} ({cfg.model.llm.dtype}, attention {cfg.model.llm.attn_implementation}), "
          f"system prompt {args.system_prompt!r}, {args.n} prompts of "
          f"{min(lengths)}-{max(lengths)} tokens ({shared} shared), max {args.max_new_tokens} new tokens, "
          f"{torch.get_num_threads()} threads, {'CPU' if args.cpu_time else 'wall'} time", flush=True)

    gen.generate(prompts[:2], reuse, batch_size=2)  # warm-up
    t0 = now()
    single = [gen.generate([q], reuse, batch_size=1)[0] for q in prompts]
    t_single = now() - t0
    tokens = sum(g.tokens for g in single)
    print(f"per-sample generate: {tokens} tokens in {t_single:.1f} s = {tokens / t_single:.1f} tok/s", flush=True)
    settings = {"reuse": reuse, "whole": whole, "kept": kept, "grown": grown, "plain": plain}
    runs: dict[str, list[float]] = {name: [] for name in settings}
    answers = {}
    for _ in range(args.rounds):
        for name, sampling in settings.items():
            answers[name], seconds = timed(gen, prompts, sampling, args.batch_size, now)
            runs[name].append(seconds)
    t_reuse, t_whole, t_kept, t_grown, t_plain = (min(runs[k]) for k in settings)

    batched_tokens = sum(g.tokens for g in answers["reuse"])
    for name, label, t in (("reuse", "shared prefix computed once, padding after it", t_reuse),
                           ("whole", "no reuse, left-padded", t_whole),
                           ("kept", "shared prefix once, finished sequences kept as padding", t_kept),
                           ("grown", "shared prefix once, KV cache grown by concatenation", t_grown),
                           ("plain", "shared prefix once, F.linear's matmul (weights not packed)", t_plain)):
        n = sum(g.tokens for g in answers[name])
        print(f"batched (batch {args.batch_size}, length-sorted, {label}): {n} tokens in {t:.1f} s "
              f"= {n / t:.1f} tok/s (runs: {', '.join(f'{s:.1f}' for s in runs[name])} s)")
    same = sum(a.text == b.text for a, b in zip(single, answers["reuse"]))
    same_whole = sum(a.text == b.text for a, b in zip(answers["whole"], answers["reuse"]))
    same_kept = sum(a.text == b.text for a, b in zip(answers["kept"], answers["reuse"]))
    same_grown = sum(a.text == b.text for a, b in zip(answers["grown"], answers["reuse"]))
    same_plain = sum(a.text == b.text for a, b in zip(answers["plain"], answers["reuse"]))
    print(f"identical answers: per-sample vs batched {same}/{args.n}; reuse vs no reuse {same_whole}/{args.n}; "
          f"finished dropped vs kept {same_kept}/{args.n}; KV cache in place vs grown {same_grown}/{args.n}; "
          f"packed weights vs F.linear {same_plain}/{args.n}")

    dtype = cfg.model.llm.dtype
    bw, wbytes, peak = copy_bandwidth(now=now), weight_bytes(gen.llm), matmul_peak(now=now, dtype=getattr(torch, dtype))
    one_seq = bw / wbytes
    flops = LLMFlops.of(gen.llm)
    produced = [g.tokens + g.finished for g in answers["reuse"]]
    job = {"reuse": flops.generation(lengths, produced, shared), "whole": flops.generation(lengths, produced)}
    compute = {name: peak * batched_tokens / f for name, f in job.items()}
    print(f"memory-copy bandwidth {bw / 1e9:.1f} GB/s, weights {wbytes / 1e6:.0f} MB -> one-sequence decoding "
          f"bound {one_seq:.1f} tok/s, x batch {batch} = {batch * one_seq:.0f} tok/s")
    print(f"{DTYPE_LABEL[dtype]} matmul peak {peak / 1e9:.1f} GFLOP/s; FLOPs per generated token, prefill included: "
          f"{job['reuse'] / batched_tokens / 1e9:.3f} G with reuse, {job['whole'] / batched_tokens / 1e9:.3f} G "
          f"without -> compute bound {compute['reuse']:.1f} / {compute['whole']:.1f} tok/s")
    bound = {name: min(batch * one_seq, c) for name, c in compute.items()}
    print(f"per-sample reaches {tokens / t_single / one_seq:.0%} of the one-sequence bound")
    print(f"no reuse: {batched_tokens / t_whole / bound['whole']:.0%} of the batch's compute bound")
    print(f"batched: {batched_tokens / t_reuse / bound['reuse']:.0%} of the batch's compute bound")
    print(f"batched speedup over per-sample {t_single / t_reuse * batched_tokens / tokens:.1f}")
    print(f"drop finished speedup {t_kept / t_grown:.2f}")  # both grow transformers' cache by concatenation
    print(f"in-place KV cache speedup {t_grown / t_reuse:.2f}")
    print(f"packed weights speedup {t_plain / t_reuse:.2f}")
    print(f"prefix reuse speedup {t_whole / t_reuse:.2f}")


if __name__ == "__main__":
    main()
