"""`speechllm synth`: a labelled synthetic speech corpus from offline TTS."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import fail, new_parser


def add_parser(sub) -> None:
    p = new_parser(
        sub, "synth", "a labelled synthetic speech corpus from offline TTS (espeak-ng, flite)",
        "Synthesize N clips with known gender, pitch, speaking rate, loudness and noise, with\n"
        "ground truth in the manifest labels; train/test splits disjoint by sentence and voice.\n"
        "Writes DIR/train.jsonl, DIR/test.jsonl, DIR/audio/*.wav and DIR/synth.json.",
        ["speechllm synth --out data/synth --n 300 --seed 0",
         "speechllm annotate data/synth/test.jsonl --out data/synth/test.metadata.jsonl --eval"])
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (resumable)")
    p.add_argument("--n", type=int, required=True, help="number of clips (train + test)")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed, same corpus)")
    p.add_argument("--test-fraction", type=float, default=0.2, help="share of clips in the test split")
    p.add_argument("--workers", type=int, default=2, help="parallel processes (default: %(default)s)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..data.synth import SynthError, synthesize
    from ..io.paths import folder_problem

    problem = folder_problem(args.out)
    if problem:
        return fail(f"--out: {problem}")
    if args.workers < 1:
        return fail(f"--workers must be at least 1, got {args.workers}")
    try:
        synthesize(Path(args.out), n=args.n, seed=args.seed, test_fraction=args.test_fraction,
                   workers=args.workers, progress=not args.quiet)
    except SynthError as err:
        return fail(str(err))
    return 0
