"""`speechllm replay`: pseudo-replay data, the base LLM's own instruction-answer pairs (Magpie) and
its answers to a user's instructions, as a `train.replay.data` file."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import (add_common, add_config_args, add_section_flags, config_from_args, fail, info, new_parser,
                     output_file_problem)


def add_parser(sub) -> None:
    p = new_parser(
        sub, "replay", "the base LLM writes instruction-answer pairs (Magpie) for text replay in training",
        "Make text replay data for `speechllm train train.replay.data=FILE train.replay.ratio=0.05`\n"
        "(replay needs train.lora.enabled=true: the frozen LLM's text path has no other trainable weight).\n"
        "--n N: the base LLM (model.llm, with model.llm.system_prompt) is given its chat template up to the\n"
        "user turn's header and writes the user's message (sampled: --temperature, --top-p, --seed) until it\n"
        "closes the turn; then it answers that instruction (generation.*, greedy by default). Degenerate\n"
        "instructions (empty, unfinished, under --min-words, not text, looping) and duplicates (same words,\n"
        "case and punctuation aside) go to <out>.errors.jsonl with the reason.\n"
        "--instructions FILE: the base LLM answers your instructions (one a line, or JSONL with an\n"
        "\"instruction\" and optional \"id\" each), e.g. harmful requests whose answers are its refusals\n"
        "(keep them apart from the safety test items). Both may be given: the file's come first.\n"
        "Each record: {id, instruction, answer, source, truncated, answer_tokens, generator}. Resumable:\n"
        "a rerun continues the same seeded stream up to N records; a larger N continues it.",
        ["speechllm replay --out data/replay.jsonl --n 500",
         "speechllm replay --out data/replay.jsonl --n 500 --instructions harmful_train.txt",
         "speechllm replay --out data/replay.jsonl --n 200 --temperature 0.8 --seed 3 model.llm.system_prompt=null",
         "speechllm train ... train.lora.enabled=true train.replay.data=data/replay.jsonl train.replay.ratio=0.05"])
    p.add_argument("--out", required=True, metavar="FILE", help="replay .jsonl to write (appended, resumable)")
    p.add_argument("--n", type=int, default=0, metavar="N",
                   help="Magpie records the file should hold (written by the LLM itself; default 0)")
    p.add_argument("--instructions", metavar="FILE",
                   help="your own instructions for the base LLM to answer: text, one a line, or .jsonl")
    add_section_flags(p, "replay")
    add_common(p)
    add_config_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..hub import weights
    from ..targets.replay import make_replay

    if args.n < 0:
        return fail(f"--n {args.n}: the number of Magpie records cannot be negative")
    if args.n == 0 and not args.instructions:
        return fail("nothing to do: give --n N (instructions the LLM writes) and/or --instructions FILE")
    cfg = config_from_args(args)
    problem = output_file_problem(args.out, args.instructions)
    if problem:
        return fail(problem)
    weights.check_available(cfg.model.llm.name)  # an unknown LLM fails now, not after the hub's retries
    summary = make_replay(cfg, Path(args.out), args.n, args.instructions, device=args.device,
                          progress=not args.quiet)
    if summary.short:
        info(f"only {summary.magpie} of {args.n} Magpie records after {cfg.replay.max_candidates} candidates per "
             "record: raise replay.max_candidates, or see why in the errors file")
    print(summary.line(Path(args.out)))
    return 0
