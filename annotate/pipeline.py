"""The annotation stage: inputs -> annotators -> metadata.jsonl (+ metadata.errors.jsonl).

Inputs: a manifest JSONL (`{"id", "audio", "labels"?}`, audio paths relative to the manifest's
folder and never outside it), a folder of audio files, or a Hugging Face `datasets` dataset with
an Audio column. Clips are annotated in batches by parallel workers; each finished clip is
appended to the output at once, so a killed run loses at most the batches in flight and a rerun
skips every id already written (to the output or the errors file).
"""

from __future__ import annotations

import io
import multiprocessing as mp
import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from speechllm.io.audio import SAMPLE_RATE, AudioError, load_audio, prepare_waveform
from speechllm.config import AnnotateConfig
from speechllm.labels import MEASURED, TRANSCRIPT
from speechllm.records import MetadataRecord
from speechllm.io.jsonl import ResumableJsonl, iter_lines, read_jsonl, shard_path, sibling_path, write_jsonl_atomic
from speechllm.io.rows import merge_in_order

from . import asr, noise, pitch, rate, signal, vad  # noqa: F401  (register the built-in annotators)
from .base import ANNOTATORS, Annotation, Clip, ClipError, order_annotators
from .classifier import Classifier, check_classifier, classifier_options
from .description import LABEL_ONLY_FIELDS, describe

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3")
LABEL_KEYS = (TRANSCRIPT, *MEASURED)
"""Manifest label keys that name an annotator's output (overridable with --trust-labels)."""
REPLACED_WHOLE = (TRANSCRIPT,)
"""Annotators whose result a trusted label replaces whole (nothing of theirs is kept, unlike a
measured attribute's value and guess), so they do not run on a clip that has that label."""


@dataclass
class Item:
    """One clip to annotate: where its audio is and what the manifest says about it."""
    id: str
    audio: str
    """Path as it will be written into the metadata (relative to the output's folder if possible)."""
    path: str
    """Absolute path to read."""
    labels: dict[str, Any]


@dataclass
class Summary:
    total: int = 0
    done_before: int = 0
    annotated: int = 0
    errors: int = 0
    errors_before: int = 0
    audio_seconds: float = 0.0
    wall_seconds: float = 0.0
    error_kinds: dict[str, int] = field(default_factory=dict)

    def line(self, out: Path) -> str:
        rtf = self.wall_seconds / self.audio_seconds if self.audio_seconds else 0.0
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(self.error_kinds.items()))
        return (f"annotate: {self.annotated} clips annotated, {self.errors} errors"
                f"{f' ({kinds})' if kinds else ''}; {self.done_before} done and {self.errors_before} failed "
                f"before; {self.audio_seconds:.0f} s of audio in {self.wall_seconds:.1f} s (RTF {rtf:.3f}) -> {out}")


# ----------------------------------------------------------------------------- inputs

def _error(id_: str, audio: str | None, reason: str, kind: str) -> dict:
    return {"id": id_, "audio": audio, "kind": kind, "error": reason}


def _rel_for_output(path: Path, out_dir: Path) -> str:
    try:
        return os.path.relpath(path, out_dir)
    except ValueError:  # another drive
        return str(path)


def manifest_items(manifest: Path, out_dir: Path) -> Iterator[Item | dict]:
    """Items of a manifest; malformed lines, escaping paths and duplicate ids become error dicts."""
    root = Path(os.path.normpath(manifest.absolute().parent))
    seen: set[str] = set()
    for line in iter_lines(manifest, required=("id", "audio")):
        if line.error:
            yield _error(f"{manifest.name}:line{line.number}", None, line.error, "malformed")
            continue
        rec = line.record
        id_, audio = str(rec["id"]), rec["audio"]
        if id_ in seen:  # keyed by line: the id itself belongs to the first occurrence
            yield _error(f"{manifest.name}:line{line.number}", audio,
                         f"{manifest}:{line.number}: duplicate id '{id_}'", "duplicate")
            continue
        seen.add(id_)
        labels = rec.get("labels") or {}
        if not isinstance(audio, str) or not isinstance(labels, dict):
            yield _error(id_, str(audio), f"{manifest}:{line.number}: 'audio' must be a string and 'labels' an "
                                          "object", "malformed")
            continue
        path = Path(os.path.normpath(root / audio))  # lexical: a symlink placed inside the folder is fine
        if not path.is_relative_to(root):
            yield _error(id_, audio, f"{manifest}:{line.number}: audio path '{audio}' leaves the manifest's folder "
                                     f"{root}", "path")
            continue
        yield Item(id_, _rel_for_output(path, out_dir), str(path), labels)


