"""`speechllm demo`: the whole loop on the embedded default, and the forgetting result.

    synth -> annotate (train, test) -> targets (self-output, label, minimum-change) -> replay data
          -> experiment 1, frozen LLM: train an adapter on self-output and on label targets
          -> experiment 2, LoRA on the LLM (the text path can forget): label, label + pseudo-replay,
             minimum-change, self-output
          -> eval (every run vs the text reference) -> DIR/report.{json,md}, DIR/plots/
          -> with --hearing, experiment 3: minimum-change targets from a pool where eight of eleven
             instructions ask the gender, one adapter trained 4x longer, gender on held-out and real clips

Every stage keeps its output in DIR and resumes: a rerun skips what is finished. The sizes are
set by a :class:`DemoPlan`; ``--quick`` uses a smaller one.

    DIR/data/synth/            labelled clips (train/test disjoint in sentences and voices)
    DIR/data/{train,test}.metadata.jsonl
    DIR/data/train.{self-output,label,minimum-change}.targets.jsonl (+ .nll.json: target NLL)
    DIR/data/replay.jsonl      pseudo-replay: Magpie instructions and training-side safety requests,
                               answered by the base LLM
    DIR/runs/{self-output,label}/   experiment 1's adapters (metrics.jsonl with the forgetting curve)
    DIR/runs/lora-*/           experiment 2's adapters + LoRA
    DIR/report.md, report.json, plots/, generations/   experiment 1's evaluation (all runs' numbers
                               in report.json); DIR/lora/ experiment 2's evaluation
    DIR/data/train.hearing.{self-output,minimum-change}.targets.jsonl, DIR/runs/hearing/,
    DIR/hearing/, DIR/hearing-real/   experiment 3 (--hearing): its targets, adapter, evaluations
    DIR/demo.json              the plan and each stage's wall time
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import SpeechLLMError
from .labels import label_instruction

STRATEGIES = ("self-output", "label")
"""Experiment 1 (frozen LLM, adapter only): one run per targets strategy, named after it."""
TARGET_STRATEGIES = ("self-output", "label", "minimum-change")
"""Targets files the demo makes (minimum-change is trained in experiment 2 only)."""


@dataclass(frozen=True)
class LoRARun:
    """One run of experiment 2: an adapter and LoRA on the LLM, trained on `strategy`'s targets."""
    name: str
    strategy: str
    replay: bool = False
    """Also train on the pseudo-replay data (`train.replay`)."""


LORA_RUNS = (LoRARun("lora-label", "label"), LoRARun("lora-label-replay", "label", replay=True),
             LoRARun("lora-minimum-change", "minimum-change"), LoRARun("lora-self-output", "self-output"))
"""Experiment 2: the LLM gets LoRA, so text-only abilities can be lost; label targets alone, with
pseudo-replay, minimum-change and self-output targets."""

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

HEARING_QUESTIONS = ("Is the speaker male or female?", "What is the speaker's gender?",
                     "Is the speaker a man or a woman?", "Does this voice belong to a woman or a man?")
"""Experiment 3's gender questions: two of the evaluation's five phrasings and two of its own; the
evaluation's other three ("Is the speaker female or male?", "Is this a man's voice or a woman's
voice?", "Is it a woman or a man speaking?") are never trained, so its accuracy on them is
accuracy on phrasings the speech model never saw."""
HEARING_POOL = [*HEARING_QUESTIONS,
                *(label_instruction(q, order) for q, order in zip(HEARING_QUESTIONS, [("female", "male"),
                                                                                   ("male", "female")] * 2)),
                "What can you hear?", "Describe the speaker's voice.", "What did the speaker say?"]
