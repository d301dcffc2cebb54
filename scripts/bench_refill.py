"""Decoding with freed rows refilled (continuous batching, `speechllm/model/decode.py`) against
batches answered one at a time, side by side on the demo's evaluation prompts: for each group of
the evaluation (audio tasks, forgetting items) the text reference (the base LLM reading each clip's
description) and the speech model answer every prompt both ways, at most `--batch-size` at once,
the two ways alternating `--rounds` times (best of each kept). Prints each group's times, how many
answers are identical, and last `refill speedup N` (the sums of the best times).

    python scripts/bench_refill.py --checkpoint runs/demo/runs/self-output \\
        --data runs/demo/data/test.metadata.jsonl [--plan full|quick] [--batch-size N] [--rounds 2]

Refilling gains where a batch's answers are of unequal length (a few run long while most stop
early): a batch answered alone then spends its last steps on a few rows, and each step reads
every weight whatever its rows.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from speechllm.demo import FULL, QUICK, _eval_config

PLANS = {"full": FULL, "quick": QUICK}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, type=Path, help="a trained run")
    p.add_argument("--data", required=True, type=Path, help="metadata JSONL of the evaluation clips")
    p.add_argument("--plan", choices=tuple(PLANS), default="full", help="the demo plan whose evaluation sizes to use")
    p.add_argument("--batch-size", type=int, help="most answers decoded at once (default: the plan's)")
    p.add_argument("--rounds", type=int, default=2, help="alternating timed runs of each way")
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    if not (args.checkpoint / "config.json").is_file():
        p.error(f"--checkpoint {args.checkpoint}: not a speechllm checkpoint (no config.json)")
    if not args.data.is_file():
        p.error(f"--data {args.data}: no such file")
    if args.rounds < 1 or (args.batch_size is not None and args.batch_size < 1):
        p.error("--rounds and --batch-size must be at least 1")

    from speechllm.eval.answer import Reference, speech_answers
    from speechllm.eval.items import load_eval_set
    from speechllm.eval.suite import _generation
    from speechllm.model.speechllm import Example, SpeechLLM

    cfg = _eval_config(PLANS[args.plan])
    rows = args.batch_size or cfg.batch_size
    model = SpeechLLM.from_pretrained(args.checkpoint, device=args.device).eval()
    with tempfile.TemporaryDirectory() as tmp:
        es = load_eval_set(args.data, Path(tmp), cfg, model.config.encoder.name, False)
    reference = Reference.for_model(model)
    model.merge_lora()

    def example(key: str) -> Example:
        item = es.item(key)
        return Example(instruction=es.instruction(key), audio=es.audio[item.audio], transcript=item.transcript, id=key)

    def by_reference(keys: list[str], gen, n: int) -> list[str]:
        return [g.text for g in reference.answer([es.item(k).description for k in keys],
                                                 [es.instruction(k) for k in keys], gen, n)]

    def by_speech(keys: list[str], gen, n: int) -> list[str]:
        return speech_answers(model, [example(k) for k in keys], gen, n)

    def alone(answer, keys: list[str], gen) -> list[str]:  # each batch its own call: nothing to refill from
        return [a for s in range(0, len(keys), rows) for a in answer(keys[s: s + rows], gen, rows)]

    def refilled(answer, keys: list[str], gen) -> list[str]:
        return answer(keys, gen, rows)

    print(f"checkpoint {args.checkpoint}, {len(es.items)} task items, {len(es.fitems)} forgetting items, "
          f"at most {rows} answers at once, the two ways alternating {args.rounds}x", flush=True)
    totals = {"alone": 0.0, "refilled": 0.0}
    for keys, desc in [g for g in es.groups if g[0] and es.item(g[0][0]) is not None]:
        gen = _generation(cfg, keys[0])
        orders = {"reference": sorted(keys, key=lambda k: (len(es.instruction(k)) + len(es.item(k).description), k)),
                  "speech model": sorted(keys, key=lambda k: (model.example_positions(example(k)), k))}
        for system, answer in (("reference", by_reference), ("speech model", by_speech)):
            best, answers = {}, {}
            for _ in range(args.rounds):
                for way, run in (("alone", alone), ("refilled", refilled)):
                    t0 = time.perf_counter()
                    answers[way] = run(answer, orders[system], gen)
                    seconds = time.perf_counter() - t0
                    best[way] = min(best.get(way, seconds), seconds)
            same = sum(a == b for a, b in zip(answers["alone"], answers["refilled"]))
            for way in totals:
                totals[way] += best[way]
            print(f"{system}, {desc} ({len(keys)}, at most {gen.max_new_tokens} new tokens): batches alone "
                  f"{best['alone']:.1f} s, refilled {best['refilled']:.1f} s ({best['alone'] / best['refilled']:.2f}x); "
                  f"identical answers {same}/{len(keys)}", flush=True)
    print(f"total: batches alone {totals['alone']:.1f} s, refilled {totals['refilled']:.1f} s")
    print(f"refill speedup {totals['alone'] / totals['refilled']:.2f}")


if __name__ == "__main__":
    main()
