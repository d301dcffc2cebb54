"""How much does the thread count move an evaluation? The same checkpoints, data and settings are
evaluated once per torch thread count (each in its own folder, nothing shared), then every
system's answers are compared key by key and the headline numbers printed side by side.

Greedy decoding is deterministic for one machine, thread count and library build; with another
thread count the matmuls sum in another order, float ties between the top two tokens fall the
other way, and one changed token changes the rest of the answer.

    python scripts/measure_threads.py --checkpoint runs/demo/runs/self-output runs/demo/runs/label \\
        --data runs/demo/data/test.metadata.jsonl --out /tmp/threads --threads 1,2

Prints, per system, how many answers differ between thread counts, and per thread count each
checkpoint's forgetting delta, IFrate and audio-task accuracies.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from speechllm.config import EvalConfig
from speechllm.demo import DEMO_CONSTRAINTS
from speechllm.eval.suite import run_eval
from speechllm.io.jsonl import read_jsonl


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", nargs="+", required=True, type=Path, help="trained speech model folders")
    p.add_argument("--data", required=True, type=Path, help="held-out metadata.jsonl")
    p.add_argument("--out", required=True, type=Path, help="folder for one evaluation per thread count")
    p.add_argument("--threads", default="1,2", help="comma-separated torch thread counts (default 1,2)")
    p.add_argument("--per-task", type=int, default=24, help="audio-task items per task (default 24, the demo's)")
    p.add_argument("--forgetting-items", type=int, default=144, help="forgetting items (default 144, the demo's)")
    args = p.parse_args()
    counts = [int(n) for n in args.threads.split(",")]
    cfg = EvalConfig(data_format="metadata", max_per_task=args.per_task, forgetting_items=args.forgetting_items,
                     constraints=list(DEMO_CONSTRAINTS), text_prompts=0, max_new_tokens=48, if_max_new_tokens=128,
                     batch_size=16, safety_items=0)
    reports = {}
    for n in counts:
        torch.set_num_threads(n)
        print(f"[threads] evaluating with {n} thread(s)", file=sys.stderr, flush=True)
        reports[n] = run_eval(args.checkpoint, args.data, args.out / f"threads-{n}", cfg, progress=False)
    answers = {n: _answers(args.out / f"threads-{n}") for n in counts}
    first = counts[0]
    print("answers that differ from the first thread count's (same keys):")
    for system in answers[first]:
        for n in counts[1:]:
            a, b = answers[first][system], answers[n].get(system, {})
            keys = sorted(set(a) & set(b))
            diff = sum(a[k] != b[k] for k in keys)
            print(f"  {system}: {first} vs {n} threads: {diff}/{len(keys)} differ")
    print("per thread count:")
    for n in counts:
        for name, ck in reports[n]["checkpoints"].items():
            f = ck["forgetting"]
            tasks = ", ".join(f"{t} {100 * v['accuracy']:.1f}" for t, v in ck["tasks"].items()
                              if v.get("accuracy") is not None)
            print(f"  {n} thread(s) {name}: IFrate {100 * f['ifrate']:.1f}, reference {100 * f['ifrate_ref']:.1f}, "
                  f"delta {f['delta']:+.3f} [{f['ci_low']:+.3f}, {f['ci_high']:+.3f}]; {tasks}")


def _answers(folder: Path) -> dict[str, dict[str, str]]:
    """system -> key -> answer, from an evaluation folder's answer caches."""
    out = {}
    for path in sorted((folder / "generations").glob("*.jsonl")):
        if "." in path.stem:  # NAME.scored.jsonl: scores, not answers
            continue
        out[path.stem] = {r["key"]: r["answer"] for r in read_jsonl(path, required=("key", "answer"))}
    return out


if __name__ == "__main__":
    main()
