"""`speechllm demo`: the whole loop on the embedded default, ending in the forgetting report."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import add_common, fail, new_parser


def add_parser(sub) -> None:
    p = new_parser(
        sub, "demo", "the whole loop on the embedded default, ending in the forgetting report",
        "Synthesize a labelled corpus, annotate it, make targets three ways (self-output: the frozen\n"
        "LLM's own answers from the description; label: templated statements of the labels;\n"
        "minimum-change: self-output with the words the labels show wrong fixed) and pseudo-replay\n"
        "data, then two experiments: 1) an adapter per strategy on the frozen LLM (self-output,\n"
        "label), 2) adapter + LoRA (label, label with replay, minimum-change, self-output). Each is\n"
        "evaluated against the text reference: audio-task accuracy, forgetting rate (with its curve\n"
        "over training), text-only retention and safety, with 95% intervals. Offline on a 2-core CPU:\n"
        "31 min where bf16 runs in hardware (AVX512-BF16 or AMX), 49-62 min on an AVX2-only CPU, where\n"
        "it runs in fp32 (--quick: 6 min in bf16). Every stage resumes: rerunning the same command skips\n"
        "finished work. --hearing adds experiment 3, the speech model learning to hear: targets\n"
        "from instructions most of which ask the gender (minimum-change: the teacher's answers with\n"
        "wrong attribute words fixed), one adapter trained 400 steps, gender on held-out and real\n"
        "clips (15 more minutes; after a finished demo only experiment 3 runs).",
        ["speechllm demo --out runs/demo", "speechllm demo --out runs/demo-quick --quick",
         "speechllm demo --out runs/demo --hearing"])
    p.add_argument("--out", default="runs/demo", metavar="DIR", help="output folder (default runs/demo)")
    p.add_argument("--quick", action="store_true",
                   help="a smaller corpus and fewer steps (6 min in bf16 on a 2-core CPU)")
    p.add_argument("--hearing", action="store_true",
                   help="also run experiment 3: an adapter trained 4x longer on targets where most "
                        "instructions ask the gender, evaluated on held-out and real clips (15 min more on a "
                        "2-core CPU)")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                   help="the LLM's (and encoder's) dtype in every stage; auto (default): bfloat16 where the device "
                        "multiplies it in hardware (a CPU with AVX512-BF16 or AMX, a GPU with bf16; on a 2-core "
                        "AVX512-BF16 CPU targets ran 1.8x and training 1.2x faster than fp32), else float32. "
                        "Answers differ between the two (each is reproducible on one machine)")
    add_common(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..data.synth import SynthError
    from ..demo import run_demo
    from ..eval.suite import EvalError
    from ..io.paths import folder_problem
    from ..training.trainer import TrainingError

    out = Path(args.out)
    problem = folder_problem(out)
    if problem:
        return fail(f"--out: {problem}")
    try:
        run_demo(out, quick=args.quick, device=args.device, progress=not args.quiet, dtype=args.dtype,
                 hearing=args.hearing)
    except (SynthError, EvalError, TrainingError) as err:
        return fail(str(err))
    print((out / "report.md").read_text())
    print(f"demo: report -> {out / 'report.md'} (plots in {out / 'plots'}); try: speechllm chat --checkpoint "
          f"{out / 'runs' / 'self-output'} --audio samples/librivox_austen_0920.wav \"What can you hear?\"")
    return 0
