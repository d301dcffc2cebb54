"""Millions of rows: training start-up time and added memory on a 5M-row targets file (DeSTA2.5's
size), and the in-order merge of sharded stage outputs at that size.

1. Writes a targets file of `--rows` records (ids, descriptions, instructions and answers of
   realistic length, each with the metadata's `duration`) pointing at a few real clips.
2. Start-up, each in a fresh process with the same model: `Trainer(cfg)` up to the first
   micro-batch's examples, on a 100-row file (the baseline: model, tokenizer, accelerate) and on
   the big file twice: cold (its row index is built) and warm (the index is read). Start-up
   seconds and added peak RSS are the big file's minus the baseline's. Then 200 more micro-batches
   are drawn (records parsed and bounded as drawn) and timed.
3. Shard and merge: the file is split round-robin into N part files, as N processes of
   `speechllm targets` write them, and `speechllm.targets.run._merge` (what the main process runs)
   merges them back; the merged file must equal the original byte for byte.

    python scripts/bench_rows.py [--rows 5000000] [--config configs/default.yaml] [--shards 8]
                                 [--workdir /tmp/speechllm-rows] [--keep]

Goals (issue 18): start-up <= 60 s and <= 2 GB added memory at 5M rows.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "samples" / "librivox_austen_0890.wav"
CLIP_SECONDS = (1.5, 3.0, 4.5, 6.0)
"""The few clips every row points at (cut from the sample recording)."""
BASELINE_ROWS = 100
DRAWN_BATCHES = 200
WORDS = ("the speaker a woman man voice calm quiet loud fast slow clear recording noise room sounds like "
         "she he says talks about weather morning train station coffee friend music happy tired").split()
INSTRUCTIONS = ("What can you hear?", "Describe the speaker's voice.", "How fast does the speaker talk?",
                "Is the recording clean or noisy?", "What is said, and how?")


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def make_clips(folder: Path) -> list[tuple[str, float]]:
    import soundfile as sf

    from speechllm.io.audio import SAMPLE_RATE, load_audio

    folder.mkdir(parents=True, exist_ok=True)
    wav = load_audio(SAMPLE)
    out = []
    for i, seconds in enumerate(CLIP_SECONDS):
        path = folder / f"clip{i}.wav"
        if not path.exists():
            sf.write(path, wav[: int(seconds * SAMPLE_RATE)], SAMPLE_RATE)
        out.append((f"clips/{path.name}", seconds))
    return out


def make_targets(path: Path, rows: int, clips: list[tuple[str, float]]) -> None:
    """`rows` target records (about 1 KB each), written once and reused while the row count matches."""
    from tqdm import tqdm

    stamp = path.with_suffix(".rows")
    if path.exists() and stamp.exists() and stamp.read_text() == str(rows):
        return
    rng = random.Random(0)
    sentences = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 16))) for _ in range(512)]
    answers = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(40, 90))) + "." for _ in range(512)]
    generator = json.dumps({"model": "smollm2-135m-instruct", "fingerprint": "sha256:" + "0" * 64,
                            "system_prompt": None, "do_sample": False, "max_new_tokens": 256, "speechllm": "0.1.0"})
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for i in tqdm(range(rows), desc="targets file", unit="row", unit_scale=True, file=sys.stderr):
            audio, seconds = clips[i % len(clips)]
            said = sentences[i % 509]
            desc = (f'[00:00-00:0{int(seconds) + 1}] "{said}" (Gender: {"Female" if i % 2 else "Male"}, '
                    f'Pitch: Normal, Speaking speed: Fast, Volume: Normal, Noise: Clean)')
            f.write(f'{{"id": "clip-{i:08d}", "audio": "{audio}", "duration": {seconds}, '
                    f'"transcript": "{said}", "description": {json.dumps(desc)}, '
                    f'"instruction": "{INSTRUCTIONS[i % len(INSTRUCTIONS)]}", "target": "{answers[i % 511]}", '
                    f'"strategy": "self-output", "generator": {generator}, "target_tokens": 80, '
                    f'"truncated": false}}\n')
    tmp.replace(path)
    stamp.write_text(str(rows))


# ----------------------------------------------------------------------------- children

def child_startup(args: argparse.Namespace) -> dict:
    """In a fresh process: Trainer construction up to the first micro-batch's examples."""
    from speechllm.config import load_config

    t0 = time.perf_counter()
    from speechllm.training.trainer import Trainer

    cfg = load_config(args.config, [f"train.data={args.data}", f"train.out_dir={args.workdir / 'run'}",
                                    f"train.cache_dir={args.workdir / 'cache'}", "train.resume=never",
                                    "train.batch_size=8"])
    t_import = time.perf_counter() - t0
    t0 = time.perf_counter()
    trainer = Trainer(cfg, progress=False)
    examples = trainer.examples(trainer.stream[0])
    startup = time.perf_counter() - t0
    rss_ready = current_rss_mb()
    t0 = time.perf_counter()
    drawn = sum(len(trainer.stream[k]) for k in range(1, DRAWN_BATCHES + 1))
    per_batch_ms = 1000 * (time.perf_counter() - t0) / DRAWN_BATCHES
    return {"rows": len(trainer.train_records) + len(trainer.eval_records), "import_s": round(t_import, 2),
            "startup_s": round(startup, 2), "first_batch": len(examples), "peak_rss_mb": round(rss_mb()),
            "rss_ready_mb": round(rss_ready), "draw_ms_per_batch": round(per_batch_ms, 2),
            "records_drawn": drawn, "index_saved": trainer.train_records.table.index.saved,
            "index_build_s": trainer.train_records.table.index.header.get("build_seconds"),
            "load": round(os.getloadavg()[0], 1)}


