"""`speechllm annotate`: audio -> metadata.jsonl (measurements, word bins, a description per clip)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .common import add_config_args, add_section_flags, config_from_args, fail, new_parser, output_file_problem


def add_parser(sub) -> None:
    p = new_parser(
        sub, "annotate", "audio -> metadata.jsonl: measurements, word bins and a description per clip",
        "Annotate clips with transcript, pitch, gender, loudness, speaking rate and noise, and write\n"
        "one JSON line per clip with a DeSTA-style description, e.g.\n"
        '  [00:00-00:05] "the transcript" (Gender: Female, Pitch: High, Speaking speed: Fast, ...)\n'
        "Clips that cannot be used go to <out>.errors.jsonl with the reason; the run goes on.\n"
        "Re-running skips ids already written (resume after a crash or Ctrl-C). Several processes\n"
        "(`torchrun --nproc_per_node N -m speechllm.cli annotate ...`, or accelerate launch over nodes)\n"
        "each annotate every N-th clip and the main one merges the parts in input order. Options\n"
        "below override the config's `annotate:` section.",
        ["speechllm annotate data/synth/train.jsonl --out data/train.metadata.jsonl",
         "speechllm annotate data/synth/test.jsonl --out data/test.metadata.jsonl --eval",
         "speechllm annotate recordings/ --out recordings.metadata.jsonl --workers 4",
         "speechllm annotate --hf-dataset ./my_saved_dataset --split test --out hf.metadata.jsonl",
         "speechllm annotate clips.jsonl --out meta.jsonl --classifier emotion=superb/wav2vec2-base-superb-er "
         "--device cuda"])
    p.add_argument("input", nargs="?", help="manifest .jsonl ({id, audio, labels?}, paths relative to it) or a "
                                            "folder of wav/flac/ogg/mp3 files")
    p.add_argument("--out", required=True, metavar="FILE", help="metadata .jsonl to write (appended, resumable)")
    p.add_argument("--hf-dataset", metavar="NAME_OR_DIR", help="a Hugging Face dataset (name or save_to_disk "
                                                              "folder) with an Audio column")
    p.add_argument("--split", help="dataset split (--hf-dataset)")
    p.add_argument("--audio-column", default="audio", help="audio column (--hf-dataset; default: audio)")
    p.add_argument("--id-column", default="id", help="id column (--hf-dataset; default: id, else the row index)")
    p.add_argument("--text-column", default="text", help="reference transcript column (--hf-dataset)")
    add_section_flags(p, "annotate", metavars={"annotators": "NAME", "asr_model": "NAME", "classifiers": "KEY=MODEL"},
                      repeated={"classifiers": "classifier"})
    p.add_argument("--eval", action="store_true",
                   help="score the annotations against the manifest labels (WER, accuracies, confusion tables)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_config_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from annotate import evaluate as ev
    from annotate import pipeline as pl

    from ..distributed import accelerate_kwargs, launched_processes
    from ..io.jsonl import sibling_path

    cfg = config_from_args(args).annotate
    src = Path(args.input) if args.input else None
    if (src is None) == (args.hf_dataset is None):
        return fail("give exactly one input: a manifest .jsonl, a folder of audio files, or --hf-dataset")
    out = Path(args.out)
    problem = output_file_problem(out, src)
    if problem:
        return fail(problem)
    out.parent.mkdir(parents=True, exist_ok=True)
    rank, world, barrier = 0, 1, None
    if launched_processes() > 1:  # torchrun / accelerate launch: each process annotates its share
        from accelerate import PartialState

        state = PartialState(**accelerate_kwargs())
        rank, world, barrier = state.process_index, state.num_processes, state.wait_for_everyone
    if args.hf_dataset:
        items = pl.hf_items(args.hf_dataset, out.parent, out.with_name(out.stem + ".audio"), args.audio_column,
                            args.id_column, args.text_column, args.split, rank, world)
    elif src.is_dir():
        items = pl.folder_items(src, out.parent)
    elif src.is_file():
        items = pl.manifest_items(src, out.parent)
    else:
        return fail(f"{src}: no such manifest or folder")
    summary = pl.run(items, out, cfg, progress=not args.quiet, rank=rank, world=world, barrier=barrier)
    print(summary.line(out) + (f" (process {rank} of {world}; merged in input order)" if world > 1 else ""))
    if args.eval and rank == 0:
        report = ev.evaluate(pl.load_metadata(out))
        path = sibling_path(out, ".eval.json")
        path.write_text(json.dumps(report, indent=2) + "\n")
        print(ev.format_report(report))
        print(f"annotate --eval: scores -> {path}")
    return 0
