"""Scores and statistics: per-task accuracy (or WER) with bootstrap intervals and the paired
difference to the reference, forgetting rates, the text-only IFEval check, comparisons between
checkpoints, and a checkpoint's training summary.

Every interval is a percentile bootstrap over items (`forgetting.bootstrap_interval`); the
system and the reference are resampled together (paired).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import EvalConfig
from ..io.jsonl import iter_lines
from ..labels import extract_lenient, normalize_label
from ..records import METRICS_FILE, TaskItem
from .forgetting import ForgettingResult, bootstrap_interval, forgetting_rate
from .items import EvalSet
from .tasks import score_item

TASK_SEED_STRIDE = 1000
"""Task i's intervals are seeded with `seed + TASK_SEED_STRIDE * i` (tasks in name order)."""


def _mean_of(values: np.ndarray):
    """The bootstrap statistic: the mean of `values` over each resample's indices."""
    return lambda idx: values[idx].mean(1)


def _label_scores(group: list[TaskItem], ours: list[dict], ref: list[dict], samples: int, seed: int) -> dict:
    """A label task's accuracy (lenient; strict too), the reference's, their paired difference,
    and what guessing gets: chance (one over the number of labels) and the majority-class rate
    (always answering the most frequent reference)."""
    a = np.array([s["correct"] for s in ours], float)
    a_strict = np.array([s["correct_strict"] for s in ours], float)
    r = np.array([s["correct"] for s in ref], float)
    r_strict = np.array([s["correct_strict"] for s in ref], float)
    lo, hi = bootstrap_interval(len(a), _mean_of(a), samples, seed)
    rlo, rhi = bootstrap_interval(len(r), _mean_of(r), samples, seed)
    dlo, dhi = bootstrap_interval(len(a), _mean_of(a - r), samples, seed)
    return {"answer_kind": "label", "items": len(ours), "accuracy": float(a.mean()), "ci_low": lo, "ci_high": hi,
            "accuracy_strict": float(a_strict.mean()), "accuracy_ref": float(r.mean()), "ref_ci_low": rlo,
            "ref_ci_high": rhi, "accuracy_ref_strict": float(r_strict.mean()), "diff": float((a - r).mean()),
            "diff_ci_low": dlo, "diff_ci_high": dhi,
            "unanswered": int(sum(s["lenient"] is None for s in ours)),
            "unanswered_ref": int(sum(s["lenient"] is None for s in ref)),
            "chance": float(np.mean([1 / len(it.labels or [None]) for it in group])),
            "majority": max(Counter(normalize_label(it.reference) for it in group).values()) / len(group)}


def _one_minus(x: float | None) -> float | None:
    """1 - x floored at 0 (accuracy from a WER); None stays None."""
    return None if x is None else max(0.0, 1 - x)


def _transcript_scores(group: list[TaskItem], ours: list[dict], ref: list[dict], samples: int, seed: int) -> dict:
    """A transcription task's WER (pooled over items) of the transcript span each answer gives
    (`tasks.transcript_span`), the reference's, accuracy = 1 - WER (floored at 0, so
    transcription sits on the same axis as label tasks), and the share of answers that contain
    the transcript; the WER of the whole answers too."""
    e = np.array([s["errors"] for s in ours], float)
    e_ref = np.array([s["errors"] for s in ref], float)
    w = np.array([s["words"] for s in ours], float)

    def wer(v: np.ndarray):
        return lambda idx: v[idx].sum(1) / np.maximum(w[idx].sum(1), 1)

    lo, hi = bootstrap_interval(len(e), wer(e), samples, seed)
    rlo, rhi = bootstrap_interval(len(e), wer(e_ref), samples, seed)
    w_all, r_all = float(e.sum() / max(w.sum(), 1)), float(e_ref.sum() / max(w.sum(), 1))
    return {"answer_kind": "transcript", "items": len(ours), "wer": w_all, "wer_ci_low": lo, "wer_ci_high": hi,
            "wer_ref": r_all, "wer_ref_ci_low": rlo, "wer_ref_ci_high": rhi,
            "accuracy": max(0.0, 1 - w_all), "ci_low": _one_minus(hi), "ci_high": _one_minus(lo),
            "accuracy_ref": max(0.0, 1 - r_all), "ref_ci_low": _one_minus(rhi), "ref_ci_high": _one_minus(rlo),
            "contains": float(np.mean([s["contains"] for s in ours])),
            "contains_ref": float(np.mean([s["contains"] for s in ref])),
            "answer_wer": float(sum(s["answer_errors"] for s in ours) / max(w.sum(), 1)),
            "answer_wer_ref": float(sum(s["answer_errors"] for s in ref) / max(w.sum(), 1))}


