#!/usr/bin/env bash
# GPU check of the embedded default on one CUDA GPU, in about 5 minutes (at most 8):
#   1. bf16 training steps on the GPU vs the same steps in float32 on the CPU (same seed, same
#      batch): the first-step losses must agree within LOSS_RTOL;
#   2. peak GPU memory of those steps against `speechllm plan` for the same lengths (ratio printed,
#      more than 25% off fails);
#   3. generation throughput (tokens/s) at batch 1, 32 and 128 (greedy, 64 new tokens each);
#   4. shared-prefix reuse on the GPU (scripts/check_prefix.py): bf16 greedy answers with and without
#      it on the speech and text paths (identical count beside batching's own flips, speedup) and the
#      float32 training loss and gradients with and without it.
# Results: $OUT (default runs/gpu_check) as JSON, a summary on stdout. Exits 3 at once when torch
# sees no CUDA device. Usage: scripts/gpu_check.sh   (from the repository root, venv active)
# Offline: put the weights' wheels into a folder and set SPEECHLLM_WHEELHOUSE to it (`speechllm models`).
set -euo pipefail
PY=${PYTHON:-python}
OUT=${OUT:-runs/gpu_check}
LOSS_RTOL=${LOSS_RTOL:-0.03}
BATCH=4
TARGET_TOKENS=128

if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_check: torch sees no CUDA device (torch.cuda.is_available() is False); run this on a GPU machine" >&2
    exit 3
fi
mkdir -p "$OUT"
"$PY" -m speechllm.cli models prepare >&2
"$PY" -c 'import torch; p = torch.cuda.get_device_properties(0); print(f"gpu_check: {p.name}, {p.total_memory / 2**30:.1f} GiB")'

echo "gpu_check: 1-2. training steps (GPU bf16, CPU float32) and peak memory vs plan" >&2
timeout 240 "$PY" scripts/measure_plan.py --device cuda --batch-size $BATCH --steps 3 \
    --target-tokens $TARGET_TOKENS train.mixed_precision=bf16 | tail -n 1 > "$OUT/train_gpu.json"
timeout 240 "$PY" scripts/measure_plan.py --device cpu --batch-size $BATCH --steps 1 \
    --target-tokens $TARGET_TOKENS | tail -n 1 > "$OUT/train_cpu.json"

echo "gpu_check: 3. generation throughput" >&2
timeout 180 "$PY" - "$OUT/generate.json" <<'PYEOF'
import json, sys, time
import numpy as np, torch
from speechllm.config import load_config
from speechllm.io.audio import load_audio
from speechllm.model import Example, build_model

NEW_TOKENS = 64
cfg = load_config("configs/default.yaml", ["model.llm.dtype=bfloat16"])
torch.manual_seed(0)
model = build_model(cfg, device="cuda").eval()
wav = load_audio("samples/librivox_austen_0890.wav")
rows = []
for batch in (1, 32, 128):
    examples = [Example("What can you hear?", audio=wav, transcript="cold hearted") for _ in range(batch)]
    for attempt in range(2):  # the first pass warms up kernels
        torch.cuda.synchronize(); t0 = time.perf_counter()
        with torch.no_grad():
            b = model.build_batch(examples, for_generation=True, reserve=NEW_TOKENS)
            out = model.llm.generate(inputs_embeds=b.inputs_embeds, attention_mask=b.attention_mask, do_sample=False,
                                     max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                     pad_token_id=model.prompt.stop_ids[0], temperature=None, top_p=None, top_k=None)
        torch.cuda.synchronize(); seconds = time.perf_counter() - t0
    rows.append({"batch": batch, "new_tokens": int(out.shape[1]), "seconds": seconds,
                 "tokens_per_second": batch * int(out.shape[1]) / seconds,
                 "peak_gib": torch.cuda.max_memory_allocated() / 2**30})
json.dump(rows, open(sys.argv[1], "w"), indent=2)
PYEOF

echo "gpu_check: 4. shared-prefix reuse" >&2
timeout 300 "$PY" scripts/check_prefix.py --device cuda --dtype bfloat16 --out "$OUT/prefix.json" >&2

"$PY" - "$OUT" "$LOSS_RTOL" <<'PYEOF'
import json, sys
from pathlib import Path
out, rtol = Path(sys.argv[1]), float(sys.argv[2])
gpu, cpu = (json.loads((out / f"train_{d}.json").read_text()) for d in ("gpu", "cpu"))
gen = json.loads((out / "generate.json").read_text())
prefix = json.loads((out / "prefix.json").read_text())
loss_gpu, loss_cpu = gpu["losses"][0], cpu["losses"][0]
loss_ok = abs(loss_gpu - loss_cpu) <= rtol * abs(loss_cpu)
mem_ok = abs(gpu["ratio"] - 1) <= 0.25
print(f"loss      first step: GPU bf16 {loss_gpu:.4f}, CPU float32 {loss_cpu:.4f} -> {'OK' if loss_ok else 'MISMATCH'}"
      f" (rtol {rtol}); GPU steps {', '.join(f'{l:.4f}' for l in gpu['losses'])}")
print(f"memory    GPU peak {gpu['measured_peak_bytes'] / 2**30:.2f} GiB vs plan {gpu['plan_peak_bytes'] / 2**30:.2f} GiB "
      f"(ratio {gpu['ratio']:.2f}) -> {'OK' if mem_ok else 'OFF BY MORE THAN 25%'}")
print(f"step      GPU {gpu['step_seconds'][-1]:.3f} s per step at batch {gpu['batch_size']} ({gpu['sequence_tokens']} tokens each)")
for r in gen:
    print(f"generate  batch {r['batch']:>3}: {r['tokens_per_second']:,.0f} tokens/s ({r['seconds']:.2f} s, peak {r['peak_gib']:.2f} GiB)")
train = prefix["train"]
prefix_ok = abs(train["loss_plain"] - train["loss_reuse"]) <= 1e-4 * abs(train["loss_plain"]) \
    and train["grad_rel_diff"] <= 1e-3
for path in ("speech", "text"):
    r = prefix[path]
    print(f"prefix    {path}: bf16 greedy answers identical with and without reuse "
          f"{r['identical_reuse']}/{r['examples']} (batching alone: {r['identical_batching']}/{r['examples']}), speedup {r['speedup']:.2f}")
print(f"prefix    float32 loss {train['loss_plain']:.6f} vs {train['loss_reuse']:.6f} with reuse, gradients differ by "
      f"{train['grad_rel_diff']:.2e} (relative) -> {'OK' if prefix_ok else 'MISMATCH'}")
(out / "summary.json").write_text(json.dumps({"loss_ok": loss_ok, "memory_ok": mem_ok, "prefix_ok": prefix_ok,
                                              "train_gpu": gpu, "train_cpu": cpu, "generate": gen,
                                              "prefix": prefix}, indent=2))
sys.exit(0 if loss_ok and mem_ok and prefix_ok else 1)
PYEOF
