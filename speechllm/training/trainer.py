"""`speechllm train`: the adapter (and optional LoRA) learns to make the frozen LLM give the
targets from audio.

One optimizer step consumes `grad_accum` micro-batches on each of the N processes. Micro-batches
come from one global, deterministic stream (length-grouped batches, reshuffled each epoch from the
seed), and process r takes micro-batch k*N + r, so N processes with accumulation A see exactly
what one process with accumulation N*A sees. A checkpoint stores the trainable weights, the
optimizer, the scheduler position, every process's RNG, the step and the settings that shape
training; resuming replays the stream from there, so a killed and resumed run ends with the weights
of an uninterrupted one. A run resumes only with the settings it was trained with (`train.resume`
says what to do otherwise), and trains only on records within every length the model takes
(`data.bound_records`), so neither a changed command line nor a hostile targets file goes unseen.
With `train.replay`, each micro-batch also carries text-only replay examples, drawn as a pure
function of (seed, k) too (`replay.ReplayStream`), so resuming replays them exactly as well.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import SpeechLLMError
from ..hub import weights
from ..distributed import accelerate_kwargs
from ..config import Config, to_dict
from ..io.paths import folder_problem
from ..model import Example, SpeechLLM, build_model
from ..model.speechllm import ADAPTER_WEIGHTS, CHECKPOINT_CONFIG
from . import checkpoint as ckpt
from .curve import BEST_DIR, ForgettingCurve, best_of, copy_best, promote_best
from .replay import REPLAY_KEYS, check_replay, load_replay, replay_settings
from .data import (DATA_ORDER, UPFRONT_ROWS, TargetRows, TrainRecord, batch_at, batch_count, bound_records,
                   epoch_batches, file_digest, held_out_rows, load_targets)

METRICS_FILE = "metrics.jsonl"
RESOLVED_CONFIG = "resolved_config.json"
SETTINGS_KEY = "settings"
"""Key of the trainer state that records the settings a run was trained with (compared on resume)."""
NOT_SHAPING = ("train.out_dir", "train.resume", "train.eval_data", "train.eval_every", "train.save_every",
               "train.keep_checkpoints", "train.log_every", "train.cache_dir", "train.feature_cache",
               "train.forgetting_every", "train.forgetting_data", "train.forgetting_items", "train.keep_best",
               "train.reuse_prefix", "model.llm.trust_remote_code")
"""Settings that do not change the weights training produces: a resume may change them freely.
The forgetting curve only reads the model (greedy, in eval mode); `train.keep_best` only chooses
which of two kept adapters (the last step's, the curve's best) the run folder ends with."""
SHOWN_CHARS = 40
"""A differing setting's values are shown up to this many characters."""
TOKEN_SAMPLE = 1024
"""Training records (a seeded sample) whose target tokens measure the mean target tokens per
example that `train.loss_weighting=token` divides by."""
MASKING_CHUNK = 4096
"""Records token masking scores per round (their token ids held at once; a few MB)."""


class TrainingError(SpeechLLMError, RuntimeError):
    """Training cannot go on (non-finite loss, no data, ...)."""


class SettingsChangedError(TrainingError):
    """`train.out_dir` holds a run made with other settings, and `train.resume=auto` does not mix them."""

    def __init__(self, message: str, changes: list[str]):
        super().__init__(message)
        self.changes = changes
        """The differing settings, "key: saved -> now" each."""


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: weight decay on the trainable matrices only (Linear weights, learned query
    tables); none on biases, norms, or parameters a module lists in its `no_weight_decay` set
    (the Q-Former's per-query layer logits, a softmax's inputs, not a projection)."""
    skip = {f"{prefix}.{name}" if prefix else name
            for prefix, module in model.named_modules() for name in getattr(module, "no_weight_decay", ())}
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 and name not in skip else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_lambda(warmup: int, total: int, schedule: str):
    """Linear warmup to 1, then cosine to 0 (or constant)."""
    if schedule not in ("cosine", "constant"):
        raise ValueError(f"train.schedule: '{schedule}' is not cosine or constant")

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return f


def _flatten(tree: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}."""
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        out.update(_flatten(value, name + ".") if isinstance(value, dict) else {name: value})
    return out