def folder_items(folder: Path, out_dir: Path) -> Iterator[Item]:
    root = folder.resolve()
    for path in sorted(p for p in root.rglob("*") if p.suffix.lower() in AUDIO_EXTENSIONS and p.is_file()):
        id_ = path.relative_to(root).with_suffix("").as_posix()
        yield Item(id_, _rel_for_output(path, out_dir), str(path), {})


def load_hf_dataset(spec: str, split: str | None = None):
    """The dataset `spec` names (a `save_to_disk` folder or a name `datasets` can load) and the
    split used; a DatasetDict with a single split needs no `split`."""
    import datasets

    local = Path(spec)
    if (local / "dataset_dict.json").is_file() or (local / "state.json").is_file():  # a save_to_disk folder
        ds = datasets.load_from_disk(str(local))
    else:
        ds = datasets.load_dataset(spec, split=split)
    if isinstance(ds, datasets.DatasetDict):
        if split is None:
            if len(ds) != 1:
                raise ValueError(f"{spec}: has splits {', '.join(ds)}; choose one with --split")
            split = next(iter(ds))
        elif split not in ds:
            raise ValueError(f"{spec}: no split '{split}' (splits: {', '.join(ds)})")
        return ds[split], split
    return ds, split


def hf_items(spec: str, out_dir: Path, audio_dir: Path, audio_column: str = "audio", id_column: str = "id",
             text_column: str = "text", split: str | None = None, rank: int = 0,
             world: int = 1) -> Iterator[Item | dict]:
    """Items of a Hugging Face dataset (a `save_to_disk` folder or a name `datasets` can load).
    Audio bytes are decoded by soundfile (not by `datasets`, whose decoder needs torchcodec) and
    written once as FLAC under `audio_dir`, so later stages read plain files. With `world` > 1,
    only rows i with i % world == rank are decoded (the others come as bare ids, for the order)."""
    import datasets
    import numpy as np
    import soundfile as sf

    ds, _ = load_hf_dataset(spec, split)
    if audio_column not in ds.column_names:
        raise ValueError(f"{spec}: no audio column '{audio_column}' (columns: {', '.join(ds.column_names)})")
    ds = ds.cast_column(audio_column, datasets.Audio(decode=False))
    audio_dir.mkdir(parents=True, exist_ok=True)
    for i, row in enumerate(ds):
        id_ = str(row[id_column]) if id_column in row else f"{i:08d}"
        labels = {k: v for k, v in row.items() if k not in (audio_column, id_column)
                  and isinstance(v, (str, int, float, bool))}
        if text_column in labels:
            labels["transcript"] = labels.pop(text_column)
        if i % world != rank:  # another process's row: its id only
            yield Item(id_, "", "", {})
            continue
        target = audio_dir / f"{id_.replace('/', '_')}.flac"
        if not target.exists():
            a = row[audio_column] or {}
            try:
                raw = a.get("bytes") or Path(a["path"]).read_bytes()
                data, sr = sf.read(io.BytesIO(raw), dtype="float32", always_2d=True)
                wav = prepare_waveform(data, sr, f"{spec}[{i}]")
            except (OSError, KeyError, TypeError, AudioError, sf.LibsndfileError) as err:
                yield _error(id_, None, f"{spec}[{i}]: cannot decode audio ({err})", "audio")
                continue
            tmp = target.with_suffix(".tmp.flac")
            sf.write(tmp, np.clip(wav, -1, 1), SAMPLE_RATE, format="FLAC")
            os.replace(tmp, target)
        yield Item(id_, _rel_for_output(target, out_dir), str(target), labels)


# ----------------------------------------------------------------------------- workers

_WORKER: dict[str, Any] = {}


def _init_worker(names: list[str], options: dict[str, dict], threads: int,
                 classifiers: dict[str, dict] | None = None) -> None:
    """Build this process's annotators: the `classifiers` (KEY -> `Classifier` arguments) first,
    then the registered `names` (in dependency order)."""
    import torch

    torch.set_num_threads(threads)
    _WORKER["annotators"] = [*(Classifier(key, **kw) for key, kw in (classifiers or {}).items()),
                             *(ANNOTATORS[n](**options.get(n, {})) for n in names)]


def _override(name: str, ann: Annotation | None, labels: dict) -> Annotation:
    """The label of `name` in place of `ann` (a transcript whole; a measured attribute keeps the
    annotator's value and guess beside the label's bin)."""
    value = labels[name]
    if name in REPLACED_WHOLE:
        return Annotation(value=str(value), extra={"source": "label"})
    return Annotation(value=ann.value, bin=str(value).lower(), confidence=1.0,
                      extra={**ann.extra, "source": "label", "annotator_bin": ann.bin})


def _trusted_label(ann, clip: Clip, trust_labels: bool) -> bool:
    """Whether `clip`'s manifest label of `ann`'s key replaces `ann`'s guess (`--trust-labels`)."""
    trusted = ann.name in LABEL_KEYS or isinstance(ann, Classifier)
    return trust_labels and trusted and clip.labels.get(ann.name) not in (None, "")


