"""What one forgetting-curve scoring costs: a trained checkpoint answers the curve's held-out items
as `train.forgetting_every` has it do during training (the demo's eval settings by default), and
the reference is answered once.

    python scripts/measure_curve.py runs/demo/runs/self-output runs/demo/data/test.metadata.jsonl --items 24

The reference's answers go to --out (never into the checkpoint's folder).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from speechllm.config import load_config
from speechllm.demo import DEMO_CONSTRAINTS, FULL, SYSTEM_PROMPT
from speechllm.model.speechllm import SpeechLLM
from speechllm.training.curve import ForgettingCurve


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a trained run folder")
    p.add_argument("data", help="held-out metadata.jsonl (train.forgetting_data)")
    p.add_argument("--items", type=int, default=24, help="train.forgetting_items")
    p.add_argument("--tokens", type=int, default=FULL.if_tokens, help="eval.if_max_new_tokens (default: the demo's)")
    p.add_argument("--batch-size", type=int, default=FULL.eval_batch_size, help="eval.batch_size (default: the demo's)")
    p.add_argument("--system-prompt", default=SYSTEM_PROMPT, help="the LLM's system prompt (default: the demo's)")
    p.add_argument("--out", help="folder for the reference's answers (default: a temporary one)")
    args = p.parse_args()

    cfg = load_config(None, [f"model.llm.system_prompt={args.system_prompt}", "train.forgetting_every=1",
                             f"train.forgetting_data={args.data}", f"train.forgetting_items={args.items}",
                             f"eval.if_max_new_tokens={args.tokens}", f"eval.batch_size={args.batch_size}",
                             f"eval.constraints={json.dumps(DEMO_CONSTRAINTS)}"])
    model = SpeechLLM.from_pretrained(args.checkpoint).eval()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out or tmp)
        t0 = time.perf_counter()
        curve = ForgettingCurve(cfg, model, out, progress=False)
        t1 = time.perf_counter()
        curve.reference(model)
        t2 = time.perf_counter()
        point = curve.score(model, 0)
        t3 = time.perf_counter()
    print(f"{len(curve.fitems)} items: items and audio {t1 - t0:.1f} s, reference (once per run) {t2 - t1:.1f} s, "
          f"one scoring {t3 - t2:.1f} s -> {point.row()}")


if __name__ == "__main__":
    main()
