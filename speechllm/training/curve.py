"""The forgetting curve: instruction following from audio, scored while the adapter trains.

With `train.forgetting_every=N` (and `train.forgetting_data`, a held-out metadata.jsonl such as
the evaluation's test clips), a fixed set of forgetting items is answered every N optimizer steps
and at the last step, greedily and in batches, by the speech model as it is at that step (audio
and ASR transcript + question + constraint), and scored by the evaluation's checkers:

    IFrate = share of the items whose answer follows its constraint
    delta  = (IFrate - IFrate_ref) / IFrate_ref

The items are the evaluation's own (`speechllm.eval.items`): the metadata's task items, then a
seeded sample of `train.forgetting_items` of them, each a task question plus a constraint drawn
from `eval.constraints` (default: every kind), seeded by `eval.seed`, phrased as `eval.vary_phrasing`
says, answered in up to `eval.if_max_new_tokens` tokens, `eval.batch_size` at a time. The reference
(the same base LLM reading each clip's description) is answered once, at the start of training,
and kept in the run folder (`REFERENCE_FILE`, with the identity of what it answered), so a resumed
run reads it instead of asking again.

Scoring leaves training untouched: the adapter is switched to eval mode, decoding is greedy (no
random numbers drawn), and training mode is restored after; a run with the curve ends with the
weights of a run without it. Each scoring's rows go to metrics.jsonl ({"step", "ifrate",
"ifrate_ref", "delta"}) and TensorBoard.

The adapter of the best-scoring step (highest IFrate, so best delta; the later step on a tie) is
kept in `<out_dir>/best/` (a loadable checkpoint folder whose config.json records its step and
scores) and in every trainer checkpoint, so a resume restores the best so far with the rest of
the state. `train.keep_best=forgetting` makes it the run's final adapter (`<out_dir>/adapter.safetensors`,
what `speechllm eval` and `chat` load); the last step's weights stay in the last checkpoint under
`checkpoints/` (a resume, e.g. with more steps, continues from there).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..config import Config, EvalConfig, GenerationConfig
from ..errors import SpeechLLMError
from ..io.jsonl import json_digest, read_saved_json, write_json_atomic

if TYPE_CHECKING:
    import numpy as np

    from ..eval.items import ForgettingItem
    from ..model.speechllm import SpeechLLM
    from ..records import TaskItem

REFERENCE_FILE = "forgetting_reference.json"
"""The reference's answers and passes on the curve's items, in the run folder."""
REFERENCE_FORMAT = 1
"""Version of the reference file's identity; a change makes a saved one stale."""
BEST_DIR = "best"
"""The adapter of the best-scoring step, in the run folder and in each trainer checkpoint."""
CURVE_KEYS = ("ifrate", "ifrate_ref", "delta")
"""The metrics.jsonl keys of a curve row (besides "step")."""


class CurveError(SpeechLLMError, ValueError):
    """The forgetting curve cannot be set up (no data file, no usable items, a clip that cannot be read)."""


@dataclass
class CurvePoint:
    step: int
    ifrate: float
    ifrate_ref: float
    delta: float | None

    def row(self) -> dict:
        return {"step": self.step, "ifrate": round(self.ifrate, 5), "ifrate_ref": round(self.ifrate_ref, 5),
                "delta": None if self.delta is None else round(self.delta, 5)}


def eval_settings(cfg: Config) -> EvalConfig:
    """The evaluation settings the curve's items are drawn with (`eval.*`, and
    `train.forgetting_items` items)."""
    return dataclasses.replace(cfg.eval, data_format="metadata", forgetting_items=cfg.train.forgetting_items,
                               text_prompts=0)


def curve_items(data: Path, ecfg: EvalConfig) -> tuple[list["ForgettingItem"], dict[str, "TaskItem"],
                                                       dict[str, "np.ndarray"]]:
    """(forgetting items, their task items by id, waveform by audio path) drawn from the metadata
    file `data` as the evaluation draws them (audio paths relative to its folder)."""
    from ..eval.items import EvalError, MAX_AUDIO_SECONDS, forgetting_items, read_items
    from ..io.audio import AudioError, load_audio

    if not data.is_file():
        raise CurveError(f"train.forgetting_data: {data}: no such metadata file (held-out clips from "
                         "`speechllm annotate`)")
    try:
        items, _ = read_items(data, data.parent, ecfg)
        fitems = forgetting_items([it for it in items if it.description], ecfg)
    except EvalError as err:
        raise CurveError(f"train.forgetting_data: {err}") from None
    if not fitems:
        raise CurveError(f"train.forgetting_data: {data}: no clip gives a forgetting item (a labelled attribute "
                         "or a transcript and a description are needed)")
    by_id = {it.id: it for it in items}
    audio = {}
    for f in fitems:
        path = by_id[f.base].audio
        if path not in audio:
            try:
                audio[path] = load_audio(data.parent / path, max_seconds=MAX_AUDIO_SECONDS)
            except AudioError as err:
                raise CurveError(f"train.forgetting_data: {err}") from None
    return fitems, by_id, audio


