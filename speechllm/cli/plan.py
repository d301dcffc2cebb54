"""`speechllm plan`: parameters, memory per GPU and step time of a configured run, before any
weights are loaded (models built on the meta device from their config.json)."""

from __future__ import annotations

import argparse

from .common import add_config_args, config_from_args, fail, new_parser


def add_parser(sub) -> None:
    p = new_parser(
        sub, "plan", "parameters, memory per GPU and step time of a run, without loading weights",
        "Build the configured encoder, adapter and LLM on the meta device (from each model's config.json:\n"
        "an embedded model, a local folder, or the Hugging Face hub when reachable; no weights are read)\n"
        "and print the parameters (total, trainable), memory per GPU (weights, gradients, AdamW,\n"
        "activations at the batch size and the configured lengths; with and without sharding the frozen\n"
        "LLM), tokens per step and a step time estimated from FLOPs at a stated throughput.\n"
        "Offline, the hub models of the shipped GPU configs are planned from their published config.json;\n"
        "point model.encoder.name / model.llm.name at a folder holding config.json for any other model.",
        ["speechllm plan",
         "speechllm plan --config configs/desta25-llama31-8b-whisper-large-v3.yaml --gpus 8 --gpu-memory 80",
         "speechllm plan --config configs/desta2-llama3-8b-whisper-small.yaml model.llm.name=/models/llama3/"])
    p.add_argument("--gpus", type=int, default=1, metavar="N", help="GPUs (processes) sharing a step (default: 1)")
    p.add_argument("--gpu-memory", type=float, default=None, metavar="GB",
                   help="memory per GPU in GiB: say whether the run fits and how many examples would")
    p.add_argument("--batch-size", type=int, default=None, metavar="B",
                   help="examples per GPU per micro-batch (default: train.batch_size)")
    p.add_argument("--tflops", type=float, default=None, metavar="T",
                   help="sustained TFLOP/s per GPU for the step time (default: 400, an H100 at ~40%% of peak)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    add_config_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..training.plan import DEFAULT_TFLOPS, format_plan, make_plan, plan_json

    if args.gpu_memory is not None and args.gpu_memory <= 0:
        return fail(f"--gpu-memory must be positive (GiB per GPU), got {args.gpu_memory:g}")
    cfg = config_from_args(args)
    plan = make_plan(cfg, gpus=args.gpus, batch_size=args.batch_size,
                     tflops=DEFAULT_TFLOPS if args.tflops is None else args.tflops)
    print(plan_json(plan) if args.json else format_plan(plan, cfg, args.gpu_memory))
    return 0
