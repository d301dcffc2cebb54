"""Process-group settings shared by the stages that run under `accelerate launch` / `torchrun`.

On a machine without a GPU, accelerate only forms a CPU (gloo) process group when told to use the
CPU; otherwise every process would silently run alone. Launched with several processes and no
GPU, speechllm tells it so.
"""

from __future__ import annotations

import os


def launched_processes() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def accelerate_kwargs() -> dict:
    """Keyword arguments for `Accelerator(...)` / `PartialState(...)`."""
    import torch

    if launched_processes() > 1 and not torch.cuda.is_available():
        return {"cpu": True}
    return {}
