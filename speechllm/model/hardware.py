"""What a device computes fast: the one place the project asks the hardware (not the config)
which number format to use."""

from __future__ import annotations

import torch


def native_bf16(device: str | torch.device = "cpu") -> bool:
    """Whether `device` multiplies bfloat16 matrices in hardware: a CUDA GPU that supports it, or a
    CPU with AVX512-BF16 or AMX (there oneDNN's bf16 matmuls run about twice the fp32 rate; a CPU
    without them emulates bf16, slower than fp32)."""
    kind = torch.device(device).type
    if kind == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if kind != "cpu":
        return False
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(probe is not None and probe() for probe in probes)  # private probes: absent in an older torch