def _run_annotator(ann, clips: list[Clip], prior: list[dict[str, Annotation]], trust_labels: bool
                   ) -> list[Annotation]:
    """`ann`'s results for `clips`, run only on those whose result a trusted label does not replace
    whole (the others get the label's, as `_override` makes it)."""
    todo = [i for i, clip in enumerate(clips)
            if not (ann.name in REPLACED_WHOLE and _trusted_label(ann, clip, trust_labels))]
    outs = dict(zip(todo, ann.annotate([clips[i] for i in todo], [prior[i] for i in todo]) if todo else []))
    return [outs[i] if i in outs else _override(ann.name, None, clip.labels) for i, clip in enumerate(clips)]


def annotate_batch(items: list[Item], max_seconds: float, trust_labels: bool) -> tuple[list[dict], list[dict]]:
    """Run every annotator over a batch; returns (metadata records, error records). A clip that
    fails is isolated (the batch is retried clip by clip) and the others go on."""
    annotators = _WORKER["annotators"]
    clips, errors = [], []
    for it in items:
        try:
            clips.append(Clip(it.id, it.audio, load_audio(it.path, max_seconds=max_seconds), it.labels))
        except AudioError as err:
            kind = "too_long" if "longer than" in str(err) else "audio"
            errors.append(_error(it.id, it.audio, str(err), kind))
    results: list[dict[str, Annotation]] = [{} for _ in clips]
    for ann in annotators:
        try:
            outs = _run_annotator(ann, clips, results, trust_labels)
        except Exception:  # isolate the clip(s) at fault
            outs, keep = [], []
            for clip, prior in zip(clips, results):
                try:
                    outs.append(_run_annotator(ann, [clip], [prior], trust_labels)[0])
                    keep.append(True)
                except ClipError as err:
                    errors.append(_error(clip.id, clip.audio, f"{clip.audio}: {err}", ann.name))
                    keep.append(False)
                except Exception as err:
                    tb = traceback.format_exception_only(type(err), err)[-1].strip()
                    errors.append(_error(clip.id, clip.audio, f"{clip.audio}: annotator {ann.tag} failed: {tb}",
                                         "annotator"))
                    keep.append(False)
            clips = [c for c, k in zip(clips, keep) if k]
            results = [r for r, k in zip(results, keep) if k]
        for clip, prior, out in zip(clips, results, outs):
            if _trusted_label(ann, clip, trust_labels):
                out = _override(ann.name, out, clip.labels)
            prior[ann.name] = out
    records = [clip_record(clip, res, annotators).to_json() for clip, res in zip(clips, results)]
    return records, errors


def clip_record(clip: Clip, res: dict[str, Annotation], annotators) -> MetadataRecord:
    """One metadata.jsonl record from a clip's annotation results (what every stage reads)."""
    fields = [(a.field, res[a.name].bin) for a in annotators if a.field and res[a.name].bin]
    for key, name in LABEL_ONLY_FIELDS.items():
        if clip.labels.get(key) not in (None, "") and key not in ANNOTATORS and key not in res:
            fields.append((name, str(clip.labels[key])))
    transcript = res["transcript"].value if "transcript" in res else clip.labels.get("transcript")
    return MetadataRecord(clip.id, clip.audio, round(clip.duration, 3),
                          {a.name: {**res[a.name].to_dict(), "annotator": a.tag} for a in annotators},
                          describe(clip.duration, transcript, fields), clip.labels)


def _work(args: tuple[list[Item], float, bool]) -> tuple[list[dict], list[dict], float]:
    items, max_seconds, trust = args
    records, errors = annotate_batch(items, max_seconds, trust)
    return records, errors, sum(r["duration"] for r in records)


# ----------------------------------------------------------------------------- the stage

def _pending(items: Iterator[Item | dict], done: ResumableJsonl, failed: ResumableJsonl,
             summary: Summary, order: list[str]) -> list[Item]:
    """The items still to annotate; input errors (dicts: malformed line, bad path, undecodable HF
    row) go to the errors file once; ids already written or failed are counted and skipped. Every
    item's id is appended to `order` (the input order)."""
    todo: list[Item] = []
    for it in items:
        summary.total += 1
        id_ = it["id"] if isinstance(it, dict) else it.id
        order.append(str(id_))
        if id_ in done:
            summary.done_before += 1
        elif id_ in failed:
            summary.errors_before += 1
        elif isinstance(it, dict):
            failed.write(it)
            summary.errors += 1
            summary.error_kinds[it["kind"]] = summary.error_kinds.get(it["kind"], 0) + 1
        else:
            todo.append(it)
    return todo