def task_scores(items: list[TaskItem], answers: dict[str, str], ref_answers: dict[str, str], samples: int,
                seed: int) -> tuple[dict, dict]:
    """Per task: the system's and the reference's scores, with intervals and the paired
    difference; also the per-item scores (for the generations audit file). Answers are keyed
    `task:<id>`."""
    by_task: dict[str, list[TaskItem]] = {}
    for it in items:
        by_task.setdefault(it.task, []).append(it)
    result, per_item = {}, {}
    for t_i, (task, group) in enumerate(sorted(by_task.items())):
        kind = group[0].answer_kind
        if kind == "free":
            result[task] = {"answer_kind": "free", "items": len(group), "accuracy": None}
            continue
        ours = [score_item(it, answers[f"task:{it.id}"]) for it in group]
        ref = [score_item(it, ref_answers[f"task:{it.id}"]) for it in group]
        per_item.update({it.id: s for it, s in zip(group, ours)})
        scores = _label_scores if kind == "label" else _transcript_scores
        result[task] = scores(group, ours, ref, samples, seed + TASK_SEED_STRIDE * t_i)
        result[task]["fidelity_ref"] = reference_fidelity(group, ref_answers)
    return result, per_item


def reference_fidelity(group: list[TaskItem], ref_answers: dict[str, str]) -> float | None:
    """Teacher fidelity of the reference: the share of its answers that agree with the
    description it read (the value the description states, not the label; for transcription,
    the answer contains the description's transcript). None when no description states it."""
    from annotate.description import parse_description

    from .tasks import contains_transcript

    agree = []
    for it in group:
        transcript, fields = parse_description(it.description or "")
        answer = ref_answers[f"task:{it.id}"]
        if it.answer_kind == "transcript" and transcript:
            agree.append(contains_transcript(answer, transcript))
        elif it.answer_kind == "label" and fields.get(it.task):
            agree.append(extract_lenient(answer, it.labels or [], it.instruction) == fields[it.task])
    return float(np.mean(agree)) if agree else None


def training_summary(checkpoint: Path) -> dict | None:
    """Steps, first/last loss and eval loss from the checkpoint's metrics.jsonl (if it has one)."""
    path = checkpoint / METRICS_FILE
    if not path.exists():
        return None
    rows = [line.record for line in iter_lines(path) if line.record is not None]
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval_loss" in r]
    if not train:
        return None
    return {"steps": train[-1]["step"], "first_loss": train[0]["loss"], "final_loss": train[-1]["loss"],
            "final_eval_loss": evals[-1]["eval_loss"] if evals else None,
            "curve": [[r["step"], r["loss"]] for r in train],
            "eval_curve": [[r["step"], r["eval_loss"]] for r in evals]}


CURVE_FIELDS = ("step", "ifrate", "delta")
"""The fields of a forgetting-curve point in the report (`train.forgetting_every` logs them)."""


def forgetting_curve(checkpoint: Path) -> list[dict]:
    """The forgetting curve the checkpoint's training logged: [{"step", "ifrate", "delta"}] from
    its metrics.jsonl (the rows with an IFrate), in step order; empty when it has none."""
    path = checkpoint / METRICS_FILE
    if not path.exists():
        return []
    rows = [line.record for line in iter_lines(path) if line.record is not None and "ifrate" in line.record]
    return sorted(({k: r.get(k) for k in CURVE_FIELDS} for r in rows), key=lambda r: r["step"])


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


