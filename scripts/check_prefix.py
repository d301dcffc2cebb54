"""Shared-prefix reuse (`generation.reuse_prefix`, `train.reuse_prefix`) checked on any device, with
and without it side by side: greedy answers and time on the speech path (`SpeechLLM.generate`) and on
the text path (`TextGenerator`, the targets' teacher), and a training step's loss and gradients.

Answers are compared beside the flips that batching alone causes (the same prompts without reuse in
batches a quarter the size): in half precision, kernels of other shapes round differently and a
greedy answer can flip at a near tie; reuse should flip no more answers than batching does. In
float32 both should be (nearly) all identical. Timing: a warm-up of each setting at the full batch,
then `--rounds` alternating timed runs of each, the best kept. The loss and gradients are float32.

    python scripts/check_prefix.py [--device cuda] [--dtype bfloat16] [--n 64] [--rounds 3] [--out F.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch

from bench_targets import descriptions
from speechllm.config import GenerationConfig, load_config
from speechllm.demo import SYSTEM_PROMPT
from speechllm.io.audio import SAMPLE_RATE, load_audio
from speechllm.model import Example, build_model
from speechllm.model.generate import TextGenerator

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "samples" / "librivox_austen_0890.wav"
WORDS = "the quiet river ran past old stone walls while children laughed and a dog barked far away".split()
INSTRUCTIONS = ["What can you hear?", "Is the speaker male or female?", "Describe the recording in one sentence.",
                "What is the speaker's pitch: low, normal or high?"]
TRAIN_EXAMPLES = 8
NEW_TOKENS = 48


def speech_examples(n: int, target: bool = False) -> list[Example]:
    """`n` examples: the sample clip cut to seeded lengths, seeded transcripts, four instructions."""
    rng = np.random.default_rng(0)
    wav = load_audio(SAMPLE)
    out = []
    for i in range(n):
        clip = wav[: int(SAMPLE_RATE * rng.uniform(1.0, len(wav) / SAMPLE_RATE))]
        words = " ".join(rng.choice(WORDS, size=int(rng.integers(3, 14))))
        out.append(Example(INSTRUCTIONS[i % len(INSTRUCTIONS)], audio=clip, transcript=words,
                           target=f"The speaker says: {words}" if target else None))
    return out


def best_times(run, settings: dict, rounds: int, sync) -> tuple[dict, dict]:
    """(answers, best seconds) of `run(setting)` per setting: one warm-up each, then alternating rounds."""
    for s in settings.values():
        run(s)
    times: dict[str, list[float]] = {name: [] for name in settings}
    answers = {}
    for _ in range(rounds):
        for name, s in settings.items():
            sync()
            t0 = time.perf_counter()
            answers[name] = run(s)
            sync()
            times[name].append(time.perf_counter() - t0)
    return answers, {name: min(t) for name, t in times.items()}


def compare(name: str, answers: dict, seconds: dict, batched: list[str]) -> dict:
    """One path's figures, printed and returned."""
    n = len(answers["reuse"])
    same = sum(a == b for a, b in zip(answers["reuse"], answers["plain"]))
    same_batching = sum(a == b for a, b in zip(answers["plain"], batched))
    row = {"examples": n, "identical_reuse": same, "identical_batching": same_batching,
           "seconds_reuse": seconds["reuse"], "seconds_plain": seconds["plain"],
           "speedup": seconds["plain"] / seconds["reuse"]}
    print(f"{name:<7} identical answers with and without reuse {same}/{n} (batching alone: {same_batching}/{n}); "
          f"prefix reuse speedup {row['speedup']:.2f} ({seconds['plain']:.2f} s -> {seconds['reuse']:.2f} s)",
          flush=True)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", help="model.llm.dtype for generation (float32, bfloat16, ...)")
    p.add_argument("--n", type=int, default=64, help="prompts per path, one batch")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", help="write the figures here as JSON")
    args = p.parse_args()
    cuda = args.device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    cfg = load_config(ROOT / "configs" / "default.yaml", [f"model.llm.dtype={args.dtype}"])
    cfg.model.llm.system_prompt = SYSTEM_PROMPT
    reuse = GenerationConfig(max_new_tokens=NEW_TOKENS)
    settings = {"reuse": reuse, "plain": dataclasses.replace(reuse, reuse_prefix=False)}
    result = {"device": args.device, "dtype": args.dtype}
    print(f"check_prefix: {args.device}, {args.dtype}, {args.n} prompts per path, {NEW_TOKENS} new tokens", flush=True)

    torch.manual_seed(0)
    model = build_model(cfg, device=args.device).eval()
    exs = speech_examples(args.n)
    answers, seconds = best_times(lambda g: model.generate(exs, g), settings, args.rounds, sync)
    quarter = max(1, args.n // 4)
    batched = [a for k in range(0, args.n, quarter) for a in model.generate(exs[k:k + quarter], settings["plain"])]
    result["speech"] = compare("speech", answers, seconds, batched)

    gen = TextGenerator(model.llm, model.tokenizer, model.prompt, cfg.model.llm.name)
    prompts = [gen.prompt_ids(d) for d in descriptions(args.n)]

    def text(g: GenerationConfig, batch_size: int = args.n) -> list[str]:
        return [a.text for a in gen.generate(prompts, g, batch_size=batch_size)]

    answers, seconds = best_times(text, settings, args.rounds, sync)
    result["text"] = compare("text", answers, seconds, text(settings["plain"], quarter))
    del model, gen

    torch.manual_seed(0)
    model = build_model(load_config(ROOT / "configs" / "default.yaml"), device=args.device).eval()
    train = speech_examples(TRAIN_EXAMPLES, target=True)
    params = [q for q in model.parameters() if q.requires_grad]
    losses, grads = [], []
    for on in (False, True):
        model.zero_grad(set_to_none=True)
        loss = model(train, reuse_prefix=on)
        loss.backward()
        losses.append(float(loss.detach()))
        grads.append(torch.cat([q.grad.flatten() for q in params if q.grad is not None]))
    rel = float((grads[0] - grads[1]).norm() / grads[0].norm())
    result["train"] = {"loss_plain": losses[0], "loss_reuse": losses[1], "grad_rel_diff": rel}
    print(f"train   float32 loss {losses[0]:.6f} without reuse, {losses[1]:.6f} with; gradients differ by {rel:.2e} "
          "(relative)", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
