"""`speechllm targets`: metadata.jsonl -> targets.jsonl (the frozen LLM answers from each description)."""

from __future__ import annotations

import argparse
import typing
from pathlib import Path

from ..config import TargetsConfig
from .common import add_common, add_config_args, config_from_args, fail, new_parser, output_file_problem


def add_parser(sub) -> None:
    p = new_parser(
        sub, "targets", "metadata.jsonl -> targets.jsonl: the frozen LLM answers from each description",
        "Make training targets. With the default strategy (self-output, DeSTA2) the base LLM reads\n"
        "each clip's description and answers the instruction; its own words become the target\n"
        "the speech model learns to produce from audio. Degenerate answers are regenerated or\n"
        "dropped (<out>.errors.jsonl); answers longer than train.max_target_tokens are flagged.\n"
        "At the end it prints the targets' mean NLL per token under the base LLM given the\n"
        "description (kept in <out>.nll.json; targets.target_nll=false skips it): self-output\n"
        "targets are far more probable to the LLM than label sentences. minimum-change keeps the\n"
        "self-output and replaces only the words the labels show to be wrong.\n"
        "Resumable; `accelerate launch --num_processes N -m speechllm.cli targets ...` shards.",
        ["speechllm targets data/train.metadata.jsonl --out data/train.targets.jsonl",
         "speechllm targets meta.jsonl --out label.targets.jsonl --strategy label",
         "speechllm targets meta.jsonl --out mc.targets.jsonl --strategy minimum-change",
         "speechllm targets meta.jsonl --out t.jsonl generation.do_sample=true \\",
         "    'targets.instruction_pool=[\"What can you hear?\", \"Describe the audio.\"]'"])
    p.add_argument("metadata", help="metadata .jsonl from `speechllm annotate`")
    p.add_argument("--out", required=True, metavar="FILE", help="targets .jsonl to write (appended, resumable)")
    p.add_argument("--strategy", dest="targets.strategy", default=argparse.SUPPRESS,
                   choices=list(typing.get_args(typing.get_type_hints(TargetsConfig)["strategy"])),
                   help="target strategy (default: self-output), the same as targets.strategy=...")
    add_common(p)
    add_config_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from accelerate import PartialState

    from ..distributed import accelerate_kwargs
    from ..hub import weights
    from ..targets.nll import nll_path, summary_line, target_nll
    from ..targets.run import run_targets

    cfg = config_from_args(args)
    metadata = Path(args.metadata)
    if not metadata.is_file():
        what = "is a folder, not" if metadata.is_dir() else "no such"
        return fail(f"{metadata}: {what} metadata file (make one with `speechllm annotate`)")
    problem = output_file_problem(args.out, metadata)
    if problem:
        return fail(problem)
    weights.check_available(cfg.model.llm.name)  # an unknown LLM fails now, not after the hub's retries
    summary = run_targets(metadata, Path(args.out), cfg, device=args.device, progress=not args.quiet)
    print(summary.line(Path(args.out)))
    if cfg.targets.target_nll and PartialState(**accelerate_kwargs()).is_main_process:
        result = target_nll(args.out, cfg, device=args.device, progress=not args.quiet)
        print(summary_line(result, nll_path(args.out)))
    return 0