@dataclass
class CheckpointScores:
    """One system's answers scored against the reference's on the same keys."""
    tasks: dict[str, dict]
    """Task name -> its scores (`task_scores`), the reference's included."""
    per_item: dict[str, dict]
    """Task item id -> the system's score of that item (`tasks.score_item`)."""
    passes: list[bool]
    """Per forgetting item (in `EvalSet.fitems` order): the system's answer follows its constraint
    (IFEval's official checker, strict, where IFEval has the kind; ours otherwise)."""
    passes_ref: list[bool]
    """The same for the reference's answers."""
    forgetting: ForgettingResult | None
    """IFrates and the forgetting rate; None without forgetting items."""
    ifeval: dict | None
    """The text-only IFEval summary of both systems; None without text prompts."""


def text_ifeval(es: EvalSet, answers: dict[str, str], ref_answers: dict[str, str]) -> dict | None:
    """Both systems on the text prompts, by IFEval's official checkers: prompt- and
    instruction-level accuracy, strict (the headline) and loose; per-prompt rows in ``rows`` /
    ``rows_base`` (None without text prompts)."""
    if not es.text_by_key:
        return None
    from .ifeval import score_prompts, summarize

    prompts = list(es.text_by_key.values())
    ours_text = [answers[f"text:{p.key}"] for p in prompts]
    ref_text = [ref_answers[f"text:{p.key}"] for p in prompts]
    rows, rows_base = score_prompts(ours_text, prompts), score_prompts(ref_text, prompts)
    ours, theirs = summarize(rows), summarize(rows_base)
    out = {"source": es.text_set.source, "prompts": len(prompts), "checkers": f"official ({official_library()})",
           "identical_answers": sum(a == b for a, b in zip(ours_text, ref_text))}
    for level in ("prompt", "instruction"):
        for mode in ("strict", "loose"):
            out[f"{level}_accuracy_{mode}"] = ours[f"{level}_accuracy_{mode}"]
            out[f"{level}_accuracy_{mode}_base"] = theirs[f"{level}_accuracy_{mode}"]
        out[f"{level}_accuracy"], out[f"{level}_accuracy_base"] = (out[f"{level}_accuracy_strict"],
                                                                    out[f"{level}_accuracy_strict_base"])
    out["per_instruction"] = {i: {"n": v["n"], "strict": v["strict"],
                                  "strict_base": theirs["per_instruction"][i]["strict"]}
                              for i, v in ours["per_instruction"].items()}
    out["rows"], out["rows_base"] = rows, rows_base
    return out


def official_library() -> str:
    from .official import library_version

    return library_version()


def score_checkpoint(es: EvalSet, answers: dict[str, str], ref_answers: dict[str, str],
                     cfg: EvalConfig) -> CheckpointScores:
    """Score one system's answers against the reference's on the same keys."""
    tasks, per_item = task_scores(es.items, {k: answers[k] for k in es.task_keys},
                                  {k: ref_answers[k] for k in es.task_keys}, cfg.bootstrap, cfg.seed)
    from .official import checker_name, follows_constraint

    s_pass = [follows_constraint(f.constraint, answers[k], f.instruction) for f, k in zip(es.fitems, es.if_keys)]
    r_pass = [follows_constraint(f.constraint, ref_answers[k], f.instruction) for f, k in zip(es.fitems, es.if_keys)]
    forgetting = forgetting_rate(s_pass, r_pass, [f.constraint.kind for f in es.fitems], samples=cfg.bootstrap,
                                 seed=cfg.seed) if es.fitems else None
    if forgetting is not None:
        for kind, per in forgetting.per_constraint.items():
            per["checker"] = checker_name(kind)
    return CheckpointScores(tasks, per_item, s_pass, r_pass, forgetting, text_ifeval(es, answers, ref_answers))
