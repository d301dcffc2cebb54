"""`speechllm demo`: the whole loop on the embedded default, and the forgetting result.

    synth -> annotate (train, test) -> targets (self-output, label) -> train (one adapter each)
          -> eval (both adapters vs the text reference) -> DIR/report.{json,md}, DIR/plots/

Every stage keeps its output in DIR and resumes: a rerun skips what is finished. The sizes are
set by a :class:`DemoPlan`; ``--quick`` uses a smaller one.

    DIR/data/synth/            labelled clips (train/test disjoint in sentences and voices)
    DIR/data/{train,test}.metadata.jsonl
    DIR/data/train.{self-output,label}.targets.jsonl
    DIR/runs/{self-output,label}/   trained adapters (metrics.jsonl, checkpoints/)
    DIR/report.md, report.json, plots/, generations/   the evaluation
    DIR/demo.json              the plan and each stage's wall time
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import SpeechLLMError

STRATEGIES = ("self-output", "label")

SYSTEM_PROMPT = "You are a helpful assistant. Answer briefly."
"""System message of the frozen LLM when it makes targets, when it is trained through and when it
is evaluated (the same everywhere). Short answers keep target generation and evaluation within a
CPU's time budget; the reference is asked the same way, so the comparison stays fair."""

INSTRUCTION_POOL = [
    "What can you hear?",
    "Describe the audio.",
    "Describe the speaker's voice.",
    "Is the speaker male or female?",
    "What is the speaker's gender?",
    "Is the speaker's voice low, normal or high in pitch?",
    "How fast is the speaker talking?",
    "Is the recording noisy?",
    "What did the speaker say?",
    "How loud is the speaker?",
]
"""Training instructions (DeSTA2.5 draws from a pool); each clip gets one, seeded by its id. Two
ask the gender in different words (the evaluation varies its phrasing)."""

DEMO_CONSTRAINTS = ["title", "no_commas", "keyword", "json_format", "bullet_points", "end_phrase"]
"""Constraint kinds of the demo's forgetting check: those SmolLM2-135M follows at least sometimes
when it reads a description (measured on 8 test descriptions, 96 tokens: title 8/8, no_commas 4/8,
keyword 3/8, json_format 2/8, bullet_points 2/8, end_phrase 1/8; lowercase, uppercase,
double_quotes and start_phrase 0/8, so no speech model could be seen to lose them). max_words is
left out because any short answer passes it, whether or not the instruction was read; min_words
and language do not fit a 135M model on a CPU budget. `speechllm eval` uses every kind by default."""


@dataclass
class DemoPlan:
    clips: int
    """Synthetic clips in all (a fifth are held out for testing)."""
    steps: int
    """Optimizer steps per adapter."""
    batch_size: int = 8
    """Examples per step."""
    lr: float = 1e-3
    """Peak learning rate (a fresh adapter, few steps)."""
    warmup_steps: int = 10
    max_target_tokens: int = 64
    """Longest target; self-outputs are generated up to this many tokens."""
    per_task: int = 24
    """Audio-task items per task in the evaluation."""
    forgetting_items: int = 66
    """Forgetting items (task question + constraint)."""
    text_prompts: int = 12
    """Text-only prompts for text retention: a seeded sample of Google's IFEval prompts, scored by
    the official checkers (the built-in set when IFEval cannot be fetched)."""
    task_tokens: int = 48
    """Answer length for audio tasks."""
    if_tokens: int = 128
    """Answer length for constrained and text prompts."""
    eval_batch_size: int = 16
    """Answers per generation batch in the evaluation."""
    real: bool = True
    """Also evaluate on the real recordings of `speechllm.data.real` (gender and transcription)."""
    seed: int = 0
    constraints: list[str] = field(default_factory=lambda: list(DEMO_CONSTRAINTS))


FULL = DemoPlan(clips=240, steps=100, forgetting_items=144)
QUICK = DemoPlan(clips=48, steps=12, max_target_tokens=48, per_task=4, forgetting_items=12, text_prompts=0,
                 task_tokens=24, if_tokens=64)


def demo_config(plan: DemoPlan, strategy: str, out: Path):
    """The embedded default's config (the dataclass defaults, as configs/default.yaml) with the
    demo's sizes (every override named here)."""
    from .config import load_config

    overrides = [
        f"model.llm.system_prompt={SYSTEM_PROMPT}",
        f"targets.strategy={strategy}", f"targets.instruction_pool={json.dumps(INSTRUCTION_POOL)}",
        "targets.batch_size=16",
        f"train.data={out / 'data' / f'train.{strategy}.targets.jsonl'}", f"train.out_dir={out / 'runs' / strategy}",
        f"train.max_steps={plan.steps}", f"train.batch_size={plan.batch_size}", f"train.lr={plan.lr}",
        f"train.warmup_steps={plan.warmup_steps}", f"train.max_target_tokens={plan.max_target_tokens}",
        "train.eval_fraction=0.1", f"train.eval_every={max(plan.steps // 4, 1)}",
        f"train.save_every={max(plan.steps // 2, 1)}", "train.log_every=5", f"train.seed={plan.seed}",
    ]
    return load_config(None, overrides)