def training_settings(cfg: Config, data_digest: str | None = None) -> dict:
    """The settings that shape training, flat (`train.lr`, `model.adapter.kind`, ...), with the
    training data as the sha256 of its file (a changed file is other data under the same name;
    `data_digest` when it is known, e.g. from the file's row index) and the batch order's version;
    with replay on, the replay file's sha256, its ratio and the replay stream's version."""
    flat = _flatten({"model": to_dict(cfg.model), "train": to_dict(cfg.train)})
    flat["train.data"] = data_digest or file_digest(cfg.train.data)
    flat["train.data_order"] = DATA_ORDER
    flat = {k: v for k, v in flat.items() if k not in REPLAY_KEYS}
    flat.update(replay_settings(cfg.train))
    return {k: v for k, v in flat.items() if k not in NOT_SHAPING}


def differing(saved: dict, now: dict) -> list[str]:
    """'key: saved -> now' for every setting that differs."""
    def show(value) -> str:
        text = json.dumps(value)
        return text if len(text) <= SHOWN_CHARS else text[: SHOWN_CHARS - 3] + "..."
    missing = object()
    keys = sorted(k for k in saved.keys() | now.keys() if saved.get(k, missing) != now.get(k, missing))
    return [f"{k}: {show(saved.get(k))} -> {show(now.get(k))}" for k in keys]


@dataclass
class Stream:
    """The global micro-batch stream over epochs. A pure function of (records, batch size, seed,
    k): a resumed run and every process see the same micro-batch k. A batch whose records are all
    over a token limit (only possible where limits are applied as batches are drawn) is replaced by
    the next non-empty one of its epoch."""
    records: TargetRows
    batch_size: int
    seed: int
    lengths: np.ndarray
    """Estimated LLM positions per record (`TargetRows.positions`): batches hold similar ones."""

    @classmethod
    def for_model(cls, records: TargetRows, model: SpeechLLM, batch_size: int, seed: int) -> "Stream":
        """The stream of `records` for `model` (whose adapter decides the audio's positions)."""
        return cls(records, batch_size, seed, records.positions(model.clip_positions))

    def __post_init__(self):
        self._epoch, self._batches = -1, None
        self.per_epoch = batch_count(len(self.records), self.batch_size)

    def positions(self, k: int) -> np.ndarray:
        """Positions (in `records`) of micro-batch k before the token limits."""
        epoch, i = divmod(k, self.per_epoch)
        if epoch != self._epoch:
            self._epoch, self._batches = epoch, epoch_batches(self.lengths, self.batch_size, self.seed, epoch)
        return batch_at(*self._batches, i, self.batch_size)

    def __getitem__(self, k: int) -> list[TrainRecord]:
        epoch, i = divmod(k, self.per_epoch)
        for d in range(self.per_epoch):  # the next batch of the same epoch, cyclically
            records = self.records.records(self.positions(epoch * self.per_epoch + (i + d) % self.per_epoch))
            if records:
                return records
        raise TrainingError(f"{self.records.table.path}: every record is over a token limit")


@dataclass
class ReplayTally:
    """Replay's part of the micro-batches since the last metrics row (this process's)."""
    examples: int = 0
    replay: int = 0
    loss_sum: float = 0.0
    tokens: int = 0

    def add(self, sums: torch.Tensor, counts: torch.Tensor, n_audio: int) -> None:
        """One micro-batch: per-example summed token losses and token counts, (batch,) each, the
        first `n_audio` examples audio records and the rest replay examples."""
        self.examples += len(counts)
        self.replay += len(counts) - n_audio
        self.loss_sum += float(sums[n_audio:].sum())
        self.tokens += int(counts[n_audio:].sum())

    def row(self) -> dict:
        """`replay_share` (replay examples / all examples) and, when any replay example was seen,
        `replay_loss` (their mean token loss) and `replay_examples`."""
        out = {"replay_share": round(self.replay / self.examples, 5) if self.examples else 0.0,
               "replay_examples": self.replay}
        if self.tokens:
            out["replay_loss"] = round(self.loss_sum / self.tokens, 5)
        return out


