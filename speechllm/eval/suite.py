"""The evaluation suite: audio tasks, forgetting (Speech-IFEval style) and text-only retention
for one or more checkpoints against the text reference, in one resumable run.

    out/
      tasks.jsonl               the audio task items (audio paths relative to out/)
      tasks.errors.jsonl        items left out, with the reason (bad audio, malformed line)
      forgetting.jsonl          task questions + one format constraint each
      annotations.jsonl         descriptions made for items that came without one
      generations/NAME.jsonl    every answer of every system, keyed "task:ID", "if:ID", "text:KEY"
      generations/NAME.json     what produced them (a different checkpoint or setting starts afresh)
      safety/items.jsonl        the harmful requests asked (`safety`), safety/audio/ their spoken form
      generations/NAME.safety.jsonl   every answer to them (spoken and typed; the reference's typed)
      predictions.jsonl         every system's answer to every item with its score (`predictions`)
      report.json, report.md, plots/*.png

Every answer is appended as soon as its batch finishes, so an interrupted run resumes where it
stopped. Systems: each checkpoint (audio input; its text path for the text checks) and, per
base LLM, the reference (the base LLM reading the clip's description; plain text prompts for
the text checks).

This module runs the parts: `items` (what is asked), `generations` (the answer cache),
`scoring` (the numbers), `report` (the files).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from ..config import EvalConfig, GenerationConfig
from ..io.jsonl import json_digest
from .generations import Generations, kept_finished
from .items import DATA_FORMATS, EvalError, EvalSet, load_eval_set
from .predictions import PREDICTIONS_FILE, benchmark_of, following_score, row, write_predictions
from .safety import SafetySet, load_safety_set, read_request_file
from .scoring import CheckpointScores, compare_checkpoints, forgetting_curve, score_checkpoint, training_summary

if TYPE_CHECKING:
    from ..model.speechllm import SpeechLLM
    from .answer import Reference

__all__ = ["DATA_FORMATS", "EvalError", "checkpoint_names", "run_eval"]

REFERENCE_NAME = "reference"
"""The text reference's name in the report (no checkpoint may be called so)."""
GENERATIONS_DIR = "generations"
"""Folder of the answer caches inside the output folder."""
GENERATIONS_FORMAT = 1
"""Version of the answer cache's identity; a change makes every saved answer stale."""
DIGEST_CHARS = 10
"""Hex digits of the reference identity's hash in its name."""
REFERENCE_SCORES = ("accuracy_ref", "ref_ci_low", "ref_ci_high", "accuracy_ref_strict", "wer_ref", "contains_ref",
                    "fidelity_ref")
"""The reference's own numbers of a task, reported once per reference."""


def checkpoint_names(checkpoints: list[Path]) -> list[str]:
    """Short unique names: folder names, with parents added where two are alike."""
    names = [p.resolve().name for p in checkpoints]
    if len(set(names)) < len(names):
        names = ["-".join(p.resolve().parts[-2:]) for p in checkpoints]
    if len(set(names)) < len(names):
        raise EvalError("the same checkpoint is named twice")
    if REFERENCE_NAME in names:
        raise EvalError(f"a checkpoint folder may not be called '{REFERENCE_NAME}' (the text reference's name)")
    return names


def _digest(obj) -> str:
    return json_digest(obj)[:DIGEST_CHARS]


def _settings(cfg: EvalConfig) -> dict:
    """The decoding settings every answer cache's identity includes."""
    return {"max_new_tokens": cfg.max_new_tokens, "if_max_new_tokens": cfg.if_max_new_tokens, "greedy": True,
            "format": GENERATIONS_FORMAT, **kept_finished(cfg.drop_finished)}


def _generation(cfg: EvalConfig, key: str) -> GenerationConfig:
    """Decoding for a key: audio tasks answer short, forgetting items and text prompts longer."""
    return GenerationConfig(max_new_tokens=cfg.max_new_tokens if key.startswith("task:") else cfg.if_max_new_tokens,
                            drop_finished=cfg.drop_finished)


def run_eval(checkpoints: list[Path], data: Path, out: Path, cfg: EvalConfig, device: str = "cpu",
             progress: bool = True) -> dict:
    """Evaluate every checkpoint against the text reference on `data` (any of `DATA_FORMATS`);
    writes out/report.{json,md} and plots and returns the report. Re-running with the same
    inputs answers nothing again. `device` is a torch device; `progress` shows progress bars."""
    from .report import write_report

    if not checkpoints:
        raise EvalError("name at least one --checkpoint")
    names = checkpoint_names(checkpoints)
    if not (checkpoints[0] / "config.json").exists():
        raise EvalError(f"{checkpoints[0]}: not a speechllm checkpoint (no config.json)")
    first_cfg = json.loads((checkpoints[0] / "config.json").read_text())
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if cfg.safety_items and cfg.safety_file is not None:
        read_request_file(Path(cfg.safety_file))  # a bad --safety-file is reported before any annotation
    es = load_eval_set(data, out, cfg, cfg.asr_model or first_cfg["model"]["encoder"]["name"], progress)
    sset = load_safety_set(cfg, out, progress)
    report: dict = {"data": {"source": str(data), "task_items": len(es.items), "forgetting_items": len(es.fitems),
                             "left_out": es.left_out, "tasks": es.tasks, "text_prompts": len(es.text_by_key),
                             "text_prompt_source": es.text_set.source if es.text_set else None,
                             "safety": sset.summary() if sset else None},
                    "options": asdict(cfg), "references": {}, "checkpoints": {}}
    rows: dict[str, list[dict]] = {}
    passes = {name: evaluate_checkpoint(ckpt, name, es, out, cfg, device, progress, report, rows, sset)
              for name, ckpt in zip(names, checkpoints)}
    write_predictions(out / PREDICTIONS_FILE, [r for system_rows in rows.values() for r in system_rows])
    report["comparisons"] = compare_checkpoints(passes, cfg.bootstrap, cfg.seed)
    report["seconds"] = round(time.perf_counter() - t0, 1)
    write_report(report, out)
    return report