def run(items: Iterator[Item | dict], out: Path, opts: AnnotateConfig, errors_path: Path | None = None,
        progress: bool = True, rank: int = 0, world: int = 1, barrier: Callable[[], None] | None = None) -> Summary:
    """Annotate every item not yet in `out` (or in the errors file), appending as they finish;
    parallel workers finish out of turn, so once the run is through, `out` is put back in input
    order (the same file for any worker count: later stages batch, sample and seed by row order).

    Several processes (`torchrun` / `accelerate launch`, on one node or many): process `rank` of
    `world` takes items i with i % world == rank and writes `<out>.part<rank>-of-<world>.jsonl`
    (and its errors); after `barrier` the main process merges the parts into `out` in input
    order (`speechllm.io.rows.merge_in_order`), and a rerun skips what is merged."""
    from tqdm import tqdm

    if world > 1:
        final_out, final_errors = out, errors_path or sibling_path(out, ".errors.jsonl")
        finished = (final_out,) if opts.retry_errors else (final_out, final_errors)
        merged = {str(line.record["id"]) for path in finished if path.exists()
                  for line in iter_lines(path) if line.record and "id" in line.record}
        order: list[str] = []
        items = _share(items, rank, world, merged, order)
        out = shard_path(final_out, rank, world)
        errors_path = sibling_path(out, ".errors.jsonl")
        summary = run(items, out, opts, errors_path, progress)
        if barrier is not None:
            barrier()
        if rank == 0:
            parts = [shard_path(final_out, r, world) for r in range(world)]
            merge_in_order(final_out, parts, order)
            if opts.retry_errors and final_errors.exists():  # retried: the old error lines go
                write_jsonl_atomic(final_errors, [])
            merge_in_order(final_errors, [sibling_path(p, ".errors.jsonl") for p in parts], order)
        if barrier is not None:
            barrier()
        return summary

    classifiers = classifier_options(opts)
    for key, kw in classifiers.items():  # a bad model is one clear error here, not one per worker
        check_classifier(key, kw["model"])
    names = order_annotators([n for n in opts.annotators if n not in classifiers], provided=tuple(classifiers))
    t0 = time.perf_counter()
    errors_path = errors_path or sibling_path(out, ".errors.jsonl")
    summary = Summary()
    if opts.retry_errors and errors_path.exists():
        write_jsonl_atomic(errors_path, [])
    order: list[str] = []
    with ResumableJsonl(out) as done, ResumableJsonl(errors_path) as failed:
        todo = _pending(items, done, failed, summary, order)
        batches = [todo[i: i + opts.batch_size] for i in range(0, len(todo), opts.batch_size)]
        workers = max(1, min(opts.workers, len(batches)))
        threads = max(1, (os.cpu_count() or 1) // workers)
        options = {"transcript": {"model": opts.asr_model, "threads": threads}, "noise": {"dnsmos": opts.dnsmos}}
        bar = tqdm(total=len(todo), desc="annotate", unit="clip", disable=not progress, file=sys.stderr)

        def consume(result: tuple[list[dict], list[dict], float]) -> None:
            records, errors, seconds = result
            for r in records:
                done.write(r)
            for e in errors:
                failed.write(e)
                summary.error_kinds[e["kind"]] = summary.error_kinds.get(e["kind"], 0) + 1
            summary.annotated += len(records)
            summary.errors += len(errors)
            summary.audio_seconds += seconds
            bar.update(len(records) + len(errors))

        args = [(b, opts.max_seconds, opts.trust_labels) for b in batches]
        if workers == 1 or not batches:
            if batches:
                _init_worker(names, options, threads, classifiers)
            for a in args:
                consume(_work(a))
        else:
            ctx = mp.get_context("spawn")
            with ctx.Pool(workers, initializer=_init_worker, initargs=(names, options, threads, classifiers)) as pool:
                for result in pool.imap_unordered(_work, args):
                    consume(result)
        bar.close()
    if workers > 1:  # results came as they finished (the errors file keeps that order: nothing reads it in turn)
        merge_in_order(out, [], order)
    summary.wall_seconds = time.perf_counter() - t0
    return summary


def _share(items: Iterator[Item | dict], rank: int, world: int, merged: set[str],
           order: list[str]) -> Iterator[Item | dict]:
    """This process's share of `items` (by position), less ids already merged; every id goes into
    `order`, the input order the parts are merged in."""
    for i, it in enumerate(items):
        id_ = it["id"] if isinstance(it, dict) else it.id
        order.append(id_)
        if i % world == rank and id_ not in merged:
            yield it


def load_metadata(path: Path) -> list[dict]:
    """All records of a metadata.jsonl as written by this stage (strict: a malformed line is an
    error naming the file and line)."""
    return [MetadataRecord.from_json(r, f"{path}:{i}").to_json()
            for i, r in enumerate(read_jsonl(path, required=("id", "audio", "annotations", "description")), 1)]
