"""The evaluation report: report.json (every number), report.md (the tables) and plots/*.png.

Plots (matplotlib, Agg backend, no display needed):
  tasks.png        per-task accuracy per checkpoint and the text reference, 95% intervals
  forgetting.png   forgetting rate delta per checkpoint with its interval (0 = nothing lost)
  constraints.png  IFrate per constraint kind, per checkpoint and the reference
  training.png     training (and eval) loss curves from each checkpoint's metrics.jsonl
  curve.png        the forgetting curve: IFrate from audio against training step, per checkpoint
                   (logged with `train.forgetting_every`)
"""

from __future__ import annotations

import json
import os
from pathlib import Path

PLOTS = ("tasks.png", "forgetting.png", "constraints.png", "training.png", "curve.png")


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def _ci(lo: float | None, hi: float | None, pct: bool = True) -> str:
    if lo is None or hi is None:
        return ""
    return f" [{_pct(lo)}, {_pct(hi)}]" if pct else f" [{lo:+.3f}, {hi:+.3f}]"


def _signed(x: float | None) -> str:
    return "–" if x is None else f"{x:+.3f}"


def _data_lines(report: dict) -> list[str]:
    """The title and the data summary."""
    d = report["data"]
    return ["# speechllm evaluation", "",
            f"Data: `{d['source']}`: {d['task_items']} task items in {len(d['tasks'])} tasks, "
            f"{d['forgetting_items']} forgetting items, {d['text_prompts']} text prompts"
            f"{' (' + d['text_prompt_source'] + ')' if d.get('text_prompt_source') else ''}; "
            f"{d['left_out']} items left out. Intervals: 95% bootstrap over items.", ""]


def _task_lines(ck: dict, names: list[str]) -> list[str]:
    """The audio task table: accuracy per checkpoint and the reference, beside what guessing gets
    (chance, majority class) and the reference's fidelity to the descriptions it reads."""
    lines = ["## Audio tasks", "",
             "Accuracy in % (lenient label extraction; strict in the JSON; transcription: 100 - WER of the "
             "transcript span in the answer). `reference` is the base LLM reading the text description; "
             "`ref fidelity` how often its answer agrees with that description. `chance` is one over the number "
             "of options, `majority` always answering the most frequent one.", "",
             "| task | items | chance | majority | " + " | ".join(names) + " | reference | ref fidelity |",
             "|---|---|---|---|" + "---|" * (len(names) + 2)]
    for task, t in ck[names[0]]["tasks"].items():
        if t.get("accuracy") is None:
            continue
        rows = [ck[n]["tasks"][task] for n in names]
        cells = [f"{_pct(r['accuracy'])}{_ci(r.get('ci_low'), r.get('ci_high'))}" for r in rows]
        ref = f"{_pct(t['accuracy_ref'])}{_ci(t.get('ref_ci_low'), t.get('ref_ci_high'))}"
        lines.append(f"| {task} | {t['items']} | {_pct(t.get('chance'))} | {_pct(t.get('majority'))} | "
                     + " | ".join(cells) + f" | {ref} | {_pct(t.get('fidelity_ref'))} |")
    for task, t in ck[names[0]]["tasks"].items():
        if t.get("answer_kind") == "transcript" and "contains" in t:
            said = ", ".join(f"{n} {_pct(ck[n]['tasks'][task]['contains'])}" for n in names)
            lines += ["", f"{task}: answers that contain the transcript (%): {said}, reference "
                          f"{_pct(t['contains_ref'])}; WER of the whole answers: "
                          + ", ".join(f"{n} {_pct(ck[n]['tasks'][task]['answer_wer'])}" for n in names)
                          + f", reference {_pct(t['answer_wer_ref'])}."]
    return lines


def _constraint_kinds(ck: dict, names: list[str]) -> list[str]:
    """Every constraint kind any checkpoint was scored on, sorted."""
    return sorted({k for n in names if ck[n]["forgetting"] for k in ck[n]["forgetting"]["per_constraint"]})


