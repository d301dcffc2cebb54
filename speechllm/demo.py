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
    "How fast is the speaker talking?",
    "Is the recording noisy?",
    "What did the speaker say?",
    "How loud is the speaker?",
]
"""Training instructions (DeSTA2.5 draws from a pool); each clip gets one, seeded by its id."""

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
    """Text-only prompts (built-in set) for text retention."""
    task_tokens: int = 48
    """Answer length for audio tasks."""
    if_tokens: int = 128
    """Answer length for constrained and text prompts."""
    eval_batch_size: int = 16
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


def run_demo(out: Path, quick: bool = False, device: str = "cpu", progress: bool = True) -> dict:
    """Run (or finish) the demo in `out`; returns the evaluation report."""
    from annotate.pipeline import manifest_items, run as annotate

    from .config import AnnotateConfig, EvalConfig
    from .data.synth import synthesize
    from .eval.suite import run_eval
    from .hub import weights
    from .targets.run import run_targets
    from .training.trainer import train

    plan = QUICK if quick else FULL
    out = Path(out)
    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    stages = Stages(5 + 2 * len(STRATEGIES))
    t0 = time.perf_counter()

    stages.run("prepare the embedded models", lambda: [weights.prepare(n) for n in ("smollm2-135m-instruct",
                                                                                    "whisper-tiny.en")])
    synth = data / "synth"
    stages.run(f"synthesize {plan.clips} labelled clips", lambda: synthesize(synth, n=plan.clips, seed=plan.seed,
                                                                            progress=progress))

    def annotate_splits():
        # the synthetic manifests carry the true transcript and attributes; DeSTA2.5 also builds its
        # descriptions on ground-truth transcripts (espeak/flite speech defeats whisper-tiny, see README)
        opts = AnnotateConfig(trust_labels=True)
        for split in ("train", "test"):
            target = data / f"{split}.metadata.jsonl"
            summary = annotate(manifest_items(synth / f"{split}.jsonl", data), target, opts, progress=progress)
            print(summary.line(target), file=sys.stderr)
    stages.run("annotate train and test clips", annotate_splits)

    for strategy in STRATEGIES:
        cfg = demo_config(plan, strategy, out)
        target = Path(cfg.train.data)
        stages.run(f"targets: {strategy}", lambda: print(run_targets(data / "train.metadata.jsonl", target, cfg,
                                                                     device=device, progress=progress).line(target),
                                                         file=sys.stderr))
    for strategy in STRATEGIES:
        cfg = demo_config(plan, strategy, out)
        stages.run(f"train: {strategy} ({plan.steps} steps x {plan.batch_size})",
                   lambda: train(cfg, progress=progress))

    eval_cfg = EvalConfig(data_format="metadata", max_per_task=plan.per_task, forgetting_items=plan.forgetting_items,
                          constraints=plan.constraints, text_prompts=plan.text_prompts, text_prompt_set="builtin",
                          max_new_tokens=plan.task_tokens, if_max_new_tokens=plan.if_tokens,
                          batch_size=plan.eval_batch_size, seed=plan.seed)
    report = stages.run("evaluate both adapters against the text reference",
                        lambda: run_eval([out / "runs" / s for s in STRATEGIES], data / "test.metadata.jsonl", out,
                                         eval_cfg, device=device, progress=progress))
    total = round(time.perf_counter() - t0, 1)
    (out / "demo.json").write_text(json.dumps({"plan": asdict(plan), "quick": quick, "stage_seconds": stages.times,
                                               "total_seconds": total}, indent=2) + "\n")
    print(f"\n[demo] done in {total / 60:.1f} min; stage times: "
          + ", ".join(f"{k} {v:.0f} s" for k, v in stages.times.items()), file=sys.stderr)
    return report
