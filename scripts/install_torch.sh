#!/usr/bin/env bash
# Install PyTorch into the given Python environment, choosing the build for this machine:
#   - torch already importable: nothing to do (re-runs are instant);
#   - TORCH_SPEC set: exactly that requirement (e.g. TORCH_SPEC="torch==2.5.1");
#   - an NVIDIA GPU visible (nvidia-smi -L works): the normal PyPI build, which is CUDA-enabled;
#   - otherwise a CPU-only wheel: a local/find-links "+cpu" wheel if pip can see one, else the
#     PyTorch CPU index. A CPU machine never pulls the multi-GB CUDA build by accident.
set -euo pipefail
py=${1:?usage: install_torch.sh PYTHON}
if "$py" -c "import torch" 2>/dev/null; then
    exit 0
fi
pip=("$py" -m pip install --disable-pip-version-check -q)
if [[ -n "${TORCH_SPEC:-}" ]]; then
    echo "installing ${TORCH_SPEC} (from TORCH_SPEC)"
    "${pip[@]}" "${TORCH_SPEC}"
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "NVIDIA GPU found: installing the CUDA build of torch"
    "${pip[@]}" torch
else
    echo "no GPU: installing a CPU-only torch"
    "${pip[@]}" --only-binary=:all: "torch==2.13.0+cpu" 2>/dev/null \
        || "${pip[@]}" torch --index-url https://download.pytorch.org/whl/cpu
fi
