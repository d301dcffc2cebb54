"""`speechllm train`: train the adapter on targets.jsonl (resumable, accelerate-ready)."""

from __future__ import annotations

import argparse

from .common import add_config_args, config_from_args, fail, new_parser


def add_parser(sub) -> None:
    p = new_parser(
        sub, "train", "train the adapter on targets.jsonl (resumable, accelerate-ready)",
        "Train the adapter (frozen Whisper encoder and LLM) so the LLM gives the targets from audio.\n"
        "Re-running the same command resumes from the newest checkpoint in train.out_dir; with other\n"
        "settings (data, model, lr, batch size, schedule, steps, seed, ...) it stops and names them:\n"
        "train.resume=must continues that run with the new settings, train.resume=never starts afresh.\n"
        "Targets longer than train.max_target_tokens are cut there; records that cannot fit the model\n"
        "(empty target, instruction, clip or sequence too long) are left out; both are counted.\n"
        "The forgetting curve: train.forgetting_every=N train.forgetting_data=test.metadata.jsonl scores\n"
        "IFrate and delta on train.forgetting_items held-out items every N steps (metrics.jsonl,\n"
        "TensorBoard); train.keep_best=forgetting ends with the adapter of its best step.\n"
        "Multi-GPU / multi-node: `accelerate launch [--num_processes N] -m speechllm.cli train ...`.",
        ["speechllm train --config configs/default.yaml train.data=data/train.targets.jsonl \\",
         "    train.out_dir=runs/self-output train.max_steps=300",
         "speechllm train train.data=data/train.targets.jsonl train.out_dir=runs/so train.max_steps=100 \\",
         "    train.forgetting_every=20 train.forgetting_data=data/test.metadata.jsonl train.keep_best=forgetting",
         "accelerate launch --num_processes 8 -m speechllm.cli train \\",
         "    --config configs/desta2-llama3-8b-whisper-small.yaml train.data=... train.out_dir=runs/desta2"])
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_config_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..training.trainer import TrainingError, train

    cfg = config_from_args(args)
    try:
        out = train(cfg, progress=not args.quiet)
    except TrainingError as err:
        return fail(str(err))
    print(f"train: adapter -> {out} (speechllm chat --checkpoint {out} --audio CLIP \"What can you hear?\")")
    return 0