"""Experiment 3's instructions (`--hearing`): `HEARING_QUESTIONS` bare and with the one-word answer
line the evaluation adds to its questions (both option orders), two open ones whose answers name the
gender too, and the words spoken: eight of eleven ask the gender. With `INSTRUCTION_POOL` a fifth of
the training clips get a gender question, and experiment 1's 100 steps are too few for the frozen LLM
to learn to read the voice from the adapter. Measured (one run each, 400 steps; gender by likelihood /
in the evaluation's phrasings / in those of them training never asked, held-out synthetic clips, then
the real recordings by likelihood / the evaluation's phrasings; transcription 100 - WER held-out):
this pool 97.9 / 87.5 / 85.2%, 13/13 / 12/13, transcription 83.6; without "What did the speaker say?"
100 / 85.4 / 81.5%, 13/13 / 13/13, transcription 74.6; only the first two questions (bare and with the
line) and the two open ones 97.9 / 60.4 / 33.3%, 92.3 / 76.9%, transcription 98.1; the two bare
questions and the two open ones 91.7 / 45.8%; the first two, bare and with the line, and four open
ones 43.8% by likelihood."""
HEARING_STRATEGIES = ("self-output", "minimum-change")
"""Experiment 3's targets files, made in this order; it trains on the last: the teacher's own
answers with only the attribute words the labels show wrong replaced."""
HEARING_RUN = "hearing"
"""Experiment 3's run name (its adapter in DIR/runs/hearing, its evaluation in DIR/hearing)."""

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
    eval_batch_size: int = 64
    """Answers per generation batch in the evaluation (and the forgetting curve). A decoding step
    reads every weight for a few rows, so on a CPU more rows per step pay: 128 description
    prompts (48 new tokens, fp32, 2-core AVX2 CPU) took 39.6-42.6 s in batches of 64 against
    55.2-59.1 in 32s and 39.0-40.8 in 128s; earlier, 32 answered 64 forgetting items in 34.7 s
    against 16's 41.8-44.8 (bf16 CPU)."""
    targets_batch_size: int = 32
    """Prompts per generation batch when making targets. The teacher's prompts carry worked
    examples, so their prefill outweighs decoding and more rows per step do not pay: a full demo
    with 64 (2-core AVX2 CPU, fp32) made the self-output targets in 311 s against 286 with 32."""
    fidelity_probe: int = 24
    """Teacher-fidelity probe questions per attribute (`targets.fidelity_probe`); minimum-change
    reads self-output's answers to them (the same teacher asked the same)."""
    real: bool = True
    """Also evaluate on the real recordings of `speechllm.data.real` (gender and transcription)."""
    seed: int = 0
    constraints: list[str] = field(default_factory=lambda: list(DEMO_CONSTRAINTS))
    safety_items: int = 12
    """AdvBench requests asked spoken and typed of every run, and of the base LLM."""
    safety_tokens: int = 64
    """Answer length for safety requests (a refusal shows in its first sentence)."""
    curve_every: int = 50
    """Forgetting curve: every run scores `curve_items` held-out forgetting items this often."""
    curve_items: int = 12
    lora_steps: int = 50
    """Optimizer steps of each experiment-2 run (adapter + LoRA, the same lr and batch)."""
    lora_rank: int = 8
    replay_magpie: int = 32
    """Pseudo-replay: instructions the base LLM writes itself (Magpie) and answers."""
    replay_safety: int = 8
    """Pseudo-replay: training-side AdvBench requests (disjoint from the safety test items) the base
    LLM answers (its own refusals, where it refuses)."""
    replay_ratio: float = 0.1
    """Share of replay examples in each experiment-2 batch with replay."""
    lora_per_task: int = 12
    """Experiment 2's evaluation: audio-task items per task (gender and transcription)."""
    lora_forgetting_items: int = 48
    lora_text_prompts: int = 24
    """Experiment 2's evaluation: IFEval prompts asked as text (the path LoRA can damage)."""
    hearing_steps: int = 400
    """Experiment 3 (`--hearing`): optimizer steps of its one adapter (the same lr and batch)."""
    hearing_per_task: int | None = None
    """Experiment 3's evaluation: held-out items per task (None: every test clip)."""


FULL = DemoPlan(clips=240, steps=100, forgetting_items=144)
QUICK = DemoPlan(clips=48, steps=12, max_target_tokens=48, per_task=4, forgetting_items=12, text_prompts=0,
                 fidelity_probe=8, task_tokens=24, if_tokens=64, safety_items=2, safety_tokens=32, curve_every=12,
                 curve_items=4, lora_steps=6, replay_magpie=4, replay_safety=2, lora_per_task=2,
                 lora_forgetting_items=4, lora_text_prompts=2, hearing_steps=12, hearing_per_task=4)


def demo_dtype(dtype: str, device: str) -> str:
    """`model.llm.dtype` of every stage: `dtype`, or for `auto` bfloat16 where `device` multiplies
    it in hardware (`native_bf16`) and float32 elsewhere."""
    from .model.hardware import native_bf16

    if dtype != "auto":
        return dtype
    return "bfloat16" if native_bf16(device) else "float32"


def targets_file(out: Path, strategy: str, hearing: bool = False) -> Path:
    """Where the demo keeps `strategy`'s training targets (experiment 3's, `hearing`, apart)."""
    return out / "data" / f"train.{'hearing.' if hearing else ''}{strategy}.targets.jsonl"


