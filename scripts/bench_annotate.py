"""Real-time factor of each annotator and of the whole annotation pipeline on this machine.

RTF = processing seconds / audio seconds (lower is faster; 0.15 means 1 h of audio in 9 min).
Per-annotator figures run in this process on all clips at once (one batch); the pipeline figure
is `speechllm annotate` end to end with N workers, start-up (model loading) included and excluded.

The transcript annotator (an embedded Whisper run by CTranslate2 in float32) is also held against
its compute bound (`scripts/bounds.py`: the FLOPs of its encoder and greedy decoder for each clip
and the transcript it produced, at the measured float32 matmul peak), two ways: over Whisper's
30 s window, which every clip is padded to (what the model computes), and over each clip's own
frames (the work by the benchmarks' rule that padding is waste).

    python scripts/bench_annotate.py                       # the 20 test clips of a fresh 40-clip synthetic corpus
    python scripts/bench_annotate.py --manifest data/synth/test.jsonl --workers 2
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from annotate.asr import MAX_DECODE_TOKENS, SpeechRecognizer
from annotate.base import ANNOTATORS, Annotator, Clip, order_annotators
from bounds import WhisperFlops, matmul_peak
from speechllm.config import DEFAULT_ANNOTATORS, AnnotateConfig
from annotate.pipeline import Item, manifest_items, run
from speechllm.io.audio import SAMPLE_RATE, load_audio


def per_annotator(items: list[Item], asr_model: str, threads: int
                  ) -> tuple[list[tuple[str, float, float]], list[dict], dict[str, Annotator]]:
    """(name, load seconds, RTF) per annotator, in dependency order, one process; each clip's
    annotations by annotator name; the annotators by name."""
    import torch

    torch.set_num_threads(threads)
    clips = [Clip(it.id, it.audio, load_audio(it.path), it.labels) for it in items]
    audio_s = sum(c.duration for c in clips)
    prior: list[dict] = [{} for _ in clips]
    rows, annotators = [], {}
    for name in order_annotators(DEFAULT_ANNOTATORS):
        t0 = time.perf_counter()
        kwargs = {"model": asr_model, "threads": threads} if name == "transcript" else {}
        ann = annotators[name] = ANNOTATORS[name](**kwargs)
        t1 = time.perf_counter()
        outs = []
        for i in range(0, len(clips), 8):
            outs += ann.annotate(clips[i: i + 8], prior[i: i + 8])
        t2 = time.perf_counter()
        for p, o in zip(prior, outs):
            p[name] = o
        rows.append((name, t1 - t0, (t2 - t1) / audio_s))
    return rows, prior, annotators


def asr_bounds(items: list[Item], transcripts: list[str], asr: SpeechRecognizer) -> tuple[float, float] | None:
    """Seconds the transcripts' FLOPs take at this machine's float32 matmul peak: (over Whisper's
    30 s windows, over the clips' own frames); None for an ASR model CTranslate2 does not run."""
    from transformers import AutoTokenizer, WhisperConfig

    from speechllm.hub import weights

    if asr.prompt_ids is None:
        return None
    folder = weights.resolve(asr.model_name)
    config, tokenizer = WhisperConfig.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    flops = WhisperFlops.of(config)
    prompt = len(asr.prompt_ids)
    padded = own = 0.0
    for it, text in zip(items, transcripts):
        seconds = len(load_audio(it.path)) / SAMPLE_RATE
        produced = len(tokenizer.encode(" " + text, add_special_tokens=False)) if text else 0
        new = min(produced + 1, MAX_DECODE_TOKENS)  # the end token
        padded += flops.transcription(seconds, prompt, new, padded=True)
        own += flops.transcription(seconds, prompt, new, padded=False)
    peak = matmul_peak()
    return padded / peak, own / peak


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--manifest", type=Path, help="labelled manifest (default: synthesize --n clips)")
    p.add_argument("--n", type=int, default=40, help="clips to synthesize when no manifest is given")
    p.add_argument("--workers", type=int, default=2, help="pipeline workers")
    p.add_argument("--asr-model", default="whisper-tiny.en")
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        manifest = args.manifest
        if manifest is None:
            from speechllm.data.synth import synthesize

            synthesize(tmp / "synth", n=args.n, seed=0, test_fraction=0.5, workers=args.workers, progress=False)
            manifest = tmp / "synth" / "test.jsonl"
        items = [it for it in manifest_items(manifest, tmp) if isinstance(it, Item)]
        audio_s = sum(len(load_audio(it.path)) for it in items) / 16000
        cores = os.cpu_count()
        print(f"{len(items)} clips, {audio_s:.0f} s of audio, {cores} cores")

        print(f"\n{'annotator':12} {'load s':>7} {'RTF (1 process, ' + str(cores) + ' threads)':>28}")
        total = 0.0
        rows, annotations, annotators = per_annotator(items, args.asr_model, threads=cores)
        for name, load_s, rtf in rows:
            total += rtf
            print(f"{name:12} {load_s:>7.2f} {rtf:>28.4f}")
        print(f"{'sum':12} {'':>7} {total:>28.4f}")
        asr_rtf = {name: rtf for name, _, rtf in rows}.get("transcript")
        bounds = (asr_bounds(items, [a["transcript"].value for a in annotations], annotators["transcript"].asr)
                  if asr_rtf else None)
        if bounds is not None:
            window, own = (b / audio_s for b in bounds)
            print(f"\ntranscript ({args.asr_model}) compute bound at the fp32 matmul peak: RTF {window:.4f} over "
                  f"Whisper's 30 s windows ({window / asr_rtf:.0%} of it reached), RTF {own:.4f} over the clips' own "
                  f"frames ({own / asr_rtf:.0%}); the window's padding is {1 - own / window:.0%} of the FLOPs")

        out = tmp / "meta.jsonl"
        summary = run(iter(items), out, AnnotateConfig(workers=args.workers, asr_model=args.asr_model), progress=False)
        print(f"\npipeline, {args.workers} workers: {summary.wall_seconds:.1f} s for {summary.audio_seconds:.0f} s "
              f"of audio -> RTF {summary.wall_seconds / summary.audio_seconds:.4f} (model loading included)")
        again = tmp / "meta2.jsonl"
        items2 = [Item(it.id + "#2", it.audio, it.path, it.labels) for it in items]
        t0 = time.perf_counter()
        run(iter(items2 + [Item(it.id + "#3", it.audio, it.path, it.labels) for it in items]), again,
            AnnotateConfig(workers=args.workers, asr_model=args.asr_model), progress=False)
        wall = time.perf_counter() - t0
        # two passes over the same audio in one run: the second half of the work amortises start-up
        rtf = wall / (2 * audio_s)
        print(f"pipeline, {args.workers} workers, 2x the audio in one run: RTF {rtf:.4f}")
        if bounds is not None:
            print(f"annotation: {bounds[1] / audio_s / rtf:.0%} of the bound (the ASR's FLOPs over the clips' own "
                  f"frames; {bounds[0] / audio_s / rtf:.0%} counting Whisper's 30 s windows as work)")


if __name__ == "__main__":
    main()
