"""Trainer checkpoints in safetensors + JSON (no pickle): trainable weights, optimizer state,
scheduler position, RNG states per process, and the step. A checkpoint folder is written under a
temporary name and renamed when complete, so a killed run never leaves a half checkpoint that a
resume would trust."""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..errors import SpeechLLMError

STATE_FILE = "trainer_state.json"
OPTIMIZER_TENSORS = "optimizer.safetensors"
OPTIMIZER_JSON = "optimizer.json"
STEP_PREFIX = "step-"


class CheckpointStateError(SpeechLLMError, ValueError):
    """A trainer checkpoint whose state file cannot be read."""


def read_state(folder: Path) -> dict:
    """The trainer state of a checkpoint folder (step, scheduler, world size, settings)."""
    path = folder / STATE_FILE
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as err:
        raise CheckpointStateError(f"{path}: cannot be read ({err}); delete {folder} to resume from an "
                                   "earlier checkpoint") from None
    if not isinstance(state, dict) or not {"step", "scheduler", "world_size"} <= state.keys():
        raise CheckpointStateError(f"{path}: not a trainer state (needs step, scheduler and world_size)")
    return state


def clear_run(out: Path, files: tuple[str, ...]) -> None:
    """Delete a run folder's checkpoints and `files` (its outputs and logs), for a fresh run there."""
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    for name in files:
        (out / name).unlink(missing_ok=True)


def checkpoint_dir(root: Path, step: int) -> Path:
    return root / f"{STEP_PREFIX}{step:08d}"


def tmp_dir(root: Path, step: int) -> Path:
    return root / f".{STEP_PREFIX}{step:08d}.tmp"


def latest(root: Path) -> Path | None:
    """The newest complete checkpoint under `root`."""
    if not root.is_dir():
        return None
    done = sorted(p for p in root.iterdir() if p.name.startswith(STEP_PREFIX) and (p / STATE_FILE).is_file())
    return done[-1] if done else None


def optimizer_to_files(state: dict, folder: Path) -> None:
    tensors, scalars = {}, {}
    for idx, per_param in state["state"].items():
        for name, value in per_param.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{name}"] = value
    save_file(tensors, str(folder / OPTIMIZER_TENSORS))
    (folder / OPTIMIZER_JSON).write_text(json.dumps({"param_groups": state["param_groups"], "scalars": scalars}))


def optimizer_from_files(folder: Path) -> dict:
    tensors = load_file(str(folder / OPTIMIZER_TENSORS))
    meta = json.loads((folder / OPTIMIZER_JSON).read_text())
    state: dict[int, dict] = {}
    for key, value in list(tensors.items()) + list(meta["scalars"].items()):
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_to_file(folder: Path, rank: int) -> None:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda{i}"] = s
    save_file(tensors, str(folder / f"rng-{rank}.safetensors"))
    py = random.getstate()
    np_state = np.random.get_state()
    (folder / f"rng-{rank}.json").write_text(json.dumps({
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }))


def rng_from_file(folder: Path, rank: int) -> None:
    tensors = load_file(str(folder / f"rng-{rank}.safetensors"))
    torch.set_rng_state(tensors["torch"])
    if torch.cuda.is_available():
        cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda"))]
        if cuda:
            torch.cuda.set_rng_state_all(cuda)
    meta = json.loads((folder / f"rng-{rank}.json").read_text())
    v, state, gauss = meta["python"]
    random.setstate((v, tuple(state), gauss))
    n = meta["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))


def prune(root: Path, keep: int) -> None:
    done = sorted(p for p in root.iterdir() if p.name.startswith(STEP_PREFIX) and (p / STATE_FILE).is_file())
    for old in done[: max(0, len(done) - keep)]:
        shutil.rmtree(old, ignore_errors=True)


def finish(tmp: Path, final: Path, state: dict) -> None:
    """Write the state file last, then rename the folder into place."""
    (tmp / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