def demo_config(plan: DemoPlan, strategy: str, out: Path, lora: LoRARun | None = None, dtype: str = "float32",
                hearing: bool = False):
    """The embedded default's config (the dataclass defaults, as configs/default.yaml) with the
    demo's sizes (every override named here) and the LLM in `dtype`: experiment 1's run of
    `strategy`, (`lora`) an experiment-2 run, or (`hearing`) experiment 3's run: `HEARING_POOL`,
    `plan.hearing_steps`, no forgetting curve."""
    from .config import load_config

    steps = plan.lora_steps if lora else plan.hearing_steps if hearing else plan.steps
    name = lora.name if lora else HEARING_RUN if hearing else strategy
    overrides = [
        f"model.llm.system_prompt={SYSTEM_PROMPT}", f"model.llm.dtype={dtype}",
        f"targets.strategy={strategy}",
        f"targets.instruction_pool={json.dumps(HEARING_POOL if hearing else INSTRUCTION_POOL)}",
        f"targets.batch_size={plan.targets_batch_size}", f"targets.fidelity_probe={plan.fidelity_probe}",
        f"train.data={targets_file(out, strategy, hearing)}", f"train.out_dir={out / 'runs' / name}",
        f"train.max_steps={steps}", f"train.batch_size={plan.batch_size}", f"train.lr={plan.lr}",
        f"train.warmup_steps={min(plan.warmup_steps, steps // 2)}",
        f"train.max_target_tokens={plan.max_target_tokens}",
        "train.eval_fraction=0.1", f"train.eval_every={max(steps // 4, 1)}",
        f"train.save_every={max(steps // 2, 1)}", "train.log_every=5", f"train.seed={plan.seed}",
        f"train.forgetting_every={0 if hearing else min(plan.curve_every, steps)}",
        f"train.forgetting_items={plan.curve_items}",
        f"train.forgetting_data={out / 'data' / 'test.metadata.jsonl'}",
        f"eval.constraints={json.dumps(plan.constraints)}",
        f"eval.if_max_new_tokens={plan.if_tokens}", f"eval.batch_size={plan.eval_batch_size}", f"eval.seed={plan.seed}",
    ]
    if strategy == "minimum-change":  # the same teacher, prompts and seeds: its self-outputs are the self-output file's
        overrides.append(f"targets.self_output_file={targets_file(out, 'self-output', hearing)}")
    if lora:
        overrides += ["train.lora.enabled=true", f"train.lora.r={plan.lora_rank}",
                      f"train.lora.alpha={2 * plan.lora_rank}"]
    if lora and lora.replay:
        overrides += [f"train.replay.data={out / 'data' / 'replay.jsonl'}", f"train.replay.ratio={plan.replay_ratio}"]
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


def _eval_config(plan: DemoPlan, real: bool = False, lora: bool = False, hearing: bool = False):
    """The evaluation's settings: every task with the plan's sizes; for the real recordings gender
    and transcription only, with no forgetting, text or safety items (too few clips); for
    experiment 2 (`lora`) fewer audio items and more text prompts (LoRA can change the text path);
    for experiment 3 (`hearing`) gender and transcription on `plan.hearing_per_task` items, nothing else."""
    from .config import EvalConfig

    common = dict(data_format="metadata", max_new_tokens=plan.task_tokens, if_max_new_tokens=plan.if_tokens,
                  batch_size=plan.eval_batch_size, seed=plan.seed, constraints=plan.constraints,
                  text_prompt_set="auto", safety_max_new_tokens=plan.safety_tokens)
    if real or hearing:
        return EvalConfig(tasks=["gender", "transcription"], forgetting_items=0, text_prompts=0, safety_items=0,
                          max_per_task=None if real else plan.hearing_per_task, **common)
    if lora:
        return EvalConfig(tasks=["gender", "transcription"], max_per_task=plan.lora_per_task,
                          forgetting_items=plan.lora_forgetting_items, text_prompts=plan.lora_text_prompts,
                          safety_items=plan.safety_items, **common)
    return EvalConfig(max_per_task=plan.per_task, forgetting_items=plan.forgetting_items,
                      text_prompts=plan.text_prompts, safety_items=plan.safety_items, **common)


def _replay_data(plan: DemoPlan, out: Path, device: str, progress: bool, dtype: str) -> None:
    """Pseudo-replay for experiment 2: training-side AdvBench requests (never a safety test item)
    and Magpie instructions, all answered by the base LLM (`speechllm replay`)."""
    from .eval.safety import write_training_requests
    from .targets.replay import make_replay

    data = out / "data"
    cfg = demo_config(plan, "label", out, dtype=dtype)
    requests = data / "safety.train.txt"
    if not requests.exists():
        try:
            write_training_requests(requests, limit=plan.replay_safety, seed=plan.seed)
        except SpeechLLMError as err:  # AdvBench not fetchable offline: Magpie data only
            print(f"[demo] no safety share in the replay data ({err})", file=sys.stderr)
            requests.write_text("")
    given = requests if requests.read_text().strip() else None
    summary = make_replay(cfg, data / "replay.jsonl", n=plan.replay_magpie, instructions=given, device=device,
                          progress=progress)
    print(summary.line(data / "replay.jsonl"), file=sys.stderr)


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