def evaluate_checkpoint(ckpt: Path, name: str, es: EvalSet, out: Path, cfg: EvalConfig, device: str,
                        progress: bool, report: dict, rows: dict[str, list[dict]] | None = None,
                        sset: SafetySet | None = None) -> list[bool]:
    """Answer everything with one checkpoint and its reference (each answer cached), score it,
    add its entries to `report` and its prediction rows (and its reference's, once) to `rows`;
    returns its pass per forgetting item. `sset`: the safety requests (None or empty: no safety
    check, ``safety`` and ``safety_text`` are null)."""
    import torch

    from ..model.speechllm import SpeechLLM
    from .answer import Reference
    from .retention import text_kl
    from .safety import check_lengths as check_safety_lengths
    from .safety import evaluate_safety

    model = SpeechLLM.from_pretrained(ckpt, device=device).eval()
    # the model's own frozen LLM, or with LoRA a fresh copy of the base: the reference and the KL baseline
    reference = Reference.for_model(model)
    model.merge_lora()  # after the reference took a fresh base copy: generation at the frozen model's speed
    _check_lengths(model, reference, es, cfg)
    asks_safety = sset is not None and bool(sset.requests)
    if asks_safety:
        check_safety_lengths(model, reference, sset, cfg)
    ref_name, ref = _reference_generations(model, reference, es, out, cfg, progress)
    sysgen = _checkpoint_generations(model, ckpt, name, ref_name, es, out, cfg, progress, reference, ref)
    safety = (evaluate_safety(model, reference, ckpt, name, ref_name, sset, out / GENERATIONS_DIR, cfg, progress)
              if asks_safety else None)
    kl = text_kl(model, reference.generator.llm)
    scores = score_checkpoint(es, sysgen.answers, ref.answers, cfg)
    meta = json.loads((ckpt / "config.json").read_text())
    report["references"].setdefault(ref_name, {
        "llm": model.config.llm.name,
        "tasks": {t: {k: v[k] for k in REFERENCE_SCORES if k in v} for t, v in scores.tasks.items()},
        "ifrate": scores.forgetting.ifrate_ref if scores.forgetting else None,
        "refusal": safety.text["refusal_ref"] if safety else None})
    ifeval = {k: v for k, v in scores.ifeval.items() if k not in ("rows", "rows_base")} if scores.ifeval else None
    report["checkpoints"][name] = {
        "path": str(ckpt), "reference": ref_name, "lora": meta.get("lora"), "tasks": scores.tasks,
        "forgetting": scores.forgetting.to_dict() if scores.forgetting else None,
        "text_retention": {**kl, "ifeval": ifeval}, "safety": safety.spoken if safety else None,
        "safety_text": safety.text if safety else None, "training": training_summary(ckpt),
        "curve": forgetting_curve(ckpt)}
    if rows is not None:
        rows[name] = prediction_rows(name, es, sysgen.answers, scores, base=False) + (safety.rows if safety else [])
        rows.setdefault(ref_name, prediction_rows(ref_name, es, ref.answers, scores, base=True)
                        + (safety.rows_ref if safety else []))
    del model, reference
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return scores.passes


def _check_lengths(model: "SpeechLLM", reference: "Reference", es: EvalSet, cfg: EvalConfig) -> None:
    """Every prompt (the speech model's and the reference's) leaves room for its answer in the
    LLM's context; else an EvalError naming the first key that does not, before anything is asked."""
    from ..io.audio import SAMPLE_RATE
    from ..model.speechllm import LengthError
    from .answer import reference_prompt

    for keys, _ in es.groups:
        for key in keys:
            item, instruction = es.item(key), es.instruction(key)
            seconds = len(es.audio[item.audio]) / SAMPLE_RATE if item else None
            speech = model.prompt_length(instruction, item.transcript if item else None, item is not None, seconds)
            text = reference_prompt(item.description, instruction) if item else instruction
            try:
                model.check_length(max(speech, len(reference.generator.prompt_ids(text))),
                                   _generation(cfg, key).max_new_tokens, key)
            except LengthError as err:
                raise EvalError(f"{err} (eval.max_new_tokens / eval.if_max_new_tokens set the answer's room)") from None