def child_merge(args: argparse.Namespace) -> dict:
    """In a fresh process: the targets stage's merge of N part files into the output."""
    from speechllm.targets.run import _merge

    t0 = time.perf_counter()
    order = [f"clip-{i:08d}" for i in range(args.rows)]  # the input order, as the stage holds it
    base = rss_mb()
    _merge(Path(args.data), args.shards, order)
    return {"merge_s": round(time.perf_counter() - t0, 2), "peak_rss_mb": round(rss_mb()),
            "order_rss_mb": round(base), "load": round(os.getloadavg()[0], 1)}


def run_child(kind: str, data: Path, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--data", str(data), "--config", str(args.config),
           "--workdir", str(args.workdir), "--rows", str(args.rows), "--shards", str(args.shards)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"child {kind} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def split_round_robin(path: Path, out: Path, shards: int) -> None:
    """The part files N processes of `speechllm targets` leave: process r wrote rows r, r+N, ..."""
    from speechllm.targets.run import part_path

    files = [open(part_path(out, r, shards), "wb", buffering=1 << 20) for r in range(shards)]
    with open(path, "rb") as f:
        for i, line in enumerate(f):
            files[i % shards].write(line)
    for fh in files:
        fh.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=5_000_000)
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "default.yaml")
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/speechllm-rows"))
    ap.add_argument("--keep", action="store_true", help="keep the big files for another run")
    ap.add_argument("--child", choices=["startup", "merge"], help=argparse.SUPPRESS)
    ap.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps((child_startup if args.child == "startup" else child_merge)(args)))
        return

    args.workdir.mkdir(parents=True, exist_ok=True)
    clips = make_clips(args.workdir / "clips")
    big, small = args.workdir / "big.targets.jsonl", args.workdir / "small.targets.jsonl"
    t0 = time.perf_counter()
    make_targets(big, args.rows, clips)
    make_targets(small, BASELINE_ROWS, clips)
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} (others' work included)")
    print(f"targets file: {args.rows} rows, {big.stat().st_size / 1e9:.2f} GB ({time.perf_counter() - t0:.0f} s "
          f"to write or reuse) -> {big}")
    shutil.rmtree(big.with_name(f".{big.name}.rows"), ignore_errors=True)  # cold: no index yet

    run_child("startup", small, args)  # fills the feature cache of the few clips: every run below reads it
    base = run_child("startup", small, args)
    cold = run_child("startup", big, args)
    warm = run_child("startup", big, args)
    print(f"baseline ({BASELINE_ROWS} rows): start-up {base['startup_s']} s, peak RSS {base['peak_rss_mb']} MB")
    for name, r in (("cold (index built)", cold), ("warm (index read)", warm)):
        print(f"{args.rows} rows, {name}: start-up {r['startup_s']} s (+{r['startup_s'] - base['startup_s']:.1f} s "
              f"over the baseline; index build {r['index_build_s']} s), peak RSS {r['peak_rss_mb']} MB "
              f"(+{r['peak_rss_mb'] - base['peak_rss_mb']} MB), RSS when ready {r['rss_ready_mb']} MB "
              f"(+{r['rss_ready_mb'] - base['rss_ready_mb']} MB); {DRAWN_BATCHES} more micro-batches drawn at "
              f"{r['draw_ms_per_batch']} ms each; index saved: {r['index_saved']}; load average {r['load']}")
    worst_s = max(cold["startup_s"], warm["startup_s"]) - base["startup_s"]
    worst_mb = max(cold["peak_rss_mb"], warm["peak_rss_mb"]) - base["peak_rss_mb"]
    print(f"goal start-up <= 60 s: {'met' if worst_s <= 60 else 'MISSED'} ({worst_s:.1f} s); "
          f"goal added memory <= 2 GB: {'met' if worst_mb <= 2048 else 'MISSED'} ({worst_mb} MB)")

    merged = args.workdir / "merged.targets.jsonl"
    merged.unlink(missing_ok=True)
    t0 = time.perf_counter()
    split_round_robin(big, merged, args.shards)
    t_split = time.perf_counter() - t0
    m = run_child("merge", merged, args)
    same = sha256(merged) == sha256(big)
    print(f"shard/merge: {args.rows} rows split over {args.shards} part files ({t_split:.0f} s), merged in input "
          f"order in {m['merge_s']} s, peak RSS {m['peak_rss_mb']} MB (of which the id order list "
          f"{m['order_rss_mb']} MB); merged file identical to the original: {same}; load average {m['load']}")
    merged.unlink(missing_ok=True)
    if not args.keep:
        for p in (big, big.with_suffix(".rows")):
            p.unlink(missing_ok=True)
        shutil.rmtree(big.with_name(f".{big.name}.rows"), ignore_errors=True)
    if not same:
        sys.exit("the merged file differs from the original")


if __name__ == "__main__":
    main()