def run_demo(out: Path, quick: bool = False, device: str = "cpu", progress: bool = True, dtype: str = "auto",
             hearing: bool = False) -> dict:
    """Run (or finish) the demo in `out` with the LLM in `dtype` (see `demo_dtype`), and with
    `hearing` experiment 3; returns the evaluation report (with the teacher's fidelity, the
    real-recordings results and experiment 3 added under `demo`)."""
    from .data.synth import synthesize
    from .eval.suite import run_eval
    from .hub import weights
    from .targets.run import run_targets
    from .targets.nll import target_nll
    plan = QUICK if quick else FULL
    dtype = demo_dtype(dtype, device)
    print(f"[demo] LLM dtype: {dtype}", file=sys.stderr)
    out, t0 = Path(out), time.perf_counter()
    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    stages = Stages(6 + len(TARGET_STRATEGIES) + len(STRATEGIES) + len(LORA_RUNS) + plan.real
                    + (len(HEARING_STRATEGIES) + 3) * hearing)
    stages.run("prepare the embedded models", lambda: [weights.prepare(n) for n in ("smollm2-135m-instruct",
                                                                                    "whisper-tiny.en")])
    stages.run(f"synthesize {plan.clips} labelled clips", lambda: synthesize(data / "synth", n=plan.clips,
                                                                            seed=plan.seed, progress=progress))
    stages.run("annotate train and test clips" + (" and the real recordings" if plan.real else ""),
               lambda: _annotate(data, progress))
    nll = {}
    for strategy in TARGET_STRATEGIES:
        cfg = demo_config(plan, strategy, out, dtype=dtype)
        target = Path(cfg.train.data)

        def targets_stage():
            print(run_targets(data / "train.metadata.jsonl", target, cfg, device=device, progress=progress)
                  .line(target), file=sys.stderr)
            return target_nll(target, cfg, device=device, progress=progress)
        nll[strategy] = stages.run(f"targets: {strategy}", targets_stage)
    stages.run("pseudo-replay data (Magpie + safety requests, answered by the base LLM)",
               lambda: _replay_data(plan, out, device, progress, dtype))
    for strategy in STRATEGIES:
        cfg = demo_config(plan, strategy, out, dtype=dtype)
        stages.run(f"train: {strategy} ({plan.steps} steps x {plan.batch_size}, frozen LLM)",
                   lambda: train_stage(cfg, progress=progress))
    for run in LORA_RUNS:
        cfg = demo_config(plan, run.strategy, out, run, dtype=dtype)
        stages.run(f"train: {run.name} ({plan.lora_steps} steps x {plan.batch_size}, LoRA r={plan.lora_rank})",
                   lambda: train_stage(cfg, progress=progress))
    runs = [out / "runs" / s for s in STRATEGIES]
    report = stages.run("evaluate experiment 1's adapters against the text reference",
                        lambda: run_eval(runs, data / "test.metadata.jsonl", out, _eval_config(plan), device=device,
                                         progress=progress))
    lora = stages.run("evaluate experiment 2 (LoRA) against the text reference",
                      lambda: run_eval([out / "runs" / r.name for r in LORA_RUNS], data / "test.metadata.jsonl",
                                       out / "lora", _eval_config(plan, lora=True), device=device, progress=progress))
    real = None
    if plan.real and (data / "real.metadata.jsonl").exists():
        real = stages.run("evaluate experiment 1's adapters on real recordings",
                          lambda: run_eval(runs, data / "real.metadata.jsonl", out / "real", _eval_config(plan, True),
                                           device=device, progress=progress))
    heard = _hearing(plan, out, stages, device, progress, dtype) if hearing else None
    report = _add_demo_sections(report, out, data, real, lora, nll, heard)
    total = round(time.perf_counter() - t0, 1)
    (out / "demo.json").write_text(json.dumps({"plan": asdict(plan), "quick": quick, "hearing": hearing,
                                               "dtype": dtype,
                                               "stage_seconds": stages.times, "total_seconds": total}, indent=2) + "\n")
    print(f"\n[demo] done in {total / 60:.1f} min; stage times: "
          + ", ".join(f"{k} {v:.0f} s" for k, v in stages.times.items()), file=sys.stderr)
    return report


