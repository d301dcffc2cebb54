"""Greedy decoding that drops finished answers from the batch against transformers' `generate`,
which keeps them as padding: the demo's whole evaluation of the same checkpoints run twice, back
to back, every answer generated afresh (each run in its own output folder), with the evaluation's
`drop_finished` on (the default) and off. Prints both times, how many answers are identical,
whether the forgetting deltas agree, and last `drop finished speedup N`.

    python scripts/bench_decode.py --checkpoint runs/demo/runs/self-output --checkpoint runs/demo/runs/label \\
        --data runs/demo/data/test.metadata.jsonl [--plan full|quick] [--out DIR]

The gain depends on how unequal a batch's answer lengths are: the demo's evaluation mixes one-word
answers with ones that run to the token limit.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

from speechllm.demo import FULL, QUICK, _eval_config
from speechllm.eval.suite import run_eval

PLANS = {"full": FULL, "quick": QUICK}


def answers(folder: Path) -> dict[str, str]:
    """{system/key: answer} of every generations file an evaluation wrote."""
    out = {}
    for path in sorted((folder / "generations").glob("*.jsonl")):
        for line in path.read_text().splitlines():
            row = json.loads(line)
            out[f"{path.stem}/{row['key']}"] = row["answer"]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", action="append", required=True, type=Path, help="a trained run (repeatable)")
    p.add_argument("--data", required=True, type=Path, help="metadata JSONL of the evaluation clips")
    p.add_argument("--plan", choices=tuple(PLANS), default="full", help="the demo plan whose evaluation sizes to use")
    p.add_argument("--out", type=Path, help="folder for the two evaluations (default: a temporary one)")
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    for ckpt in args.checkpoint:
        if not (ckpt / "config.json").is_file():
            p.error(f"--checkpoint {ckpt}: not a speechllm checkpoint (no config.json)")
    if not args.data.is_file():
        p.error(f"--data {args.data}: no such file")
    cfg = _eval_config(PLANS[args.plan])
    with tempfile.TemporaryDirectory() as tmp:
        root = args.out or Path(tmp)
        seconds, reports = {}, {}
        for name, drop in (("dropped", True), ("kept", False)):
            t0 = time.perf_counter()
            reports[name] = run_eval(args.checkpoint, args.data, root / name, dataclasses.replace(cfg, drop_finished=drop),
                                     device=args.device, progress=False)
            seconds[name] = time.perf_counter() - t0
            print(f"finished answers {name}: {seconds[name]:.1f} s", flush=True)
        a, b = answers(root / "dropped"), answers(root / "kept")
        print(f"identical answers {sum(a[k] == b.get(k) for k in a)}/{len(a)}")
        for ck in reports["dropped"]["checkpoints"]:
            d, k = (reports[n]["checkpoints"][ck]["forgetting"]["delta"] for n in ("dropped", "kept"))
            print(f"{ck}: forgetting delta {d:+.3f} dropped, {k:+.3f} kept")
    print(f"drop finished speedup {seconds['kept'] / seconds['dropped']:.2f}")


if __name__ == "__main__":
    main()
