"""How much of a batch is padding, for training batches and evaluation generation batches, under
the batching schemes one could use; counts tokens only (no model is run), so it takes seconds.

Training (a targets.jsonl): the LLM positions of each example (shared prefix, audio embeddings,
transcript, instruction, target) in batches of `--batch-size`:
- random: batches in a random order;
- seconds: `epoch_batches` sorting by clip seconds inside windows (speechllm before this script);
- estimated: the same windows sorted by `TargetRows.positions` (text characters / 4 + the clip's
  audio positions: what training sorts by now, known from the row index without tokenizing);
- exact: the same windows sorted by the example's tokenized LLM positions;
- packed: examples packed first-fit-decreasing into rows as long as the longest example, and
  as long as `--batch-size` longest examples (attention is block-diagonal; SDPA on a CPU computes
  the whole masked rectangle, so its attention work grows with the row's length).
Evaluation (tasks.jsonl and forgetting.jsonl of a `speechllm eval` run): the prompt positions of
speech-model items in batches of `--eval-batch-size`, sorted by clip length (as before) and by
prompt positions.

Printed per scheme: real positions / computed positions (the rest is padding) and, for training,
the attention work relative to the unpadded sequences' own.

    python scripts/measure_padding.py --targets runs/demo/data/train.self-output.targets.jsonl \\
        --eval-dir runs/demo [--batch-size 8] [--eval-batch-size 16]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from speechllm.config import load_config
from speechllm.io.audio import audio_seconds
from speechllm.model import build_model
from speechllm.training.data import batch_at, epoch_batches, load_targets

SEED = 0


def positions(model, instruction: str, transcript: str | None, seconds: float, target: str | None) -> int:
    """LLM positions of one example (the answer's tokens when `target` is given)."""
    n = model.prompt_length(instruction, transcript, has_audio=True, seconds=seconds)
    return n + (len(model.prompt.target(target)) if target is not None else 0)


def padded_share(batches: list[np.ndarray], lengths: np.ndarray) -> tuple[float, float]:
    """(real / computed positions, attention work / the unpadded sequences' own) when each
    batch is padded to its longest."""
    real = sum(int(lengths[b].sum()) for b in batches)
    computed = sum(len(b) * int(lengths[b].max()) for b in batches)
    attention = sum(len(b) * int(lengths[b].max()) ** 2 for b in batches)
    return real / computed, attention / float((lengths ** 2).sum())


def packed(lengths: np.ndarray, capacity: int) -> tuple[float, float]:
    """(real / computed positions, attention work / own) of first-fit-decreasing packing into
    rows of `capacity` positions."""
    fill: list[int] = []
    for n in sorted(lengths.tolist(), reverse=True):
        for i, used in enumerate(fill):
            if used + n <= capacity:
                fill[i] += n
                break
        else:
            fill.append(n)
    computed = len(fill) * capacity
    return float(lengths.sum()) / computed, len(fill) * capacity ** 2 / float((lengths ** 2).sum())


def training(model, path: str, batch_size: int) -> None:
    rows, _ = load_targets(path, skip_truncated=False, progress=False)
    recs = rows.records(range(len(rows)))
    lengths = np.array([positions(model, r.instruction, r.transcript, r.seconds, r.target) for r in recs])
    n = len(recs)
    schemes = {}
    for name, key in (("seconds", rows.seconds), ("estimated", rows.positions(model.clip_positions)),
                      ("exact", lengths.astype(float))):
        order, starts = epoch_batches(key, batch_size, seed=SEED, epoch=0)
        schemes[name] = [batch_at(order, starts, b, batch_size) for b in range(len(starts))]
    perm = np.random.default_rng(SEED).permutation(n)
    schemes["random"] = [perm[i: i + batch_size] for i in range(0, n, batch_size)]
    print(f"training: {n} examples of {lengths.min()}-{lengths.max()} positions (mean {lengths.mean():.1f}), "
          f"batch {batch_size}")
    for name, batches in schemes.items():
        real, attention = padded_share(batches, lengths)
        print(f"  {name:9s}: {real:.1%} of computed positions are real; attention work x{attention:.2f}")
    for rows_of in (1, batch_size):
        real, attention = packed(lengths, rows_of * int(lengths.max()))
        print(f"  packed into rows of {rows_of} x the longest: {real:.1%} of computed positions are real; "
              f"attention work x{attention:.2f}")


def evaluation(model, folder: Path, batch_size: int) -> None:
    def read(name: str) -> list[dict]:
        path = folder / name
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []

    tasks = {it["id"]: it for it in read("tasks.jsonl")}
    items = [it for it in tasks.values() if it.get("audio")]
    items += [{**tasks[f["base"]], "instruction": f["instruction"]} for f in read("forgetting.jsonl")
              if tasks.get(f["base"], {}).get("audio")]  # a forgetting item asks about its base item's clip
    seconds = np.array([audio_seconds(folder / it["audio"]) for it in items])
    lengths = np.array([positions(model, it["instruction"], it.get("transcript"), s, None)
                        for it, s in zip(items, seconds)])
    print(f"evaluation: {len(items)} speech items of {lengths.min()}-{lengths.max()} prompt positions, "
          f"batch {batch_size}")
    for name, key in (("clip length", seconds), ("prompt positions", lengths)):
        order = np.argsort(key, kind="stable")
        batches = [order[i: i + batch_size] for i in range(0, len(order), batch_size)]
        real, _ = padded_share(batches, lengths)
        print(f"  sorted by {name}: {real:.1%} of prefill positions are real")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="model config (default: the embedded default)")
    p.add_argument("--targets", required=True, help="a targets.jsonl")
    p.add_argument("--eval-dir", type=Path, help="a `speechllm eval` output folder (tasks.jsonl, forgetting.jsonl)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--eval-batch-size", type=int, default=16)
    args = p.parse_args()
    model = build_model(load_config(args.config))
    training(model, args.targets, args.batch_size)
    if args.eval_dir is not None:
        evaluation(model, args.eval_dir, args.eval_batch_size)


if __name__ == "__main__":
    main()