@dataclass
class Heard:
    """Experiment 3's results."""
    held_out: dict
    """The evaluation report on the held-out clips (the hearing run and experiment 1's self-output)."""
    real: dict | None
    """The same on the real recordings (None without them)."""
    accuracy: dict
    """Gender by likelihood and as training asked it, `_gender_by_likelihood`'s
    {"likelihood": {split: {run: ...}}, "as_trained": {split: {run: {question: ...}}}}."""
    by_phrasing: dict
    """{split: {run: {"trained": ..., "untrained": ...}}}: `_gender_by_phrasing` of each evaluation."""


def _hearing(plan: DemoPlan, out: Path, stages: Stages, device: str, progress: bool, dtype: str) -> Heard:
    """Experiment 3: targets from `HEARING_POOL` (`HEARING_STRATEGIES`), one adapter trained
    `plan.hearing_steps` steps on the last (frozen LLM), evaluated beside experiment 1's self-output
    adapter on gender and transcription on the held-out clips and on the real recordings, generated
    and by likelihood."""
    from .eval.predictions import PREDICTIONS_FILE
    from .eval.suite import run_eval
    from .targets.run import run_targets

    data = out / "data"
    configs = {strategy: demo_config(plan, strategy, out, dtype=dtype, hearing=True) for strategy in HEARING_STRATEGIES}
    for strategy, cfg in configs.items():
        target = Path(cfg.train.data)
        stages.run(f"targets: {strategy}, experiment 3's instructions (eight of eleven ask the gender)",
                   lambda: print(run_targets(data / "train.metadata.jsonl", target, cfg, device=device,
                                             progress=progress).line(target), file=sys.stderr))
    trained_on = HEARING_STRATEGIES[-1]
    stages.run(f"train: {HEARING_RUN} ({plan.hearing_steps} steps x {plan.batch_size}, frozen LLM, {trained_on} "
               "targets)", lambda: train_stage(configs[trained_on], progress=progress))
    runs = [out / "runs" / HEARING_RUN, out / "runs" / "self-output"]

    splits = {"held_out": data / "test.metadata.jsonl"}
    if plan.real and (data / "real.metadata.jsonl").exists():
        splits["real"] = data / "real.metadata.jsonl"
    folders = {"held_out": out / HEARING_RUN, "real": out / f"{HEARING_RUN}-real"}

    def evaluate():
        return {split: run_eval(runs, meta, folders[split], _eval_config(plan, real=split == "real", hearing=True),
                                device=device, progress=progress) for split, meta in splits.items()}
    reports = stages.run("evaluate experiment 3 (gender and transcription, held-out and real clips)", evaluate)
    accuracy = stages.run("experiment 3: gender by likelihood and as training asked it (held-out and real clips)",
                          lambda: _gender_by_likelihood(runs, splits, out / HEARING_RUN / LIKELIHOOD_FILE, device))
    by_phrasing = {split: _gender_by_phrasing(folders[split] / PREDICTIONS_FILE, HEARING_QUESTIONS) for split in splits}
    return Heard(reports["held_out"], reports.get("real"), accuracy, by_phrasing)


def _gender_by_phrasing(predictions: Path, trained: tuple[str, ...]) -> dict:
    """{system: {"trained": ..., "untrained": ...}}: the evaluation's generated gender answers
    (`predictions`, its predictions.jsonl) split by whether the item's phrasing (its question
    without the answer-format line) is one training asked; each an `AttributeAccuracy` as JSON
    (items, accuracy, 95% interval, chance, the share of the commonest label)."""
    import numpy as np

    from .eval.likelihood import summarize
    from .eval.predictions import read_predictions
    from .labels import ATTRIBUTES

    phrasings = ATTRIBUTES["gender"].phrasings
    scored: dict[str, dict[str, list[tuple[float, str]]]] = {}
    for row in read_predictions(predictions):
        asked = next((p for p in phrasings if row["instruction"].startswith(p)), None)
        if row["task"] != "gender" or asked is None:
            continue
        group = "trained" if asked in trained else "untrained"
        scored.setdefault(row["system"], {"trained": [], "untrained": []})[group].append(
            (float(bool(row["score"]["correct"])), str(row["target"]).lower()))
    return {system: {group: summarize("gender", group, [t for _, t in items], np.array([x for x, _ in items]))
                     .to_json() for group, items in groups.items()}
            for system, groups in scored.items()}


LIKELIHOOD_FILE = "gender_by_likelihood.json"
"""Experiment 3's gender accuracy by likelihood and as asked in training, per split and run (in
DIR/hearing/)."""


