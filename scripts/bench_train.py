"""Training throughput: speechllm's defaults vs DeSTA2.5-style settings, side by side in one run
on the same records, plus the step's achieved FLOP/s against the measured matmul peak of the LLM's dtype and
peak RSS (ours alone, and the whole process); the last line is the speedup.

- ours: tapped encoder states from the feature cache (computed once, trimmed to each clip),
  batches grouped by estimated LLM positions and padded to their longest sequence, the shared prompt prefix (template
  head, system prompt, `audio_start`) run once (`train.reuse_prefix`; the frozen LLM's prefix KV is
  kept across steps), LM head only on
  target positions; also timed without the prefix reuse;
- DeSTA2.5-style: the encoder runs every step on input padded to 30 s, no cache, every batch
  padded to 300 tokens, the loss as DeSTA2.5's model computes it (the LLM's own forward with
  `labels=`: transformers' causal-LM loss, logits over every position cast to float32), the LLM's
  attention transformers' kernel (`model.llm.attn_implementation`, as DeSTA2.5's code runs it); also
  timed with the LM head at target positions only (ours's loss), to show what that alone gains; when
  ours trains with another kernel (`--train-attn`, `model.llm.train_attn_implementation`: auto or
  grouped) it is also timed with that one, to show what the settings alone gain.

Peak RSS is read twice: after ours has run every timed batch once, before any other setting ran
(ours's footprint, the figure the speed goal holds), and at the end (the whole process, the
DeSTA2.5-style batches' activations and full logits included).

With `--lora` every setting also trains LoRA on the LLM (the demo's experiment 2, from `speechllm.demo`:
r=8 on q/v, dropout 0), and ours is also timed with LoRA dropout 0.05 (every sequence then runs its own prompt prefix:
a mask per sequence), printed as `LoRA dropout 0 speedup N`.

The settings take turns batch by batch (other work on the machine slows them alike); on a machine
shared with other work, `--threads 1 --cpu-time` times the process's CPU time instead.

    python scripts/bench_train.py [--config configs/default.yaml] [--n 32] [--steps 6] [--batch-size 8]
                                  [--threads N] [--cpu-time] [--dtype auto|float32|bfloat16]
                                  [--attn auto|sdpa|eager|grouped]
                                  [--train-attn auto|model|sdpa|eager|grouped] [--lora]
"""

from __future__ import annotations

import argparse
import functools
import json
import resource
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from peft.tuners.lora import LoraLayer
from torch import nn

from speechllm.io.audio import load_audio
from speechllm.config import Config, LoRAConfig, load_config
from speechllm.demo import FULL, LORA_RUNS, demo_config
from speechllm.model import Batch, Example, SpeechLLM, build_model
from speechllm.model.attention import kernel as attention_kernel
from speechllm.model.llm import DTYPES
from speechllm.model.lora import apply_lora
from speechllm.model.speechllm import IGNORE_INDEX
from speechllm.training.cache import FeatureCache
from speechllm.training.data import TrainRecord, batch_at, epoch_batches, load_targets

from bounds import DTYPE_LABEL, LLMFlops, add_attention_arg, add_dtype_arg, add_train_attention_arg, clock, matmul_peak, resolve_dtype

DESTA_SEQ_LEN = 300
"""DeSTA2.5's max_seq_length: every batch is padded (or cut) to it."""
FORWARD_BACKWARD = 4
"""FLOPs per linear weight and trained position: forward (2) + activation gradients (2); the frozen
LLM's weights get no gradients."""
FORWARD = 2
"""FLOPs per linear weight and position run without gradients (the frozen LLM's shared prefix)."""
LORA_DROPOUT = 0.05
"""`--lora`: the dropout ours is also timed with (the default before 2026-11-27)."""


def make_corpus(folder: Path, n: int) -> Path:
    """Synthesize `n` labelled clips under `folder` and write their training targets; returns the
    targets file."""
    from speechllm.data.synth import synthesize

    synthesize(folder / "synth", n=n, seed=0, test_fraction=0.5, workers=2, progress=False)
    lines = []
    for split in ("train", "test"):
        for line in (folder / "synth" / f"{split}.jsonl").read_text().splitlines():
            rec = json.loads(line)
            lab = rec["labels"]
            lines.append({"id": rec["id"], "audio": f"synth/{rec['audio']}", "transcript": lab["transcript"],
                          "instruction": "What can you hear?",
                          "target": f"A {lab['gender']} voice with {lab['pitch']} pitch says: {lab['transcript']}"})
    path = folder / "targets.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    return path