def _identity(model: "SpeechLLM", fitems: list["ForgettingItem"], by_id: dict[str, "TaskItem"],
              ecfg: EvalConfig) -> dict:
    from ..model.llm import llm_identity

    asked = [[f.id, f.instruction, by_id[f.base].description] for f in fitems]
    return {"format": REFERENCE_FORMAT, **llm_identity(model.config.llm), "max_new_tokens": ecfg.if_max_new_tokens,
            "items": json_digest(asked)}


class ForgettingCurve:
    """The curve's items, the cached reference, and the scoring of the model as it trains."""

    def __init__(self, cfg: Config, model: "SpeechLLM", out: Path, progress: bool = True):
        self.ecfg = eval_settings(cfg)
        self.out, self.progress = out, progress
        self.fitems, self.by_id, self.audio = curve_items(Path(cfg.train.forgetting_data), self.ecfg)
        self.gen = GenerationConfig(max_new_tokens=self.ecfg.if_max_new_tokens, drop_finished=self.ecfg.drop_finished)
        self.identity = _identity(model, self.fitems, self.by_id, self.ecfg)
        self.reference_passes: list[bool] | None = None

    def _passes(self, answers: list[str]) -> list[bool]:
        from ..eval.official import follows_constraint

        return [follows_constraint(f.constraint, a, f.instruction) for f, a in zip(self.fitems, answers)]

    def reference(self, model: "SpeechLLM") -> list[bool]:
        """The reference's passes: read from the run folder, or from a run folder beside it (runs
        trained side by side, as the demo's, share their items and base LLM), when it holds them for
        these items and this LLM; else answered now (the base LLM reading each description) and
        written to the run folder."""
        path = self.out / REFERENCE_FILE
        if self.reference_passes is not None:
            return self.reference_passes
        saved = read_saved_json(path, "identity", self.identity, sorted(self.out.parent.glob(f"*/{REFERENCE_FILE}")))
        if saved is not None:
            self.reference_passes = [bool(p) for p in saved["passes"]]
            return self.reference_passes
        from ..eval.answer import Reference

        reference = Reference.for_model(model)
        gens = reference.answer([self.by_id[f.base].description for f in self.fitems],
                                [f.instruction for f in self.fitems], self.gen, self.ecfg.batch_size)
        answers = [g.text for g in gens]
        self.reference_passes = self._passes(answers)
        write_json_atomic(path, {"identity": self.identity, "ids": [f.id for f in self.fitems], "answers": answers,
                                 "passes": self.reference_passes})
        print(f"[speechllm] forgetting curve: reference IFrate {self.ifrate(self.reference_passes):.3f} on "
              f"{len(self.fitems)} items -> {path}", file=sys.stderr)
        return self.reference_passes

    @staticmethod
    def ifrate(passes: list[bool]) -> float:
        return sum(passes) / len(passes)

    def score(self, model: "SpeechLLM", step: int) -> CurvePoint:
        """The model's IFrate and delta at `step` (answers greedy, in eval mode; the caller
        restores training mode)."""
        from ..eval.answer import speech_answers
        from ..eval.forgetting import relative_delta
        from ..model.speechllm import Example

        ref = self.reference(model)
        model.eval()
        examples = [Example(instruction=f.instruction, audio=self.audio[self.by_id[f.base].audio],
                            transcript=self.by_id[f.base].transcript, id=f.id) for f in self.fitems]
        answers = speech_answers(model, examples, self.gen, self.ecfg.batch_size)
        ifrate, ifrate_ref = self.ifrate(self._passes(answers)), self.ifrate(ref)
        return CurvePoint(step, ifrate, ifrate_ref, relative_delta(ifrate, ifrate_ref))


def best_of(folder: Path) -> dict | None:
    """The scores and step of the best adapter kept in `folder/best` (None when none is)."""
    from ..model.speechllm import CHECKPOINT_CONFIG

    try:
        meta = json.loads((folder / BEST_DIR / CHECKPOINT_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    best = meta.get("forgetting_curve") if isinstance(meta, dict) else None
    return best if isinstance(best, dict) else None


def copy_best(src: Path, dst: Path) -> None:
    """Replace `dst/best` by a copy of `src/best` (or remove it when `src` has none)."""
    target = dst / BEST_DIR
    tmp = dst / f".{BEST_DIR}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    if (src / BEST_DIR).is_dir():
        shutil.copytree(src / BEST_DIR, tmp)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    else:
        shutil.rmtree(target, ignore_errors=True)


def promote_best(out: Path) -> dict:
    """Make the kept best adapter the run folder's own (`keep_best=forgetting`): its weights, then
    its config.json, each copied under a temporary name and renamed. Returns its scores."""
    from ..model.speechllm import ADAPTER_WEIGHTS, CHECKPOINT_CONFIG

    best = best_of(out)
    if best is None:
        raise CurveError(f"{out / BEST_DIR}: no best adapter kept (the forgetting curve scored nothing)")
    for name in (ADAPTER_WEIGHTS, CHECKPOINT_CONFIG):
        tmp = out / f".{name}.{os.getpid()}.tmp"
        shutil.copyfile(out / BEST_DIR / name, tmp)
        os.replace(tmp, out / name)
    return best