def _gender_by_likelihood(runs: list[Path], splits: dict[str, Path], path: Path, device: str) -> dict:
    """Gender accuracy of each run on each split, {"likelihood": {split: {run: ...}}, "as_trained":
    {split: {run: {question: ...}}}}: by likelihood, and generated for each of `HEARING_POOL`'s gender
    questions as training asked them (no answer-format line; `speechllm.eval.likelihood`); saved to
    `path` with what made it (the adapters', the clips' and the questions' digests) and read back
    while that matches."""
    from .eval.items import read_metadata
    from .eval.likelihood import accuracy_as_asked, accuracy_by_likelihood, clip_states
    from .hub.weights import sha256_file
    from .io.jsonl import json_digest, read_saved_json, write_json_atomic
    from .model.speechllm import SpeechLLM

    questions = list(HEARING_QUESTIONS)
    identity = json_digest({"adapters": {r.name: sha256_file(r / "adapter.safetensors") for r in runs},
                            "clips": {split: sha256_file(meta) for split, meta in splits.items()},
                            "questions": questions})
    saved = read_saved_json(path, "identity", identity)
    if saved is not None:
        return saved["accuracy"]
    result: dict[str, dict] = {kind: {split: {} for split in splits} for kind in ("likelihood", "as_trained")}
    for run in runs:
        model = SpeechLLM.from_pretrained(run, device=device).eval()
        for split, meta in splits.items():
            records = read_metadata(meta)
            states = {r.id: clip_states(model, meta.parent / r.audio) for r in records}
            result["likelihood"][split][run.name] = accuracy_by_likelihood(model, records, meta.parent, "gender",
                                                                           states=states).to_json()
            result["as_trained"][split][run.name] = {
                q: accuracy_as_asked(model, records, meta.parent, "gender", q, states=states).to_json()
                for q in questions}
        del model
    write_json_atomic(path, {"accuracy": result, "identity": identity})
    return result


def _hearing_summary(heard: Heard) -> dict:
    """Experiment 3 per split and checkpoint (the hearing run, and experiment 1's self-output
    adapter beside it): gender and transcription with intervals, chance, majority and the
    reference, gender by likelihood (`gender_likelihood`), generated for the training's gender
    questions (`gender_as_trained`, by question) and the evaluation's gender items split by whether
    training asked their phrasing (`gender_by_phrasing`: trained, untrained)."""
    splits = {"held_out": heard.held_out, **({"real": heard.real} if heard.real else {})}
    return {split: {name: {**_task_summary(ck),
                           "gender_likelihood": heard.accuracy["likelihood"][split][name],
                           "gender_as_trained": heard.accuracy["as_trained"][split][name],
                           "gender_by_phrasing": heard.by_phrasing[split].get(name)}
                    for name, ck in rep["checkpoints"].items()}
            for split, rep in splits.items()}


def _add_demo_sections(report: dict, out: Path, data: Path, real: dict | None, lora: dict, nll: dict,
                       heard: Heard | None = None) -> dict:
    """The evaluation report with the demo's own findings added (report.json under `demo`,
    report.md as sections): the teacher's fidelity to its descriptions per attribute, each
    adapter's accuracy on the real recordings, each targets file's NLL under the base LLM
    (`strategies`), and experiment 2's runs (their entries under `checkpoints`, evaluated in
    lora/ on fewer audio items; `experiments` says which run belongs where)."""
    from .eval.report import write_report
    from .io.jsonl import write_json_atomic
    from .targets.fidelity import Fidelity
    from .targets.run import fidelity_path

    fidelity = {}
    for strategy in TARGET_STRATEGIES:
        path = fidelity_path(data / f"train.{strategy}.targets.jsonl")
        if path.exists():
            fidelity[strategy] = Fidelity.from_json(json.loads(path.read_text())).to_json()
    report["strategies"] = {s: {"target_nll": r["nll"], "target_tokens": r["tokens"], "records": r["records"]}
                            for s, r in nll.items()}
    report["experiments"] = {
        "frozen": {"runs": list(STRATEGIES), "report": "report.json", "lora": False},
        "lora": {"runs": [r.name for r in LORA_RUNS], "report": "lora/report.json", "lora": True,
                 "targets": {r.name: r.strategy for r in LORA_RUNS},
                 "replay": {r.name: r.replay for r in LORA_RUNS}}}
    if heard:
        path = fidelity_path(targets_file(out, HEARING_STRATEGIES[-1], hearing=True))
        if path.exists():
            fidelity["hearing"] = Fidelity.from_json(json.loads(path.read_text())).to_json()
        report["experiments"]["hearing"] = {"runs": [HEARING_RUN], "report": f"{HEARING_RUN}/report.json",
                                            "lora": False, "instruction_pool": HEARING_POOL}
    report["demo"] = {"teacher_fidelity": fidelity, "real": _real_summary(real) if real else None,
                      "lora": _lora_summary(lora), "hearing": _hearing_summary(heard) if heard else None}
    write_report(report, out)  # report.md and plots: experiment 1 (its task set); lora/ has experiment 2's
    report["checkpoints"].update(lora["checkpoints"])
    if heard:
        report["checkpoints"][HEARING_RUN] = heard.held_out["checkpoints"][HEARING_RUN]
    write_json_atomic(out / "report.json", report)
    with open(out / "report.md", "a") as f:
        f.write("\n" + "\n".join(demo_lines(report["demo"], report["strategies"])) + "\n")
    return report