def _reference_generations(model: "SpeechLLM", reference: "Reference", es: EvalSet, out: Path, cfg: EvalConfig,
                           progress: bool) -> tuple[str, Generations]:
    """The reference's answers to every key (cached per base LLM and settings), with its name."""
    from ..model.llm import llm_identity

    identity = {**llm_identity(model.config.llm), **_settings(cfg)}
    name = f"{REFERENCE_NAME}-{_digest(identity)}"
    ref = Generations(out / GENERATIONS_DIR, name, identity)

    def length(key: str) -> int:
        item = es.item(key)
        return len(es.instruction(key)) + (len(item.description or "") if item else 0)

    for keys, desc in es.groups:
        ref.fill(keys, length, lambda chunk, rows: _reference_answers(reference, chunk, es,
                                                                      _generation(cfg, chunk[0]), rows),
                 cfg.batch_size, desc, progress, asked=es.asked)
    return name, ref


def _reference_answers(reference: "Reference", chunk: list[str], es: EvalSet, gen: GenerationConfig,
                       rows: int) -> list[str]:
    """The reference's answers to one chunk of keys, at most `rows` at once: description +
    instruction for audio items, the prompt as it is for text prompts (a chunk never mixes the two)."""
    instructions = [es.instruction(k) for k in chunk]
    if es.item(chunk[0]) is None:
        return [g.text for g in reference.answer_text(instructions, gen, rows)]
    return [g.text for g in reference.answer([es.item(k).description for k in chunk], instructions, gen,
                                             rows)]


def _checkpoint_generations(model: "SpeechLLM", ckpt: Path, name: str, ref_name: str, es: EvalSet, out: Path,
                            cfg: EvalConfig, progress: bool, reference: "Reference", ref: Generations) -> Generations:
    """The checkpoint's answers to every key (cached per adapter weights and settings): audio and
    ASR transcript with the instruction for audio items, the text path for text prompts; where
    that text path is the base LLM itself (`text_path_is_reference`: a frozen LLM, no LoRA) the
    text prompts take the reference's answers (`ref`) instead of being generated again."""
    from ..hub import weights
    from ..model.speechllm import Example
    from .answer import speech_answers, text_path_is_reference

    identity = {"checkpoint": str(ckpt.resolve()), "adapter_sha256": weights.sha256_file(ckpt / "adapter.safetensors"),
                "reference": ref_name, **_settings(cfg)}
    sysgen = Generations(out / GENERATIONS_DIR, name, identity)

    def example(key: str) -> Example:
        item = es.item(key)
        return Example(instruction=es.instruction(key), audio=es.audio[item.audio] if item else None,
                       transcript=item.transcript if item else None, id=key)

    def length(key: str) -> int:  # LLM positions: batches of similar prompt lengths pad little
        return model.example_positions(example(key))

    def answer(chunk: list[str], rows: int) -> list[str]:
        return speech_answers(model, [example(k) for k in chunk], _generation(cfg, chunk[0]), rows)

    def the_reference(chunk: list[str], rows: int) -> list[str]:
        return [ref.answers[k] for k in chunk]

    text_is_reference = text_path_is_reference(model, reference, [es.instruction(k) for k in es.text_keys])
    for keys, desc in es.groups:
        same = keys == es.text_keys and text_is_reference  # the text prompts; audio items never match
        sysgen.fill(keys, length, the_reference if same else answer, cfg.batch_size,
                    f"{desc} (the reference's: the same text path)" if same else desc, progress, asked=es.asked)
    return sysgen


def prediction_rows(system: str, es: EvalSet, answers: dict[str, str], scores: CheckpointScores,
                    base: bool) -> list[dict]:
    """The `predictions` rows of one system: its answers and scores (the reference's when `base`)."""
    from .official import constraint_instruction
    from .tasks import score_item

    out = []
    for it in es.items:
        k = f"task:{it.id}"
        score = score_item(it, answers[k]) if it.answer_kind != "free" else None
        out.append(row(benchmark_of(it.source), system, k, it.task, it.instruction, answers[k], it.reference, score))
    passes = scores.passes_ref if base else scores.passes
    for f, k, ok in zip(es.fitems, es.if_keys, passes):
        iid = constraint_instruction(f.constraint)[0]
        checker = iid if iid.startswith("speechllm:") else f"ifeval:{iid}"
        out.append(row("forgetting", system, k, f.task, f.instruction, answers[k], None,
                       following_score([iid], [ok], checkers=[checker])))
    if scores.ifeval:
        bench = "ifeval-builtin" if es.text_set.source == "builtin" else "ifeval"
        for r in scores.ifeval["rows_base" if base else "rows"]:
            k = f"text:{r['key']}"
            checkers = [i if i.startswith("speechllm:") else f"ifeval:{i}" for i in r["instruction_id_list"]]
            out.append(row(bench, system, k, None, es.instruction(k), answers[k], None,
                           following_score(r["instruction_id_list"], r["strict"], r["loose"], checkers)))
    return out