class Stages:
    """Runs named stages in order, printing a header and the wall time of each."""

    def __init__(self, total: int):
        self.total, self.done, self.times = total, 0, {}

    def run(self, name: str, fn):
        self.done += 1
        print(f"\n[demo {self.done}/{self.total}] {name}", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        result = fn()
        self.times[name] = round(time.perf_counter() - t0, 1)
        print(f"[demo] {name}: {self.times[name]:.1f} s", file=sys.stderr, flush=True)
        return result


def _annotate(data: Path, progress: bool) -> None:
    """The synthetic splits with their labels trusted (the synthetic manifests carry the true
    transcript and attributes; DeSTA2.5 also builds its descriptions on ground-truth transcripts:
    espeak/flite speech defeats whisper-tiny, see README), and the real recordings as a user's
    would be annotated (ASR transcript, gender from pitch)."""
    from annotate.pipeline import manifest_items, run as annotate

    from .config import AnnotateConfig
    from .data.real import write_real_manifest

    jobs = [(data / "synth" / f"{split}.jsonl", data / f"{split}.metadata.jsonl", True) for split in ("train", "test")]
    real = write_real_manifest(data / "real")
    if real is not None:
        jobs.append((real, data / "real.metadata.jsonl", False))
    for manifest, target, trust in jobs:
        summary = annotate(manifest_items(manifest, data), target, AnnotateConfig(trust_labels=trust),
                           progress=progress)
        print(summary.line(target), file=sys.stderr)


def _eval_config(plan: DemoPlan, real: bool = False):
    """The evaluation's settings: every task with the plan's sizes, or for the real recordings
    gender and transcription only, with no forgetting or text items (too few clips)."""
    from .config import EvalConfig

    common = dict(data_format="metadata", max_new_tokens=plan.task_tokens, if_max_new_tokens=plan.if_tokens,
                  batch_size=plan.eval_batch_size, seed=plan.seed)
    if real:
        return EvalConfig(tasks=["gender", "transcription"], forgetting_items=0, text_prompts=0, **common)
    return EvalConfig(max_per_task=plan.per_task, forgetting_items=plan.forgetting_items,
                      constraints=plan.constraints, text_prompts=plan.text_prompts, text_prompt_set="auto",
                      **common)


class DemoError(SpeechLLMError):
    """The demo cannot go on with what its output folder holds."""


def train_stage(cfg, progress: bool = True) -> Path:
    """The demo's training stage: train, or finish, the run in `cfg.train.out_dir`. A run there made
    with other settings (e.g. by an earlier speechllm) is not continued: the demo takes no
    `train.resume` override, so the error says which folder to delete."""
    from .training.trainer import SettingsChangedError, train

    try:
        return train(cfg, progress=progress)
    except SettingsChangedError as err:
        folder = cfg.train.out_dir
        raise DemoError(f"{folder} holds an adapter trained with other settings ({'; '.join(err.changes)}), "
                        f"e.g. by an earlier speechllm; the demo does not continue it: delete {folder} to train "
                        "it afresh (the stages before training are kept), or choose another --out") from None


def run_demo(out: Path, quick: bool = False, device: str = "cpu", progress: bool = True) -> dict:
    """Run (or finish) the demo in `out`; returns the evaluation report (with the teacher's
    fidelity and the real-recordings results added under `demo`)."""
    from .data.synth import synthesize
    from .eval.suite import run_eval
    from .hub import weights
    from .targets.run import run_targets
    plan = QUICK if quick else FULL
    out, t0 = Path(out), time.perf_counter()
    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    stages = Stages(4 + 2 * len(STRATEGIES) + plan.real)
    stages.run("prepare the embedded models", lambda: [weights.prepare(n) for n in ("smollm2-135m-instruct",
                                                                                    "whisper-tiny.en")])
    stages.run(f"synthesize {plan.clips} labelled clips", lambda: synthesize(data / "synth", n=plan.clips,
                                                                            seed=plan.seed, progress=progress))
    stages.run("annotate train and test clips" + (" and the real recordings" if plan.real else ""),
               lambda: _annotate(data, progress))
    for strategy in STRATEGIES:
        cfg = demo_config(plan, strategy, out)
        target = Path(cfg.train.data)
        stages.run(f"targets: {strategy}", lambda: print(run_targets(data / "train.metadata.jsonl", target, cfg,
                                                                     device=device, progress=progress).line(target),
                                                         file=sys.stderr))
    for strategy in STRATEGIES:
        cfg = demo_config(plan, strategy, out)
        stages.run(f"train: {strategy} ({plan.steps} steps x {plan.batch_size})",
                   lambda: train_stage(cfg, progress=progress))
    runs = [out / "runs" / s for s in STRATEGIES]
    report = stages.run("evaluate both adapters against the text reference",
                        lambda: run_eval(runs, data / "test.metadata.jsonl", out, _eval_config(plan), device=device,
                                         progress=progress))
    real = None
    if plan.real and (data / "real.metadata.jsonl").exists():
        real = stages.run("evaluate both adapters on real recordings",
                          lambda: run_eval(runs, data / "real.metadata.jsonl", out / "real", _eval_config(plan, True),
                                           device=device, progress=progress))
    report = _add_demo_sections(report, out, data, real)
    total = round(time.perf_counter() - t0, 1)
    (out / "demo.json").write_text(json.dumps({"plan": asdict(plan), "quick": quick, "stage_seconds": stages.times,
                                               "total_seconds": total}, indent=2) + "\n")
    print(f"\n[demo] done in {total / 60:.1f} min; stage times: "
          + ", ".join(f"{k} {v:.0f} s" for k, v in stages.times.items()), file=sys.stderr)
    return report


def _add_demo_sections(report: dict, out: Path, data: Path, real: dict | None) -> dict:
    """The evaluation report with the demo's own findings added (report.json under `demo`,
    report.md as sections): the teacher's fidelity to its descriptions per attribute, and each
    adapter's accuracy on the real recordings."""
    from .eval.report import write_report
    from .targets.run import fidelity_path

    fidelity = {}
    for strategy in STRATEGIES:
        path = fidelity_path(data / f"train.{strategy}.targets.jsonl")
        if path.exists():
            fidelity[strategy] = json.loads(path.read_text())
    report["demo"] = {"teacher_fidelity": fidelity, "real": _real_summary(real) if real else None}
    write_report(report, out)
    with open(out / "report.md", "a") as f:
        f.write("\n" + "\n".join(demo_lines(report["demo"])) + "\n")
    return report


def _real_summary(real: dict) -> dict:
    """Per checkpoint and task: accuracy with its interval, and the reference's (from the real
    recordings' report)."""
    keep = ("items", "accuracy", "ci_low", "ci_high", "accuracy_ref", "chance", "majority", "contains",
            "contains_ref", "fidelity_ref")
    return {name: {task: {k: t.get(k) for k in keep} for task, t in ck["tasks"].items()}
            for name, ck in real["checkpoints"].items()}


def demo_lines(demo: dict) -> list[str]:
    """The report.md sections of the demo's own findings."""
    lines = []
    for strategy, fid in demo["teacher_fidelity"].items():
        attrs = fid["attributes"]
        prompt = f"{fid['examples']} worked examples" if fid["examples"] else "zero-shot"
        lines += ["## Teacher fidelity", "",
                  f"How often the teacher (the frozen LLM making the `{strategy}` targets, {prompt}) answers what the "
                  "description it reads says (probe questions on the training descriptions; transcript: the "
                  "answer contains it).", "", "| attribute | agreed | fidelity |", "|---|---|---|"]
        lines += [f"| {a} | {v['agreed']}/{v['asked']} | {100 * v['fidelity']:.0f}% |" for a, v in attrs.items()]
        lines.append("")
        break  # one teacher: every LLM strategy asks the same model the same way
    if demo.get("real"):
        names = list(demo["real"])
        lines += ["## Real recordings", "",
                  "LibriVox (male reader) and ALSA channel names (female voice), annotated as a user's "
                  "audio would be (ASR transcript, gender from pitch). Accuracy %, 95% interval:", "",
                  "| task | items | chance | majority | " + " | ".join(names) + " | reference |",
                  "|---|---|---|---|" + "---|" * (len(names) + 1)]
        first = demo["real"][names[0]]
        for task, t in first.items():
            cells = [demo["real"][n][task] for n in names]
            lines.append(f"| {task} | {t['items']} | {_pct(t['chance'])} | {_pct(t['majority'])} | "
                         + " | ".join(f"{_pct(c['accuracy'])} [{_pct(c['ci_low'])}, {_pct(c['ci_high'])}]"
                                      for c in cells) + f" | {_pct(t['accuracy_ref'])} |")
    return lines


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}"