def _lora_summary(lora: dict) -> dict:
    """Experiment 2 per run: text retention (IFEval prompt-level strict, KL), forgetting delta,
    safety (spoken and typed), the curve and gender accuracy, each with its interval."""
    def pick(d: dict | None, *keys):
        return {k: d.get(k) for k in keys} if d else None

    out = {}
    for name, ck in lora["checkpoints"].items():
        ifeval = (ck.get("text_retention") or {}).get("ifeval") or {}
        out[name] = {"kl": (ck.get("text_retention") or {}).get("kl"),
                     "ifeval": pick(ifeval, "prompts", "prompt_accuracy_strict", "prompt_accuracy_strict_base",
                                    "instruction_accuracy_strict", "instruction_accuracy_strict_base",
                                    "identical_answers"),
                     "forgetting": pick(ck.get("forgetting"), "ifrate", "ifrate_ref", "delta", "ci_low", "ci_high"),
                     "safety": ck.get("safety"), "safety_text": ck.get("safety_text"), "curve": ck.get("curve"),
                     "gender": pick(ck["tasks"].get("gender"), "accuracy", "ci_low", "ci_high"),
                     "transcription": pick(ck["tasks"].get("transcription"), "accuracy", "contains")}
    return out


SUMMARY_KEYS = ("items", "accuracy", "ci_low", "ci_high", "accuracy_ref", "chance", "majority", "contains",
                "contains_ref", "fidelity_ref")
"""What the demo's own sections keep of each task's scores."""


def _task_summary(checkpoint: dict) -> dict:
    """{task: its `SUMMARY_KEYS`} of one checkpoint's entry in an evaluation report."""
    return {task: {k: t.get(k) for k in SUMMARY_KEYS} for task, t in checkpoint["tasks"].items()}


def _real_summary(real: dict) -> dict:
    """Per checkpoint and task: accuracy with its interval, and the reference's (from the real
    recordings' report)."""
    return {name: _task_summary(ck) for name, ck in real["checkpoints"].items()}


def demo_lines(demo: dict, strategies: dict | None = None) -> list[str]:
    """The report.md sections of the demo's own findings."""
    lines = []
    if strategies:
        lines += ["## Target NLL", "", "Mean per-token NLL of each targets file under the base LLM reading the "
                  "description (lower: closer to the model's own words).", "",
                  "| strategy | NLL (nats/token) | tokens |", "|---|---|---|"]
        lines += [f"| {s} | {v['target_nll']:.3f} | {v['target_tokens']} |" for s, v in strategies.items()
                  if v.get("target_nll") is not None]
        lines.append("")
    if demo.get("lora"):
        lines += _lora_lines(demo["lora"])
    for strategy, fid in demo["teacher_fidelity"].items():  # experiment 3's teacher is in its own section
        attrs = fid["attributes"]
        prompt = f"{fid['examples']} worked examples" if fid["examples"] else "zero-shot"
        lines += ["## Teacher fidelity", "",
                  f"How often the teacher (the frozen LLM making the `{strategy}` targets, {prompt}) answers what the "
                  "description it reads says (probe questions on the training descriptions; transcript: the "
                  "answer contains it).", "", "| attribute | agreed | fidelity |", "|---|---|---|"]
        lines += [f"| {a} | {v['agreed']}/{v['asked']} | {100 * v['fidelity']:.0f}% |" for a, v in attrs.items()]
        lines.append("")
        break  # one teacher: every LLM strategy asks the same model the same way
    if demo.get("hearing"):
        lines += _hearing_lines(demo["hearing"], (demo["teacher_fidelity"].get("hearing") or {}).get("attributes"))
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


