"""`speechllm eval`: audio tasks, forgetting rate and text retention of checkpoints vs the text reference."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import add_common, add_config_args, add_section_flags, config_from_args, fail, new_parser


def add_parser(sub) -> None:
    from ..eval.constraints import CONSTRAINTS

    p = new_parser(
        sub, "eval", "audio tasks, forgetting rate and text retention of checkpoints vs the text reference",
        "Evaluate one or more checkpoints side by side against the text reference (the base LLM\n"
        "reading each clip's description):\n"
        "  audio tasks   accuracy per task (label extraction, lenient and strict; transcription WER)\n"
        "  forgetting    Speech-IFEval style: task question + a format constraint; IFrate from audio\n"
        "                vs IFrate of the reference; delta = (IFrate - IFrate_ref) / IFrate_ref;\n"
        "                scored by IFEval's official checkers where IFEval has the kind\n"
        "  retention     no audio: KL to the base LLM, and IFEval's 541 prompts (--text-prompts N: a\n"
        "                seeded sample) scored by the official checkers, strict and loose (a built-in\n"
        "                set when the prompts cannot be fetched)\n"
        "  safety        refusal rate to harmful requests (AdvBench, from a pinned wheel; --safety-items N\n"
        "                of its held-out fifth, 0 skips): spoken by the offline TTS and asked with audio,\n"
        "                typed with no audio, and asked of the base LLM as text (the reference);\n"
        "                delta = refusal - refusal_ref with a paired interval; --safety-file FILE: your\n"
        "                own requests, one per line\n"
        "Every interval is a 95% bootstrap over items. Answers are saved as they come: re-running\n"
        "resumes (and re-scores what was answered); predictions.jsonl holds every answer with its\n"
        "score. --data is a tasks.jsonl, an annotated metadata.jsonl (tasks are made from its\n"
        "labels/annotations), a Dynamic-SUPERB dataset (save_to_disk folder) or MMAU's JSON.\n"
        "Options below override the config's `eval:` section.",
        ["speechllm eval --checkpoint runs/self-output runs/label --data data/test.metadata.jsonl --out runs/eval",
         "speechllm eval --checkpoint runs/self-output --data test.metadata.jsonl --out runs/eval --safety-items 48",
         "speechllm eval --checkpoint runs/self-output --data mmau-test-mini.json --out runs/mmau --text-prompts 0",
         "speechllm eval --checkpoint runs/desta2 --data ./dynamic_superb_task --data-format dynamic-superb \\",
         "    --out runs/ds --device cuda --batch-size 32"])
    p.add_argument("--checkpoint", nargs="+", required=True, metavar="DIR", help="checkpoint folders to compare")
    p.add_argument("--data", required=True, metavar="PATH", help="tasks.jsonl, metadata.jsonl, dataset folder or "
                                                                 "MMAU .json")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (report, plots, every answer)")
    add_section_flags(p, "eval", choices={"constraints": sorted(CONSTRAINTS)},
                      metavars={"tasks": "TASK", "asr_model": "NAME", "split": "SPLIT", "safety_file": "FILE",
                                "safety_instruction": "TEXT"})
    add_common(p)
    add_config_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..errors import SpeechLLMError
    from ..eval.suite import run_eval
    from ..io.paths import folder_problem
    from ..model.speechllm import read_checkpoint, read_weights

    cfg = config_from_args(args).eval
    data = Path(args.data)
    if not data.exists():
        return fail(f"{data}: no such file or folder")
    for c in args.checkpoint:
        if not (Path(c) / "config.json").is_file():
            return fail(f"{c}: not a speechllm checkpoint (no config.json; make one with `speechllm train`)")
        read_checkpoint(Path(c))  # a damaged checkpoint is reported now, not after the others are answered
        read_weights(Path(c))
    out = Path(args.out)
    problem = folder_problem(out)
    if problem:
        return fail(f"--out: {problem}")
    existed = out.exists()
    try:
        run_eval([Path(c) for c in args.checkpoint], data, out, cfg, device=args.device, progress=not args.quiet)
    except SpeechLLMError as err:
        if not existed and out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # nothing was written: leave no empty folder behind
        return fail(str(err))
    print((out / "report.md").read_text())
    print(f"eval: report -> {out / 'report.md'}, {out / 'report.json'}, {out / 'plots'}")
    return 0