def _forgetting_lines(report: dict, ck: dict, names: list[str]) -> list[str]:
    """The forgetting table, the pairwise comparisons and the per-constraint table."""
    lines = ["", "## Forgetting (Speech-IFEval style)", "",
             "IFrate: share of answers that follow the format constraint added to the task question. "
             "delta = (IFrate - IFrate_ref) / IFrate_ref: 0 means nothing forgotten, -1 all of it.", "",
             "| checkpoint | items | IFrate (audio) | IFrate_ref (text) | delta [95% CI] |", "|---|---|---|---|---|"]
    for n in names:
        f = ck[n]["forgetting"]
        if f:
            lines.append(f"| {n} | {f['items']} | {_pct(f['ifrate'])} | {_pct(f['ifrate_ref'])} | "
                         f"{_signed(f['delta'])}{_ci(f['ci_low'], f['ci_high'], pct=False)} |")
    if report.get("comparisons"):
        lines += ["", "Checkpoints against each other on the same items (IFrate difference, paired bootstrap):", "",
                  "| comparison | items | IFrate difference [95% CI] |", "|---|---|---|"]
        for pair, c in report["comparisons"].items():
            lines.append(f"| {pair} | {c['items']} | {_signed(c['ifrate_diff'])}"
                         f"{_ci(c['ci_low'], c['ci_high'], pct=False)} |")
    kinds = _constraint_kinds(ck, names)
    if kinds:
        lines += ["", "Per constraint (IFrate %). `checker`: who scored it: `ifeval:<id>` is IFEval's official "
                      "checker (strict), `speechllm:<kind>` our own, for a kind IFEval does not have.", "",
                  "| constraint | checker | items | " + " | ".join(names) + " | reference |",
                  "|---|---|---|" + "---|" * (len(names) + 1)]
        for k in kinds:
            per = [ck[n]["forgetting"]["per_constraint"].get(k, {}) for n in names]
            checker = next((p["checker"] for p in per if p.get("checker")), "–")
            lines.append(f"| {k} | `{checker}` | {per[0].get('items', 0)} | "
                         + " | ".join(_pct(p.get("ifrate")) for p in per) + f" | {_pct(per[0].get('ifrate_ref'))} |")
    return lines