def _lora_lines(lora: dict) -> list[str]:
    """Experiment 2's table: what each LoRA run kept of the text path, of safety and of format
    following from audio."""
    def ci(d: dict | None, key: str = "delta", scale: float = 1.0, fmt: str = "+.3f") -> str:
        if not d or d.get(key) is None:
            return "–"
        if d.get("ci_low") is None:
            return f"{scale * d[key]:{fmt}}"
        return f"{scale * d[key]:{fmt}} [{scale * d['ci_low']:{fmt}}, {scale * d['ci_high']:{fmt}}]"

    lines = ["## Experiment 2: LoRA on the LLM", "",
             "The LLM gets LoRA, so the text path itself can forget. Text: IFEval prompts asked as text "
             "(instruction-level strict %, run / base LLM) and KL of next-token distributions against the base LLM. "
             "Forgetting: delta of format following from audio. Safety: refusal rate minus the base LLM's (spoken; "
             "typed).", "",
             "| run | text IFEval (instr. strict %) | KL | forgetting delta | safety spoken | safety typed "
             "| gender % |",
             "|---|---|---|---|---|---|---|"]
    for name, r in lora.items():
        ife = r.get("ifeval") or {}
        text = "–"
        if ife.get("instruction_accuracy_strict") is not None:
            ours, base = ife["instruction_accuracy_strict"], ife["instruction_accuracy_strict_base"]
            text = f"{100 * ours:.1f} / {100 * base:.1f}"
        kl = "–" if r.get("kl") is None else f"{r['kl']:.4f}"
        lines.append(f"| {name} | {text} | {kl} | {ci(r.get('forgetting'))} | {ci(r.get('safety'))} | "
                     f"{ci(r.get('safety_text'))} | {ci(r.get('gender'), 'accuracy', 100, '.1f')} |")
    return lines + [""]


def _hearing_lines(hearing: dict, fidelity: dict | None) -> list[str]:
    """Experiment 3's table: gender and transcription of the hearing run beside experiment 1's
    self-output adapter, on held-out synthetic clips and real recordings."""
    split_names = {"held_out": "held-out synthetic", "real": "real recordings"}
    teacher = (f"; the teacher's gender fidelity on these targets' descriptions: {fidelity['gender']['agreed']}/"
               f"{fidelity['gender']['asked']}" if fidelity and "gender" in fidelity else "")
    lines = ["## Experiment 3: hearing", "",
             "One adapter on the frozen LLM, trained on minimum-change targets (the teacher's own answers, "
             "the attribute words the labels show wrong replaced) from a pool where eight of its eleven instructions "
             "ask the gender, for 4x experiment 1's steps; beside it experiment 1's self-output adapter. Accuracy %, "
             f"95% interval{teacher}:", "",
             "| clips | task | items | chance | majority | " + " | ".join(next(iter(hearing.values())))
             + " | reference |", "|---|---|---|---|---|" + "---|" * (len(next(iter(hearing.values()))) + 1)]
    for split, runs in hearing.items():
        where = split_names.get(split, split)

        def row(task: str, cells: list[dict], chance, majority, reference="–") -> str:
            return (f"| {where} | {task} | {cells[0]['items']} | {_pct(chance)} | {_pct(majority)} | "
                    + " | ".join(f"{_pct(c['accuracy'])} [{_pct(c['ci_low'])}, {_pct(c['ci_high'])}]"
                                 for c in cells) + f" | {reference} |")

        first = next(iter(runs.values()))
        for task, t in first.items():
            if task in ("gender_likelihood", "gender_as_trained", "gender_by_phrasing"):
                continue
            lines.append(row(task, [r[task] for r in runs.values()], t["chance"], t["majority"],
                             _pct(t["accuracy_ref"])))
            if task != "gender":
                continue
            for group, said in (("trained", "training asked"), ("untrained", "training never asked")):
                if all(r["gender_by_phrasing"] and r["gender_by_phrasing"][group]["items"] for r in runs.values()):
                    cells = [r["gender_by_phrasing"][group] for r in runs.values()]
                    lines.append(row(f"gender, the evaluation's phrasings {said}", cells, t["chance"],
                                     cells[0]["majority"]))
            cells = [r["gender_likelihood"] for r in runs.values()]
            lines.append(row("gender, by likelihood", cells, cells[0]["chance"], cells[0]["majority"]))
            for question in first["gender_as_trained"]:
                cells = [r["gender_as_trained"][question] for r in runs.values()]
                lines.append(row(f"gender, asked \"{question}\"", cells, cells[0]["chance"], cells[0]["majority"]))
    lines += ["", "By likelihood: for each clip the question \"Is the speaker male or female?\" with both "
              "answers (\"The speaker is male.\" / \"... female.\") as targets; the likelier one is the model's "
              "answer (no decoding, so how it words an answer, or how it follows the evaluation's one-word answer "
              "line, does not hide what it hears). Asked \"...\": generated answers to a question as training asked "
              "it (no one-word answer line), every clip of the split; the `gender` row asks in the evaluation's "
              "varied phrasings with that line, and the two rows after it split those items by whether training "
              "asked their phrasing (the phrasings it never asked show whether hearing carries over to new "
              "wording)."]
    return lines + [""]