class Trainer:
    def __init__(self, cfg: Config, progress: bool = True):
        from accelerate import Accelerator

        t = cfg.train
        if not t.data:
            raise TrainingError("train.data: no targets file given (train.data=path/to/targets.jsonl)")
        check_replay(t)
        self.cfg, self.progress = cfg, progress
        self.out = Path(t.out_dir)
        problem = folder_problem(self.out)
        if problem:
            raise TrainingError(f"train.out_dir: {problem}")
        self.acc = Accelerator(mixed_precision=t.mixed_precision, log_with="tensorboard",
                               project_dir=str(self.out / "logs"), **accelerate_kwargs())
        with self.acc.main_process_first():  # the main process builds a missing row index, the others read it
            records, self.report = load_targets(t.data, t.skip_truncated, progress=progress)
        self.settings = training_settings(cfg, records.table.index.digest)
        self.resumed_changes: list[str] = []
        """Settings that differ from the checkpoint resumed with `train.resume=must`."""
        self.resume_from = self._plan_resume()
        torch.manual_seed(t.seed)
        model = build_model(cfg, device=self.acc.device)
        if t.lora.enabled:
            from ..model.lora import apply_lora

            apply_lora(model, t.lora)
            self.acc.print("[speechllm] warning: LoRA changes the LLM itself, so its text-only abilities are now at "
                           "risk; run the forgetting checks (`speechllm eval`) on this run")
            if t.lora.dropout > 0 and t.reuse_prefix:
                self.acc.print(f"[speechllm] train.lora.dropout={t.lora.dropout} draws a mask per sequence, so each "
                               "sequence runs the shared prompt prefix itself; train.lora.dropout=0 runs it once per "
                               "micro-batch (scripts/bench_train.py --lora measures the difference)")
        self.model = model
        self._split(records)
        self.replay = self._replay()
        self.cache = None
        if t.feature_cache:
            from .cache import FeatureCache

            root = Path(t.cache_dir) if t.cache_dir else weights.home() / "features"
            self.cache = FeatureCache(root, model.encoder, cfg.model.encoder.name)
            if self.upfront:
                clips = sorted({*self.train_records.audio_paths(), *self.eval_records.audio_paths()})
                if self.acc.is_main_process:  # fill it once, with a progress bar, before the other processes read
                    self.cache.build(clips, progress=progress)
                self.acc.wait_for_everyone()
            else:
                self.acc.print(f"[speechllm] feature cache: over {UPFRONT_ROWS} records, each clip's features are "
                               f"computed when a batch first needs them -> {self.cache.folder}")
        self.masks = self._token_masks() if t.token_masking > 0 else {}
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(param_groups(model, t.weight_decay), lr=t.lr, betas=tuple(t.betas))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(t.warmup_steps, t.max_steps,
                                                                                t.schedule))
        self.ddp, self.optimizer = self.acc.prepare(model, optimizer)
        self.params = params
        self.stream = Stream.for_model(self.train_records, model, t.batch_size, t.seed)
        self.tokens_per_example = self._tokens_per_example() if t.loss_weighting == "token" else None
        self.step = 0
        self.curve = self._curve()

    def _tokens_per_example(self) -> float:
        """Mean target tokens (end-of-turn included) of a seeded sample of `TOKEN_SAMPLE` training
        records: with `train.loss_weighting=token` a micro-batch's summed token loss is divided by
        its examples times this, a constant of the run (the same on every process and on resume)."""
        t = self.cfg.train
        rows = self.train_records.rows  # sampled as row numbers, read as written (a record over a limit counts cut)
        if len(rows) > TOKEN_SAMPLE:
            rows = np.sort(np.random.default_rng(t.seed).choice(rows, TOKEN_SAMPLE, replace=False))
        prompt, table = self.model.prompt, self.train_records.table
        counts = []
        for row in rows:
            rec = table.record(int(row))
            counts.append(min(len(prompt.target(rec.target, complete=not rec.truncated)), t.max_target_tokens))
        mean = float(np.mean(counts))
        self.acc.print(f"[speechllm] loss weighting: token (a batch's summed token loss / its examples x {mean:.1f}, "
                       f"the mean target tokens of {len(counts)} training records)")
        return mean

    def _curve(self) -> ForgettingCurve | None:
        """The forgetting curve's items (main process; None when `train.forgetting_every` is 0)."""
        t = self.cfg.train
        if t.keep_best == "forgetting" and not t.forgetting_every:
            raise TrainingError("train.keep_best=forgetting keeps the adapter of the forgetting curve's best step: "
                                "set train.forgetting_every (and train.forgetting_data)")
        if not t.forgetting_every:
            return None
        if not t.forgetting_data:
            raise TrainingError("train.forgetting_every needs train.forgetting_data, a held-out metadata.jsonl "
                                "(e.g. the test clips `speechllm eval --data` reads)")
        if not self.acc.is_main_process:
            return None
        return ForgettingCurve(self.cfg, self.acc.unwrap_model(self.ddp), self.out, self.progress)

    def _score_curve(self) -> None:
        """Score the forgetting curve at this step (main process), log it, and keep the adapter in
        `best/` when it is the best so far; the other processes wait."""
        if self.curve is not None:
            model = self.acc.unwrap_model(self.ddp)
            with self.acc.autocast():
                point = self.curve.score(model, self.step)
            self._log(point.row())
            best = best_of(self.out)
            if best is None or point.ifrate >= best["ifrate"]:
                model.save_pretrained(self.out / BEST_DIR, extra={"trained_steps": self.step,
                                                                  "forgetting_curve": point.row()})
        self.acc.wait_for_everyone()

    def _split(self, records: TargetRows) -> None:
        """Bound every record to the model's limits (counted), then split train / held out. Up to
        `UPFRONT_ROWS` records the token limits are applied here; above, as batches are drawn
        (counted then, printed at the end)."""
        t = self.cfg.train
        self.upfront = len(records) <= UPFRONT_ROWS
        records = bound_records(records, self.model, t, self.report, self.upfront)
        if t.eval_data:
            self.train_records = records
            with self.acc.main_process_first():
                held, _ = load_targets(t.eval_data, t.skip_truncated, self.report, progress=self.progress)
            self.eval_records = bound_records(held, self.model, t, self.report, self.upfront)
        else:
            held = held_out_rows(records, t.eval_fraction)
            self.train_records, self.eval_records = records.subset(~held), records.subset(held)
        self.report.kept = len(self.train_records) + len(self.eval_records)
        if not len(self.train_records):
            raise TrainingError(f"{t.data}: no training records left ({self.report.line()})")
        later = "" if self.upfront else (f"; over {UPFRONT_ROWS} records, token limits are applied as batches are "
                                         "drawn (counted at the end)")
        self.acc.print(f"[speechllm] train {len(self.train_records)} records, held out {len(self.eval_records)}; "
                       f"{self.report.line()}{later}"
                       + ("" if t.skip_truncated or not self.report.truncated
                          else " (truncated targets are learned without an end-of-turn)"))

    def _replay(self):
        """The replay mix (`train.replay`), bounded to the model's limits, or None when off."""
        r = self.cfg.train.replay
        if r.ratio == 0:
            if r.data:
                self.acc.print(f"[speechllm] train.replay.data {r.data} is not used: train.replay.ratio is 0")
            return None
        mix, report = load_replay(self.model, self.cfg.train)
        self.acc.print(f"[speechllm] replay: {r.data}: {report.line()}; {r.ratio:g} of the examples, "
                       f"{mix.stream.per_batch:.3g} per micro-batch of {self.cfg.train.batch_size} records on average "
                       "(text only, learned by LoRA)")
        return mix

    def _plan_resume(self) -> Path | None:
        """The checkpoint to resume from, as `train.resume` says (see `TrainConfig.resume`); a
        run folder trained with other settings is an error naming them, unless told otherwise."""
        t = self.cfg.train
        root = self.out / "checkpoints"
        if t.resume == "never":
            if self.acc.is_main_process:
                ckpt.clear_run(self.out, (METRICS_FILE, ADAPTER_WEIGHTS, CHECKPOINT_CONFIG))
                shutil.rmtree(self.out / BEST_DIR, ignore_errors=True)
            self.acc.wait_for_everyone()
            return None
        found = ckpt.latest(root)
        if found is None:
            if t.resume == "must":
                raise TrainingError(f"train.resume=must: {root} holds no checkpoint to resume from")
            return None
        saved = ckpt.read_state(found).get(SETTINGS_KEY) or self._settings_of_older_run()
        if t.resume == "auto":
            if saved is None:
                raise SettingsChangedError(f"{found}: records no training settings (an older speechllm made it); "
                                           "continue it with train.resume=must, or start afresh with "
                                           "train.resume=never", ["(the checkpoint records none)"])
            changed = differing(saved, self.settings)
            if changed:
                raise SettingsChangedError(
                    f"train.out_dir {self.out} holds a run trained with other settings ({'; '.join(changed)}). "
                    "Continue it with these settings: train.resume=must; start afresh there (its checkpoints "
                    "are deleted): train.resume=never; or choose another train.out_dir", changed)
        self.resumed_changes = (differing(saved, self.settings) if saved is not None
                                else ["(the checkpoint records none)"])
        return found

    # ------------------------------------------------------------------ data

    def examples(self, records: list[TrainRecord]) -> list[Example]:
        from ..io.audio import load_audio

        if self.cache is not None:
            states = self.cache.get([r.audio for r in records])
            return [Example(r.instruction, None, r.transcript, r.target, states=s, id=r.id,
                            target_mask=self.masks.get(r.id), target_complete=not r.truncated)
                    for r, s in zip(records, states)]
        return [Example(r.instruction, load_audio(r.audio), r.transcript, r.target, id=r.id,
                        target_mask=self.masks.get(r.id), target_complete=not r.truncated) for r in records]

    @torch.no_grad()
    def _fit_standardizer(self) -> None:
        """A fresh run fits the adapter's input standardization on the clips of a seeded sample of
        `train.standardize_clips` training records (each clip once; the same on every process)."""
        model = self.acc.unwrap_model(self.ddp)
        if model.standardizer is None:
            return
        t = self.cfg.train
        rows = self.train_records.rows  # sampled as row numbers: millions of records are never listed here
        if len(rows) > t.standardize_clips:
            rows = np.sort(np.random.default_rng(t.seed).choice(rows, t.standardize_clips, replace=False))
        clips = sorted(set(self.train_records.table.audio_paths(rows)))
        frames = model.standardizer.fit(self._clip_states(clips))
        self.acc.print(f"[speechllm] adapter input standardization fitted on {len(clips)} training clips "
                       f"({frames} frames)")

    def _clip_states(self, clips: list[Path], batch: int = 16):
        """Tapped states of each clip (taps x (frames, width)), from the feature cache when on."""
        from ..io.audio import load_audio

        model = self.acc.unwrap_model(self.ddp)
        for i in range(0, len(clips), batch):
            part = clips[i: i + batch]
            if self.cache is not None:
                yield from self.cache.get(part)
                continue
            enc = model.encoder.encode([load_audio(c) for c in part])
            for j, n in enumerate(enc.lengths.tolist()):
                yield [s[j, :n] for s in enc.states]

    def _token_masks(self) -> dict[str, list[bool]]:
        """Selective Token Masking: per record, drop from the loss the `token_masking` fraction of
        target tokens the base LLM finds least probable given the text description (the zero-shot
        prompt `targets.nll` scores against), scored in batches of `train.batch_size` with the
        prompts' shared prefix run once per `MASKING_CHUNK` records (only that many records' token
        ids are held at a time)."""
        from tqdm import tqdm

        from ..targets.nll import scored_pair, token_nll

        frac, m = self.cfg.train.token_masking, self.model
        masks = {}
        records = iter(self.train_records)
        with tqdm(total=len(self.train_records), desc="token masking: scoring targets", unit="rec", file=sys.stderr,
                  disable=not self.progress or not self.acc.is_main_process) as bar:
            while chunk := list(itertools.islice(records, MASKING_CHUNK)):
                # the text tokens as trained; the end-of-turn is never masked, so it is not scored
                pairs = [scored_pair(m.prompt, r.description, r.instruction, r.target, complete=False) for r in chunk]
                scored = token_nll(m.llm, m.prompt.stop_ids[0], pairs, self.cfg.train.batch_size,
                                   on_batch=bar.update)
                for r, (_, target), nll in zip(chunk, pairs, scored):
                    drop = torch.argsort(nll, descending=True, stable=True)[: int(round(frac * len(target)))]
                    dropped = set(drop.tolist())
                    masks[r.id] = [j not in dropped for j in range(len(target))]
        return masks

    # ------------------------------------------------------------------ checkpoints

    def save(self) -> None:
        root = self.out / "checkpoints"
        tmp, final = ckpt.tmp_dir(root, self.step), ckpt.checkpoint_dir(root, self.step)
        if self.acc.is_main_process:
            tmp.mkdir(parents=True, exist_ok=True)
        self.acc.wait_for_everyone()
        ckpt.rng_to_file(tmp, self.acc.process_index)
        self.acc.wait_for_everyone()
        if self.acc.is_main_process:
            self.acc.unwrap_model(self.ddp).save_pretrained(tmp)
            ckpt.optimizer_to_files(self.optimizer.state_dict(), tmp)
            copy_best(self.out, tmp)
            ckpt.finish(tmp, final, {"step": self.step, "scheduler": self.scheduler.state_dict(),
                                     "world_size": self.acc.num_processes, SETTINGS_KEY: self.settings})
            ckpt.prune(root, self.cfg.train.keep_checkpoints)
        self.acc.wait_for_everyone()

    def _settings_of_older_run(self) -> dict | None:
        """For a checkpoint an older speechllm wrote (no settings in it): the settings of the run
        folder's resolved config, when it can still be read; else None."""
        from ..config import config_from_dict

        try:
            data = json.loads((self.out / RESOLVED_CONFIG).read_text(encoding="utf-8"))
            return training_settings(config_from_dict(data)) if isinstance(data, dict) else None
        except (OSError, ValueError):  # missing, not JSON, or keys this version no longer has
            return None

    def resume(self) -> bool:
        """Load the checkpoint `_plan_resume` chose (if any): weights, optimizer, scheduler, RNG
        and step. With `train.resume=must` and changed settings, the new ones apply from here."""
        from safetensors.torch import load_file

        found = self.resume_from
        if found is None:
            return False
        state = ckpt.read_state(found)
        if state["world_size"] != self.acc.num_processes:
            raise TrainingError(f"{found}: saved with {state['world_size']} processes, resuming with "
                                f"{self.acc.num_processes}; resume with the same number")
        weights_ = load_file(str(found / ADAPTER_WEIGHTS), device=str(self.acc.device))
        model = self.acc.unwrap_model(self.ddp)
        missing = set(model.trainable_state_dict()) ^ set(weights_)
        if missing:
            raise TrainingError(f"{found}: checkpoint does not match the model ({sorted(missing)[:3]})")
        model.load_state_dict(weights_, strict=False)
        self.optimizer.load_state_dict(ckpt.optimizer_from_files(found))
        self.scheduler.load_state_dict(state["scheduler"])
        ckpt.rng_from_file(found, self.acc.process_index)
        self.step = state["step"]
        if self.acc.is_main_process:  # the best adapter as it was at this checkpoint
            copy_best(found, self.out)
        if self.resumed_changes:
            self._apply_settings()
            self.acc.print(f"[speechllm] resuming with changed settings: {'; '.join(self.resumed_changes)}")
        self.acc.print(f"[speechllm] resumed from {found} (step {self.step})")
        return True

    def _apply_settings(self) -> None:
        """Put this run's optimizer settings over those restored from a checkpoint: peak lr,
        betas, weight decay, and the lr the (new) schedule gives at the current step."""
        t = self.cfg.train
        self.scheduler.base_lrs = [t.lr] * len(self.scheduler.base_lrs)
        factor = self.scheduler.lr_lambdas[0](self.scheduler.last_epoch)
        for group, decay in zip(self.optimizer.param_groups, (t.weight_decay, 0.0)):
            group.update(lr=t.lr * factor, initial_lr=t.lr, betas=tuple(t.betas), weight_decay=decay)

    # ------------------------------------------------------------------ loop

    @torch.no_grad()
    def evaluate(self) -> float | None:
        if not self.eval_records:
            return None
        model = self.acc.unwrap_model(self.ddp)
        model.eval()
        bs = self.cfg.train.batch_size
        losses = []
        for i in range(0, len(self.eval_records), bs):
            with self.acc.autocast():
                losses.append(float(model(self.examples(self.eval_records[i: i + bs]),
                                          reuse_prefix=self.cfg.train.reuse_prefix)))
        return sum(losses) / len(losses)

    def _train_mode(self) -> None:
        model = self.acc.unwrap_model(self.ddp)
        model.adapter.train()
        model.encoder.eval()
        model.llm.train(mode=model.lora is not None)

    def train(self) -> Path:
        from tqdm import tqdm

        t = self.cfg.train
        if not self.resume():
            self._fit_standardizer()
        world, rank = self.acc.num_processes, self.acc.process_index
        if self.acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / RESOLVED_CONFIG).write_text(json.dumps(to_dict(self.cfg), indent=2) + "\n")
            self._trim_metrics()
        self.acc.init_trackers("speechllm")
        if self.curve is not None:  # answered once per run folder, before the first step
            self.curve.reference(self.acc.unwrap_model(self.ddp))
        bar = tqdm(total=t.max_steps, initial=self.step, desc="train", unit="step", file=sys.stderr,
                   disable=not (self.progress and self.acc.is_main_process))
        t_last, samples = time.perf_counter(), 0
        tally = ReplayTally()
        while self.step < t.max_steps:
            self._train_mode()
            loss_sum = 0.0
            for a in range(t.grad_accum):
                k = (self.step * t.grad_accum + a) * world + rank
                records = self.stream[k]
                examples = self.examples(records)
                n_audio = len(examples)
                if self.replay is not None:
                    examples += self.replay.examples(k)
                sync = contextlib.nullcontext() if a == t.grad_accum - 1 else self.acc.no_sync(self.ddp)
                with sync, self.acc.autocast():
                    loss, sums, counts = self.ddp(examples, per_example=True, reuse_prefix=t.reuse_prefix,
                                                  reduction="mean" if self.tokens_per_example is None else "sum")
                if self.replay is not None:
                    tally.add(sums, counts, n_audio)
                if not torch.isfinite(loss):
                    raise TrainingError(f"step {self.step + 1}: loss is {float(loss.detach())} on the batch with ids "
                                        f"{', '.join(str(e.id) for e in examples)}")
                if self.tokens_per_example is not None:
                    loss = loss / (len(examples) * self.tokens_per_example)
                self.acc.backward(loss / t.grad_accum)
                loss_sum += float(sums.sum() / counts.sum()) / t.grad_accum  # the batch's mean token loss, logged
                samples += len(examples) * world
            grad_norm = self.acc.clip_grad_norm_(self.params, t.grad_clip)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            bar.update(1)
            now = time.perf_counter()
            if self.step % t.log_every == 0 or self.step == t.max_steps:
                row = {"step": self.step, "loss": round(loss_sum, 5), "lr": self.scheduler.get_last_lr()[0],
                       "grad_norm": round(float(grad_norm), 5), "samples_per_s": round(samples / (now - t_last), 2)}
                if self.replay is not None:
                    row.update(tally.row())
                    tally = ReplayTally()
                self._log(row)
                bar.set_postfix(loss=f"{loss_sum:.3f}", sps=row["samples_per_s"])
                t_last, samples = now, 0
            if self.step % t.eval_every == 0 or self.step == t.max_steps:
                ev = self.evaluate()
                if ev is not None:
                    self._log({"step": self.step, "eval_loss": round(ev, 5)})
            if t.forgetting_every and (self.step % t.forgetting_every == 0 or self.step == t.max_steps):
                self._score_curve()
            if self.step % t.save_every == 0 or self.step == t.max_steps:
                self.save()
        bar.close()
        if not self.upfront:
            self.acc.print(f"[speechllm] records met so far: {self.report.line()}")
        if self.acc.is_main_process:
            self.acc.unwrap_model(self.ddp).save_pretrained(self.out, extra={"trained_steps": self.step})
            if t.keep_best == "forgetting":
                best = promote_best(self.out)
                self.acc.print(f"[speechllm] keep_best=forgetting: the run's adapter is step {best['step']}'s "
                               f"(IFrate {best['ifrate']:.3f}, delta {best['delta']}); step {self.step}'s stays in "
                               f"{self.out / 'checkpoints'}")
        self.acc.end_training()
        return self.out

    def _log(self, row: dict) -> None:
        if self.acc.is_main_process:
            with open(self.out / METRICS_FILE, "a") as f:
                f.write(json.dumps(row) + "\n")
        self.acc.log({k: v for k, v in row.items() if k != "step" and v is not None}, step=row["step"])

    def _trim_metrics(self) -> None:
        """After a resume, drop metrics logged past the checkpoint (they are logged again)."""
        path = self.out / METRICS_FILE
        if path.exists():
            from ..io.jsonl import iter_lines, write_jsonl_atomic

            rows = [line.record for line in iter_lines(path) if line.record and line.record.get("step", 0) <= self.step]
            write_jsonl_atomic(path, rows)


def train(cfg: Config, progress: bool = True) -> Path:
    """Train and return the run folder (loadable with `SpeechLLM.from_pretrained`)."""
    return Trainer(cfg, progress).train()