def parse_args() -> argparse.Namespace:
    """The command line: see the module docstring."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="model config (default: the embedded default)")
    p.add_argument("--n", type=int, default=32, help="synthetic clips")
    p.add_argument("--steps", type=int, default=6, help="timed steps per setting")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    p.add_argument("--cpu-time", action="store_true", help="time the process's CPU time, not wall time")
    add_dtype_arg(p)
    add_attention_arg(p)
    add_train_attention_arg(p)
    p.add_argument("--lora", action="store_true",
                   help=f"train the demo's experiment-2 LoRA too, and time ours with LoRA dropout {LORA_DROPOUT} "
                        "beside the demo's")
    return p.parse_args()


def demo_lora() -> LoRAConfig:
    """`--lora`: the LoRA of the demo's experiment-2 runs, as `speechllm demo` configures it."""
    run = LORA_RUNS[-1]
    return demo_config(FULL, run.strategy, Path("runs/demo"), lora=run).train.lora


def llm_matmul_params(model: SpeechLLM) -> int:
    """Matmul parameters the LLM applies to every token: all but the (tied) embedding table (the
    second count of `optimizer_step`)."""
    embed = model.llm.get_input_embeddings().weight
    return sum(q.numel() for q in model.llm.parameters() if q.data_ptr() != embed.data_ptr())


@functools.cache
def flops_of(llm: nn.Module) -> LLMFlops:
    """The FLOP counts of `llm`'s parts, read once per model (not in every timed step)."""
    return LLMFlops.of(llm)


def transformers_loss(model: SpeechLLM, batch: Batch) -> torch.Tensor:
    """DeSTA2.5's loss: the LLM's own forward with `labels` (transformers' causal-LM loss: the LM
    head over every position, the logits cast to float32, labels shifted inside), on the kernel
    training runs with."""
    with attention_kernel(model.llm, model.training_kernel(batch)):
        return model.llm(inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask,
                         labels=batch.labels).loss


