"""Linear layers multiplied in oneDNN's packed weight layout while a CPU decodes in float32.

A decoding step multiplies a few rows (one per sequence still answering) by every weight of the
LLM. torch's float32 `F.linear` on a CPU goes to MKL's sgemm, which copies blocks of the weight into
its working layout on every call; at a few rows that copy is a large part of the product. oneDNN
(bundled with torch) can lay a weight out once in its own blocked format
(`torch.ops.mkldnn._reorder_linear_weight`) and multiply by it many times
(`torch.ops.mkldnn._linear_pointwise`): the path torch's inductor takes for frozen CPU weights.
Measured on a 2-core AVX2 CPU (the demo's shapes, 30 layers' worth of weights, 2 threads): 32 rows
1.15-1.8x MKL's rate, 8-16 rows 1.1-2x, the 576 -> 49152 LM head at 32 rows 1.7x, 256-2000 rows
(prefill, training) within 6%; `scripts/bench_targets.py` prints the end-to-end `packed weights
speedup` (1.24-1.25 there, the answers identical).

`packed_linears(llm)` packs every float32 CPU `nn.Linear` of a module (a LoRA model's branches
included) and routes its forward through the packed weight for the duration of a `with` block.
Packed copies are kept per layer and remade when the weight changes (an optimizer step, a loaded
checkpoint: the tensor's version counter or storage moves), so training between two generations
is seen. A write through `.data` moves neither and is not seen: `SpeechLLM.merge_lora`, after
peft's merge (which writes so), bumps the counters itself. The packed copies double those weights
in memory (540 MB more for the embedded default); packing that would take more than half the memory
still available is skipped with a notice (a large LLM in float32 on a CPU).

Forward only: the packed product has no gradient, so the block is entered under `torch.no_grad`
(generation) and the layers are their own again after it. The products equal `F.linear`'s up to
float32 rounding (a different summation order); the greedy answers of the benchmarks' prompts came
out identical (tested on the tiny model too). The private ops are probed once; where they are
missing (an older or newer torch, a build without oneDNN) the layers are left as they are.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import weakref
from typing import Iterator

import psutil
import torch
from torch import nn

_PACKED: "weakref.WeakKeyDictionary[nn.Linear, tuple[tuple, torch.Tensor]]" = weakref.WeakKeyDictionary()
"""Per layer: (the weight's identity when packed, the packed weight)."""
MAX_SHARE_OF_AVAILABLE = 0.5
"""Packing that would take more than this share of the memory still available is skipped (the
layers keep `F.linear`): the copies are worth a 1.25x decoding speedup, not the risk of swapping."""
_TOLD: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()
"""Modules already told that their weights are too large to pack."""


@functools.cache
def packing_available() -> bool:
    """Whether this torch build packs and multiplies float32 weights with oneDNN, and gets `F.linear`'s
    product doing so (checked once on a small case)."""
    ops = getattr(torch.ops, "mkldnn", None)
    if not torch.backends.mkldnn.is_available() or ops is None:
        return False
    try:
        draw = torch.Generator().manual_seed(0)  # not the global stream: probing must not move seeded work
        w, x = torch.randn(24, 16, generator=draw), torch.randn(3, 5, 16, generator=draw)
        got = torch.ops.mkldnn._linear_pointwise(x, torch.ops.mkldnn._reorder_linear_weight(w), None, "none", [], "")
    except (RuntimeError, AttributeError, TypeError):
        return False
    return torch.allclose(got, nn.functional.linear(x, w), rtol=1e-4, atol=1e-5)


def available_memory() -> int:
    """Bytes of memory this machine can still give (psutil's `available`)."""
    return int(psutil.virtual_memory().available)


def _identity(weight: torch.Tensor) -> tuple | None:
    """What changes when a weight does: its storage, its in-place version, its shape; None for a
    tensor made under `torch.inference_mode`, which keeps no version counter."""
    try:
        return weight.data_ptr(), weight._version, tuple(weight.shape)
    except RuntimeError:
        return None


def _packed_now(layer: nn.Linear) -> bool:
    """Whether `layer`'s packed copy is kept and still matches its weight."""
    key, hit = _identity(layer.weight), _PACKED.get(layer)
    return key is not None and hit is not None and hit[0] == key


def _packed_weight(layer: nn.Linear) -> torch.Tensor:
    """`layer`'s weight in oneDNN's layout, packed again only when the weight changed (every time
    when nothing can tell)."""
    if _packed_now(layer):
        return _PACKED[layer][1]
    packed = torch.ops.mkldnn._reorder_linear_weight(layer.weight.detach())
    key = _identity(layer.weight)
    if key is not None:
        _PACKED[layer] = (key, packed)
    return packed


def _packed_forward(layer: nn.Linear, packed: torch.Tensor):
    """A forward for `layer` through `packed` (the bias, if any, added by oneDNN)."""
    bias = None if layer.bias is None else layer.bias.detach()

    def forward(x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
    return forward


def _packable(layer: nn.Module) -> bool:
    """A plain float32 CPU linear layer whose forward nobody has replaced (accelerate's hooks do)."""
    return (type(layer) is nn.Linear and "forward" not in vars(layer) and layer.weight.device.type == "cpu"
            and layer.weight.dtype == torch.float32 and (layer.bias is None or layer.bias.dtype == torch.float32))


@contextlib.contextmanager
def packed_linears(llm: nn.Module, enabled: bool = True) -> Iterator[int]:
    """Within the block, `llm`'s float32 CPU linear layers multiply by packed weights; yields how
    many layers were packed (0 when `enabled` is False, on another device or dtype, or when the
    torch build cannot). Enter it under `torch.no_grad()`; nesting is harmless (the inner block
    finds the layers taken and packs none)."""
    if not enabled or not packing_available():
        yield 0
        return
    if torch.is_grad_enabled():
        raise RuntimeError("packed_linears: the packed product has no gradient; enter it under torch.no_grad()")
    taken = [m for m in llm.modules() if _packable(m)]
    new = sum(m.weight.numel() * m.weight.element_size() for m in taken if not _packed_now(m))
    free = available_memory()
    if new > MAX_SHARE_OF_AVAILABLE * free:
        if llm not in _TOLD:
            _TOLD.add(llm)
            print(f"[speechllm] packed weights skipped: packing the LLM's linear weights would take "
                  f"{new / 1e9:.1f} GB of the {free / 1e9:.1f} GB still available; decoding keeps F.linear "
                  "(generation.packed_weights=false says so without checking)", file=sys.stderr, flush=True)
        yield 0
        return
    try:
        for layer in taken:
            layer.forward = _packed_forward(layer, _packed_weight(layer))
        yield len(taken)
    finally:
        for layer in taken:
            vars(layer).pop("forward", None)
