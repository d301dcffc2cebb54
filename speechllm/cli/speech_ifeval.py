"""`speechllm speech-ifeval`: Speech-IFEval's protocol on a checkpoint, or its scoring of response files."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import add_common, fail, new_parser


def add_parser(sub) -> None:
    p = new_parser(
        sub, "speech-ifeval", "Speech-IFEval (kehanlu/Speech-IFEval): IFrate per subset and forgetting delta",
        "Speech-IFEval's released items and protocol. --data is its data/ folder (eval_data/*.jsonl,\n"
        "optionally audios/), from `git clone https://github.com/kehanlu/Speech-IFEval`.\n"
        "\n"
        "With --checkpoint: the speech model hears each clip and follows the instruction; its base LLM\n"
        "reads the clip's textual_audio instead (\"Speech Input: ...\"), both under the system prompt\n"
        "\"Follow the given instructions.\", greedy. Closed-ended and creative-writing items are scored\n"
        "by IFEval's official checkers, strict, with the five rule changes Speech-IFEval's own scorer\n"
        "makes (--rules ifeval: none). IFrate per subset, their mean, delta = (IFrate - IFrate_ref) /\n"
        "IFrate_ref. Chain-of-thought items need a judge model: --judge MODEL (any chat LLM: embedded\n"
        "name, hub id or folder; the paper used GPT-4o) scores them with Speech-IFEval's judge prompt;\n"
        "without one they are left out. Answers are cached: re-running resumes. Audio: --audio\n"
        "FOLDER (the unpacked audios.tar) or --audio kehanlu/Speech-IFEval (downloaded from the\n"
        "Hugging Face hub); default <data>/audios.\n"
        "\n"
        "With --responses: score output files in Speech-IFEval's format (its examples' output folders:\n"
        "closed_ended_questions.jsonl, creative_writing.jsonl, with --judge chain-of-thought.jsonl,\n"
        "a \"response\" added to each item), e.g. its released outputs/, and --reference-responses\n"
        "for delta. No speech model is loaded.",
        ["speechllm speech-ifeval --data Speech-IFEval/data --checkpoint runs/self-output --out runs/sif \\",
         "    --device cuda --batch-size 16",
         "speechllm speech-ifeval --data Speech-IFEval/data --checkpoint runs/self-output --out runs/sif-quick \\",
         "    --audio kehanlu/Speech-IFEval --per-subset 20",
         "speechllm speech-ifeval --data Speech-IFEval/data --out runs/sif-desta2 \\",
         "    --responses Speech-IFEval/outputs/DeSTA-ntu--DeSTA2-8B-beta \\",
         "    --reference-responses Speech-IFEval/outputs/meta-llama--Meta-Llama-3-8B-Instruct"])
    p.add_argument("--data", required=True, metavar="DIR", help="Speech-IFEval's data/ (or eval_data/) folder")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", metavar="DIR", help="a speechllm checkpoint to run the protocol on")
    src.add_argument("--responses", metavar="DIR", help="a folder of Speech-IFEval output files to score")
    p.add_argument("--reference-responses", metavar="DIR", help="with --responses: the reference's output files")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (report.json, report.md, "
                                                                  "predictions.jsonl, generations/)")
    p.add_argument("--audio", metavar="FOLDER|DATASET", help="audio folder or Hugging Face dataset id "
                                                             "(default: <data>/audios)")
    p.add_argument("--subsets", nargs="+", choices=["closed", "creative", "cot"],
                   help="subsets to run (default: closed creative, and cot with --judge)")
    p.add_argument("--judge", metavar="MODEL", help="chat LLM judging chain-of-thought answers (embedded name, hub id "
                                                    "or folder)")
    p.add_argument("--judge-max-new-tokens", type=int, default=256, metavar="N",
                   help="the judge's answer length (default: 256)")
    p.add_argument("--per-subset", type=int, metavar="N", help="at most N items per subset (a seeded sample)")
    p.add_argument("--seed", type=int, default=0, help="seed of --per-subset's sample (default: 0)")
    p.add_argument("--rules", choices=["speech-ifeval", "ifeval"], default="speech-ifeval",
                   help="speech-ifeval: the rules its published numbers used (default); ifeval: Google's unchanged")
    p.add_argument("--max-new-tokens", type=int, default=512, metavar="N", help="answer length (default: 512)")
    p.add_argument("--batch-size", type=int, default=8, metavar="N", help="answers per batch (default: 8)")
    p.add_argument("--asr-model", metavar="NAME", help="ASR for the transcript the speech model reads "
                                                       "(default: the checkpoint's encoder)")
    add_common(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..eval import speech_ifeval as sif
    from ..io.jsonl import write_json_atomic
    from ..io.paths import folder_problem

    data, out = Path(args.data), Path(args.out)
    if not data.is_dir():
        return fail(f"--data {data}: no such folder")
    problem = folder_problem(out)
    if problem:
        return fail(f"--out: {problem}")
    if args.per_subset is not None and args.per_subset < 1:
        return fail("--per-subset must be at least 1")
    subsets = tuple(dict.fromkeys(args.subsets or ["closed", "creative"] + (["cot"] if args.judge else [])))
    if "cot" in subsets and not args.judge:
        return fail("--subsets cot needs --judge MODEL (chain-of-thought answers are judged by an LLM)")
    if args.responses:
        for flag, folder in (("--responses", args.responses), ("--reference-responses", args.reference_responses)):
            if folder is not None and not Path(folder).is_dir():
                return fail(f"{flag} {folder}: no such folder")
        judge = sif.Judge(args.judge, args.device, args.judge_max_new_tokens) if args.judge else None
        report = sif.score_response_files(data, Path(args.responses),
                                          Path(args.reference_responses) if args.reference_responses else None,
                                          subsets, args.rules, judge, out, not args.quiet)
        out.mkdir(parents=True, exist_ok=True)
        sif.write_predictions(out / sif.PREDICTIONS_FILE, report.pop("rows"))
        report = {"data": str(data), "responses": args.responses, "reference_responses": args.reference_responses,
                  **report, "checkers": f"official ({sif.official.library_version()}), strict, rules {args.rules}"}
        write_json_atomic(out / "report.json", report)
        (out / "report.md").write_text(sif.markdown(report))
    else:
        if args.reference_responses:
            return fail("--reference-responses goes with --responses; with --checkpoint the reference is run")
        if not (Path(args.checkpoint) / "config.json").is_file():
            return fail(f"{args.checkpoint}: not a speechllm checkpoint (no config.json)")
        sif.run_speech_ifeval(Path(args.checkpoint), data, out, args.audio, subsets, args.per_subset, args.seed,
                              args.max_new_tokens, args.batch_size, args.device, args.asr_model, not args.quiet,
                              args.rules, args.judge, args.judge_max_new_tokens)
    print((out / "report.md").read_text())
    print(f"speech-ifeval: report -> {out / 'report.md'}, {out / 'report.json'}")
    return 0
