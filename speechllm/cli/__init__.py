"""The `speechllm` command line: one module per command, each with `add_parser(sub)` and `run(args)`.

    speechllm models list|prepare       the embedded pretrained weights
    speechllm synth      --out DIR --n N              labelled synthetic corpus (espeak-ng, flite)
    speechllm annotate   manifest.jsonl --out metadata.jsonl
    speechllm targets    metadata.jsonl --out targets.jsonl
    speechllm replay     --out replay.jsonl --n N [--instructions FILE]   text replay data (Magpie)
    speechllm plan       --config C [--gpus N --gpu-memory GB --batch-size B]
    speechllm train      train.data=targets.jsonl train.out_dir=runs/NAME
    speechllm eval       --checkpoint runs/NAME --data test.metadata.jsonl --out runs/eval
    speechllm ifeval     --responses responses.jsonl --out runs/ifeval   (IFEval, official checkers)
    speechllm speech-ifeval --data Speech-IFEval/data --checkpoint runs/NAME --out runs/sif
    speechllm demo       --out runs/demo
    speechllm chat       --checkpoint runs/NAME --audio clip.wav "What can you hear?"
    speechllm serve      --checkpoint runs/NAME

Building the parser imports no torch: `speechllm --help` answers at once; a command imports what
it needs when it runs.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = ("models", "synth", "annotate", "targets", "replay", "plan", "train", "eval", "ifeval", "speech-ifeval",
            "demo", "chat", "serve")
"""Command names, in the order data flows; each is the module `speechllm.cli.<name>` ('-' as '_')."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="speechllm",
        description="Teach a text LLM to hear without making it forget (DeSTA2 self-output recipe).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Models named in configs are embedded names (see `speechllm models list`), Hugging Face hub ids,\n"
               "or local folders. Weights are cached under $SPEECHLLM_HOME (default ~/.cache/speechllm).\n"
               "`speechllm COMMAND --help` explains each command, with examples.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"{__name__}.{name.replace('-', '_')}").add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    from ..errors import SpeechLLMError
    from .common import fail

    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may also come after options (`--out X model.llm.dtype=bfloat16`)
    unknown = [e for e in extra if "=" not in e or e.startswith("-")]
    if unknown or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(unknown or extra)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    try:
        return args.func(args)
    except SpeechLLMError as err:  # bad input or settings: the message names the file or key
        return fail(str(err))


if __name__ == "__main__":
    sys.exit(main())