def optimizer_step(model: SpeechLLM, opt: torch.optim.Optimizer, batch: Batch,
                   loss_of: Callable[[SpeechLLM, Batch], torch.Tensor] | None = None
                   ) -> tuple[float, tuple[float, float]]:
    """Forward, backward and one optimizer step on `batch` (the loss `model(batch)`, or
    `loss_of(model, batch)`); returns (loss, (LLM FLOPs, LLM FLOPs per
    linear weight)). The FLOPs (`bounds.LLMFlops`): the attended positions with gradients (linear
    layers, attention over the prefix and the positions before, the LM head where a target token
    is predicted), and the shared prefix when it was run: the frozen LLM's without gradients, once
    for later steps too; with LoRA with gradients, every step. The second count (per linear weight,
    of the positions only: the LLM part's figure before 2026-11-28) leaves attention and the LM head out."""
    runs = model.prefixes.computed
    loss = model(batch) if loss_of is None else loss_of(model, batch)
    loss.backward()
    opt.step()
    opt.zero_grad()
    flops, n = flops_of(model.llm), len(batch.prefix_ids or ())
    prefix_runs = model.prefixes.computed - runs
    lengths = batch.attention_mask.sum(dim=1).tolist()
    attended = sum(n * length + length * (length + 1) // 2 for length in lengths)
    predicted = int((batch.labels[:, 1:] != IGNORE_INDEX).sum())
    prefix_pass = flops.forward if model.lora is None else flops.training
    work = flops.training(sum(lengths), attended, predicted) + prefix_runs * prefix_pass(n, n * (n + 1) // 2, 0)
    per_weight = FORWARD if model.lora is None else FORWARD_BACKWARD
    return float(loss.detach()), (work, FORWARD_BACKWARD * sum(lengths) + per_weight * n * prefix_runs)


def ours_step(model: SpeechLLM, opt: torch.optim.Optimizer, cache: FeatureCache, reuse_prefix: bool,
              recs: list[TrainRecord]) -> tuple[float, float]:
    """speechllm's step: cached encoder states, the batch padded to its longest sequence, the
    shared prefix run once (`reuse_prefix`)."""
    states = cache.get([r.audio for r in recs])
    exs = [Example(r.instruction, None, r.transcript, r.target, states=s) for r, s in zip(recs, states)]
    return optimizer_step(model, opt, model.build_batch(exs, reuse_prefix=reuse_prefix))


def desta_step(model: SpeechLLM, opt: torch.optim.Optimizer, recs: list[TrainRecord], full_logits: bool = True
               ) -> tuple[float, float]:
    """DeSTA2.5-style step: the encoder on 30 s of padded input, the batch padded to 300 tokens, the
    loss over logits at every position (`full_logits`, DeSTA2.5's) or at target positions only."""
    wavs = [load_audio(r.audio) for r in recs]
    feats = model.encoder.feature_extractor(wavs, sampling_rate=16000, return_tensors="pt")["input_features"]
    with torch.no_grad():  # every clip padded to 30 s: 1500 encoder frames each, every step
        enc = model.encoder(feats, torch.full((len(recs),), feats.shape[-1]))
    exs = [Example(r.instruction, None, r.transcript, r.target, states=[s[i] for s in enc.states])
           for i, r in enumerate(recs)]
    b = model.build_batch(exs)
    pad = DESTA_SEQ_LEN - b.inputs_embeds.shape[1]  # every batch padded (or cut) to 300 tokens
    batch = Batch(F.pad(b.inputs_embeds, (0, 0, 0, pad)), F.pad(b.attention_mask, (0, pad)),
                  F.pad(b.labels, (0, pad), value=IGNORE_INDEX))
    return optimizer_step(model, opt, batch, transformers_loss if full_logits else None)


def with_training_kernel(model: SpeechLLM, setting: str, step: Callable[[list[TrainRecord]], tuple[float, float]]
                         ) -> Callable[[list[TrainRecord]], tuple[float, float]]:
    """`step` run with `model.llm.train_attn_implementation=setting` (the model's own one restored after)."""
    def run(recs: list[TrainRecord]) -> tuple[float, float]:
        own = model.config.llm.train_attn_implementation
        model.config.llm.train_attn_implementation = setting
        try:
            return step(recs)
        finally:
            model.config.llm.train_attn_implementation = own
    return run


def with_lora_dropout(model: SpeechLLM, p: float, step: Callable[[list[TrainRecord]], tuple[float, float]]
                      ) -> Callable[[list[TrainRecord]], tuple[float, float]]:
    """`step` run with every LoRA branch's input dropout at `p` (the model's own modules restored after)."""
    branches = [m.lora_dropout for m in model.llm.modules() if isinstance(m, LoraLayer)]
    if not branches:
        raise ValueError("the model has no LoRA branches")

    def run(recs: list[TrainRecord]) -> tuple[float, float]:
        own = [dict(b) for b in branches]
        for b in branches:
            for name in list(b):
                b[name] = nn.Dropout(p)
        try:
            return step(recs)
        finally:
            for b, modules in zip(branches, own):
                b.update(modules)
    return run


def time_steps(settings: dict[str, Callable[[list[TrainRecord]], tuple[float, tuple[float, float]]]],
               steps: list[list[TrainRecord]], now) -> dict[str, tuple[float, float, float]]:
    """{setting: (samples/s, LLM FLOP/s, LLM FLOPs per linear weight per second)} over the batches
    `steps` (FLOPs as `optimizer_step` counts them), after one warm-up step each, timed by the clock
    `now`. The settings take turns batch by batch, so that other work on the machine slows them alike."""
    seconds, flops, per_weight = (dict.fromkeys(settings, 0.0) for _ in range(3))
    for step in settings.values():
        step(steps[0])  # warm-up
    for recs in steps:
        for name, step in settings.items():
            t0 = now()
            work = step(recs)[1]
            seconds[name] += now() - t0
            flops[name] += work[0]
            per_weight[name] += work[1]
    samples = sum(len(s) for s in steps)
    return {name: (samples / seconds[name], flops[name] / seconds[name], per_weight[name] / seconds[name])
            for name in settings}


def peak_rss_gb() -> float:
    """The process's peak resident memory so far, GB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def run_settings(model: SpeechLLM, opt: torch.optim.Optimizer, cfg: Config, args: argparse.Namespace,
                 kernel: str | None) -> tuple[dict[str, tuple[float, float, float]], float, int, float]:
    """Both settings on the same synthetic records: ({setting: `time_steps`'s figures}, seconds to
    build the feature cache, clips, peak RSS in GB once ours had run every batch and nothing else had)."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        records, _ = load_targets(make_corpus(tmp, args.n))
        order, starts = epoch_batches(records.positions(model.clip_positions), args.batch_size, seed=0, epoch=0)
        steps = [records.records(batch_at(order, starts, b, args.batch_size))
                 for b in range(min(args.steps, len(starts)))]
        cache = FeatureCache(tmp / "cache", model.encoder, cfg.model.encoder.name)
        t0 = time.perf_counter()
        cache.build(records.audio_paths(), progress=False)
        t_cache = time.perf_counter() - t0
        settings = {"ours": partial(ours_step, model, opt, cache, True),
                    "ours, no prefix reuse": partial(ours_step, model, opt, cache, False),
                    "desta2.5-style": with_training_kernel(model, "model", partial(desta_step, model, opt)),
                    "desta2.5-style, LM head at targets": with_training_kernel(
                        model, "model", partial(desta_step, model, opt, full_logits=False))}
        if model.lora is not None:
            settings[f"ours, LoRA dropout {LORA_DROPOUT}"] = with_lora_dropout(model, LORA_DROPOUT, settings["ours"])
        if kernel is not None:  # ours trains with a kernel of its own: the baseline with it too
            settings["desta2.5-style, ours's kernel"] = with_training_kernel(model, kernel, partial(desta_step, model, opt))
        for recs in steps:  # ours alone first: its own peak memory, before any other setting's batches
            settings["ours"](recs)
        ours_rss = peak_rss_gb()
        results = time_steps(settings, steps, clock(args.cpu_time))
    return results, t_cache, len(records), ours_rss


def report(cfg: Config, args: argparse.Namespace, results: dict[str, tuple[float, float, float]], t_cache: float,
           clips: int, llm_params: int, peak: float, kernel: str | None, lora: LoRAConfig | None,
           ours_rss: float) -> None:
    """Print throughput of every setting, achieved FLOP/s, peak RSS and, last, the speedup (`kernel`:
    ours's training kernel, None: the model's own)."""
    trains_with = kernel or f"the model's, {cfg.model.llm.attn_implementation}"
    with_lora = f", LoRA r={lora.r} dropout {lora.dropout:g} on the LLM" if lora else ""
    sps_ours, llm_flops, per_weight = results["ours"]
    sps_whole = results["ours, no prefix reuse"][0]
    sps_desta = results["desta2.5-style"][0]
    linear_flops = llm_params * per_weight  # per second
    print(f"{cfg.model.llm.name} ({cfg.model.llm.dtype}, attention {cfg.model.llm.attn_implementation}, in "
          f"training {cfg.model.llm.train_attn_implementation}: {trains_with}) + "
          f"{cfg.model.encoder.name}{with_lora}, batch {args.batch_size}, "
          f"{args.steps} steps each, "
          f"{torch.get_num_threads()} threads, {'CPU' if args.cpu_time else 'wall'} time; feature cache built once "
          f"in {t_cache:.1f} s for {clips} clips")
    print(f"ours: {sps_ours:.2f} samples/s; without prefix reuse {sps_whole:.2f} samples/s (prefix reuse speedup "
          f"{sps_ours / sps_whole:.2f}); DeSTA2.5-style (30 s encoder input, no cache, 300-token batches, logits at "
          f"every position): {sps_desta:.2f} samples/s")
    sps_head = results["desta2.5-style, LM head at targets"][0]
    print(f"DeSTA2.5-style with the LM head at target positions only: {sps_head:.2f} samples/s (the LM head alone "
          f"{sps_head / sps_desta:.2f}; ours's other settings over it {sps_ours / sps_head:.1f})")
    lora_key = f"ours, LoRA dropout {LORA_DROPOUT}"
    if lora_key in results:
        print(f"with LoRA dropout {LORA_DROPOUT} (each sequence its own prefix): {results[lora_key][0]:.2f} samples/s; "
              f"LoRA dropout {lora.dropout:g} speedup {sps_ours / results[lora_key][0]:.2f}")
    if "desta2.5-style, ours's kernel" in results:
        sps_kernel = results["desta2.5-style, ours's kernel"][0]
        print(f"DeSTA2.5-style with ours's training kernel ({kernel}): {sps_kernel:.2f} samples/s; the settings "
              f"alone: speedup {sps_ours / sps_kernel:.1f}, the kernel alone {sps_kernel / sps_desta:.2f}")
    print(f"LLM part: {llm_flops / 1e9:.1f} GFLOP/s achieved vs {DTYPE_LABEL[cfg.model.llm.dtype]} matmul peak "
          f"{peak / 1e9:.1f} GFLOP/s = {llm_flops / peak:.0%} (linear layers, attention and the LM head at target "
          f"positions; the linear layers' weights alone: {linear_flops / peak:.0%})")
    print(f"peak RSS {ours_rss:.2f} GB (ours, before the other settings ran); the whole run {peak_rss_gb():.2f} GB")
    print(f"speedup {sps_ours / sps_desta:.1f}")


def main() -> None:
    """Build the model, time both settings and print the comparison."""
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(args.config, [f"model.llm.dtype={resolve_dtype(args.dtype)}",
                                    f"model.llm.attn_implementation={args.attn}",
                                    f"model.llm.train_attn_implementation={args.train_attn}"])
    torch.manual_seed(0)
    model = build_model(cfg)
    lora = demo_lora() if args.lora else None
    if lora:
        apply_lora(model, lora)
        model.llm.train()  # as the trainer runs LoRA: its dropout active
    params = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    llm_params = llm_matmul_params(model)
    kernel = model.training_kernel()  # ours's, for a batch of any length
    results, t_cache, clips, ours_rss = run_settings(model, opt, cfg, args, kernel)
    peak = matmul_peak(now=clock(args.cpu_time), dtype=DTYPES[cfg.model.llm.dtype])
    report(cfg, args, results, t_cache, clips, llm_params, peak, kernel, lora, ours_rss)


if __name__ == "__main__":
    main()