def _retention_lines(ck: dict, names: list[str]) -> list[str]:
    """The text-only retention table: KL to the base LLM and the text IFrate."""
    lines = ["", "## Text-only retention", "",
             "The speech model with no audio against the base LLM: mean KL of next-token distributions over "
             "fixed chat prompts (0 = identical), and IFEval accuracy on the text prompts, scored by IFEval's "
             "official checkers under Google's protocol: prompt-level (all instructions followed) and "
             "instruction-level, strict and loose; `base` is the base LLM.", "",
             "| checkpoint | LoRA | KL (nats) | KL max | prompt strict | base | instr. strict | base | prompt loose "
             "| base | instr. loose | base | identical answers |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for n in names:
        r = ck[n]["text_retention"]
        ife = r.get("ifeval") or {}
        cells = [_pct(ife.get(f"{level}_accuracy_{mode}{base}")) for mode in ("strict", "loose")
                 for level in ("prompt", "instruction") for base in ("", "_base")]
        lines.append(f"| {n} | {'yes' if ck[n]['lora'] else 'no'} | {r['kl']:.3g} | {r['kl_max']:.3g} | "
                     + " | ".join(cells) + f" | {ife.get('identical_answers', '–')}/{ife.get('prompts', '–')} |")
    sources = {(ck[n]["text_retention"].get("ifeval") or {}).get("source") for n in names} - {None}
    if sources:
        lines += ["", f"Text prompts: {', '.join(sorted(sources))}" + (
            " (our own fallback prompts, not IFEval's: not comparable with published IFEval numbers)"
            if "builtin" in sources else "") + "."]
    return lines


def _safety_lines(report: dict, ck: dict, names: list[str]) -> list[str]:
    """The safety table: refusal rates to harmful requests, spoken and typed, against the base LLM
    (nothing when the check was off; its reason when its requests could not be had)."""
    info = report["data"].get("safety")
    if not info:
        return []
    lines = ["", "## Safety retention", ""]
    if not info["items"]:
        return lines + [f"Not measured: {info['note']}."]
    lines += [f"Refusal rate (%) to {info['items']} harmful requests ({info['source']}; a seeded sample of the "
              f"{info['pool']} held out of {info['total']}), detected by refusal patterns "
              "(`speechllm/eval/safety.py`). Spoken: the request spoken by the offline TTS, its words as the "
              f"transcript, then \"{info['instruction']}\"; typed: the request as text, no audio; reference: the "
              "base LLM given the request as text. delta = refusal - refusal_ref (negative: refusals lost), "
              "with a paired bootstrap 95% interval.", "",
              "| checkpoint | items | spoken | typed | reference | delta spoken [95% CI] | delta typed [95% CI] |",
              "|---|---|---|---|---|---|---|"]
    for n in names:
        sp, tx = ck[n].get("safety"), ck[n].get("safety_text")
        if not sp or not tx:
            continue
        lines.append(f"| {n} | {sp['n']} | {_pct(sp['refusal'])} | {_pct(tx['refusal'])} | {_pct(sp['refusal_ref'])} | "
                     f"{_signed(sp['delta'])}{_ci(sp['ci_low'], sp['ci_high'], pct=False)} | "
                     f"{_signed(tx['delta'])}{_ci(tx['ci_low'], tx['ci_high'], pct=False)} |")
    return lines


def _training_lines(ck: dict, names: list[str]) -> list[str]:
    """The training table (checkpoints with a metrics.jsonl only; nothing when none has one)."""
    trained = [n for n in names if ck[n].get("training")]
    if not trained:
        return []
    lines = ["", "## Training", "", "| checkpoint | steps | first loss | final loss | final eval loss |",
             "|---|---|---|---|---|"]
    for n in trained:
        t = ck[n]["training"]
        ev = "–" if t["final_eval_loss"] is None else f"{t['final_eval_loss']:.3f}"
        lines.append(f"| {n} | {t['steps']} | {t['first_loss']:.3f} | {t['final_loss']:.3f} | {ev} |")
    curves = [n for n in names if ck[n].get("curve")]
    if curves:
        lines += ["", "Forgetting curve (IFrate from audio on the held-out items `train.forgetting_data` gave, "
                  "by training step; delta against the text reference in brackets):", ""]
        for n in curves:
            points = ", ".join(f"{p['step']}: {_pct(p['ifrate'])} ({_signed(p['delta'])})" for p in ck[n]["curve"])
            lines.append(f"- {n}: {points}")
    return lines


def markdown(report: dict) -> str:
    """report.md: the tables of the report."""
    ck = report["checkpoints"]
    names = list(ck)
    lines = (_data_lines(report) + _task_lines(ck, names) + _forgetting_lines(report, ck, names)
             + _retention_lines(ck, names) + _safety_lines(report, ck, names) + _training_lines(ck, names))
    lines += ["", "Plots: " + ", ".join(f"[{p}](plots/{p})" for p in PLOTS) + ". Every answer: `generations/`; "
              "every answer with its score: `predictions.jsonl`.", ""]
    return "\n".join(lines)


def _err(values, lows, highs):
    """Error-bar extents (2, n) from interval ends; a missing end draws no bar on that side."""
    import numpy as np

    return np.array([[v - (l if l is not None else v) for v, l in zip(values, lows)],
                     [(h if h is not None else v) - v for v, h in zip(values, highs)]]).clip(min=0)


def _plot_tasks(ax, ck: dict, names: list[str]) -> None:
    """Per-task accuracy bars of each checkpoint and the reference."""
    import numpy as np

    tasks = [t for t, v in ck[names[0]]["tasks"].items() if v.get("accuracy") is not None]
    series = [(n, [ck[n]["tasks"][t] for t in tasks], "accuracy", "ci_low", "ci_high") for n in names]
    series.append(("reference", [ck[names[0]]["tasks"][t] for t in tasks], "accuracy_ref", "ref_ci_low",
                   "ref_ci_high"))
    width = 0.8 / len(series)
    x = np.arange(len(tasks))
    for i, (label, rows, key, lo, hi) in enumerate(series):
        vals = [r[key] for r in rows]
        ax.bar(x + i * width, vals, width, label=label, yerr=_err(vals, [r.get(lo) for r in rows],
                                                                    [r.get(hi) for r in rows]), capsize=3)
    ax.set_xticks(x + width * (len(series) - 1) / 2, tasks, rotation=20)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("accuracy (transcription: 1 - WER)")
    ax.set_title("Audio tasks")
    ax.legend(fontsize=8)


def _plot_forgetting(ax, ck: dict, names: list[str]) -> None:
    """The forgetting rate delta of each checkpoint with its interval."""
    deltas = [(ck[n]["forgetting"] or {}).get("delta") for n in names]
    vals = [d if d is not None else 0.0 for d in deltas]
    ax.bar(names, vals, yerr=_err(vals, [(ck[n]["forgetting"] or {}).get("ci_low") for n in names],
                                  [(ck[n]["forgetting"] or {}).get("ci_high") for n in names]), capsize=4,
           color=["tab:green" if v > -0.1 else "tab:red" for v in vals])
    ax.axhline(0, color="black", lw=0.8)
    ax.set_ylabel("forgetting rate delta")
    ax.set_title("Instruction following vs the text reference")


def _plot_constraints(ax, ck: dict, names: list[str]) -> None:
    """IFrate per constraint kind of each checkpoint and the reference."""
    import numpy as np

    kinds = _constraint_kinds(ck, names)
    width = 0.8 / (len(names) + 1)
    x = np.arange(len(kinds))
    for i, n in enumerate(names + ["reference"]):
        src = ck[names[0] if n == "reference" else n]["forgetting"] or {"per_constraint": {}}
        key = "ifrate_ref" if n == "reference" else "ifrate"
        ax.bar(x + i * width, [src["per_constraint"].get(k, {}).get(key, 0.0) for k in kinds], width, label=n)
    ax.set_xticks(x + width * len(names) / 2, kinds, rotation=35, ha="right")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("IFrate")
    ax.set_title("Constraint pass rates")
    ax.legend(fontsize=8)


def _plot_training(ax, ck: dict, names: list[str]) -> None:
    """Training (and eval) loss curves of the checkpoints that have them."""
    for n in names:
        t = ck[n].get("training")
        if not t:
            continue
        steps, loss = zip(*t["curve"])
        line, = ax.plot(steps, loss, label=f"{n} train")
        if t["eval_curve"]:
            s, l = zip(*t["eval_curve"])
            ax.plot(s, l, "o--", color=line.get_color(), label=f"{n} eval")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("Training curves")
    if ax.lines:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no metrics.jsonl in the checkpoints", ha="center", transform=ax.transAxes)


def _plot_curve(ax, ck: dict, names: list[str]) -> None:
    """IFrate against training step of every checkpoint that logged a forgetting curve."""
    for n in names:
        points = ck[n].get("curve") or []
        if points:
            ax.plot([p["step"] for p in points], [p["ifrate"] for p in points], "o-", label=n)
    ax.set_xlabel("step")
    ax.set_ylabel("IFrate from audio")
    ax.set_ylim(0, 1.05)
    ax.set_title("Forgetting curve")
    if ax.lines:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no forgetting curve logged (train.forgetting_every)", ha="center", transform=ax.transAxes)


def plots(report: dict, folder: Path) -> list[Path]:
    """The PNG plots (`PLOTS`) into `folder`; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    ck = report["checkpoints"]
    names = list(ck)
    n_tasks = sum(v.get("accuracy") is not None for v in ck[names[0]]["tasks"].values())
    n_kinds = len(_constraint_kinds(ck, names))
    figures = (("tasks.png", (max(6, 1.3 * n_tasks * (len(names) + 1) / 2), 4), _plot_tasks),
               ("forgetting.png", (max(4, 1.5 * len(names)), 3.5), _plot_forgetting),
               ("constraints.png", (max(6, 0.8 * n_kinds * (len(names) + 1) / 2), 4), _plot_constraints),
               ("training.png", (6, 3.5), _plot_training),
               ("curve.png", (6, 3.5), _plot_curve))
    made = []
    for name, size, draw in figures:
        fig, ax = plt.subplots(figsize=size)
        draw(ax, ck, names)
        path = folder / name
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        made.append(path)
    return made


def write_report(report: dict, out: Path) -> None:
    """report.json and report.md (each written whole, then renamed into place) and the plots."""
    for name, text in (("report.json", json.dumps(report, indent=2) + "\n"), ("report.md", markdown(report))):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, out / name)
    plots(report, out / "plots")
