"""Decoding with freed rows refilled (continuous batching, `speechllm/model/decode.py`) against
batches answered one at a time, side by side on the demo's evaluation prompts: for each group of
the evaluation (audio tasks, forgetting items) the text reference (the base LLM reading each clip's
description) and the speech model answer every prompt both ways, at most `--batch-size` at once,
the two ways alternating `--rounds` times (best of each kept). Prints each group's times, how many
answers are identical, and last `refill speedup N` (the sums of the best times).

Each group's refilled run is also held against its bound on this machine (`scripts/bounds.py`, as
`bench_targets.py` computes it): the larger of the compute bound (the LLM's FLOPs for the prompts
and the answers produced, the shared prefix once, no padding, plus the audio encoder's and the
adapter's FLOPs for each clip alone, at the measured matmul peak) and the memory bound (each
decoding step reads every weight once: answer tokens / (rows x copy bandwidth / weight bytes)),
printed as `N% of the bound` per group and for the whole evaluation last but one. The speech
model's answer lengths are its answers re-tokenized (plus the stop token when shorter than the
limit): within a token or two of what was decoded.

    python scripts/bench_refill.py --checkpoint runs/demo/runs/self-output \\
        --data runs/demo/data/test.metadata.jsonl [--plan full|quick] [--batch-size N] [--rounds 2]

Refilling gains where a batch's answers are of unequal length (a few run long while most stop
early): a batch answered alone then spends its last steps on a few rows, and each step reads
every weight whatever its rows.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from bounds import LLMFlops, copy_bandwidth, matmul_peak, weight_bytes
from speechllm.demo import FULL, QUICK, _eval_config
from speechllm.model.prefix import prompt_prefix_length

PLANS = {"full": FULL, "quick": QUICK}


@dataclass
class Work:
    """What one group's answers took, for its bound."""
    llm_flops: float
    """FLOPs of the LLM: prompts (shared prefix once) and answers, no padding."""
    audio_flops: float
    """FLOPs of the audio encoder and adapter, each clip alone (0 for the text reference)."""
    tokens: int
    """Answer tokens decoded (the stop token included): decoding steps' rows."""

    def seconds(self, peak: float, rows: int, one_sequence: float) -> float:
        """The bound in seconds: compute at `peak` FLOP/s, or `rows` sequences decoded at once at
        `one_sequence` steps/s each, whichever is slower."""
        return max((self.llm_flops + self.audio_flops) / peak, self.tokens / (rows * one_sequence))


def _sdpa_flops(query, key, *_args, out_shape=None, **_kwargs) -> int:
    """FLOPs of CPU scaled-dot-product attention from its shapes (torch's counter has no formula for
    the CPU kernel): QK^T and the weighted sum of V, 2 FLOPs per multiply-add each."""
    *batch, queries, width = query
    return 4 * math.prod(batch) * queries * key[-2] * width


SDPA_FLOPS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_flops}


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

    from speechllm.eval.answer import Reference, reference_prompt, speech_answers
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
    flops = LLMFlops.of(model.llm)

    def example(key: str) -> Example:
        item = es.item(key)
        return Example(instruction=es.instruction(key), audio=es.audio[item.audio], transcript=item.transcript, id=key)

    def by_reference(keys: list[str], gen, n: int) -> list:
        return reference.answer([es.item(k).description for k in keys], [es.instruction(k) for k in keys], gen, n)

    def by_speech(keys: list[str], gen, n: int) -> list:
        return speech_answers(model, [example(k) for k in keys], gen, n)

    def alone(answer, keys: list[str], gen) -> list:  # each batch its own call: nothing to refill from
        return [a for s in range(0, len(keys), rows) for a in answer(keys[s: s + rows], gen, rows)]

    def refilled(answer, keys: list[str], gen) -> list:
        return answer(keys, gen, rows)

    def text(answer) -> str:  # the reference answers `Generation`s, the speech model strings
        return answer if isinstance(answer, str) else answer.text

    def produced(answer, limit: int) -> int:
        """Tokens decoded for an answer, its stop token included (a speech answer re-tokenized)."""
        if not isinstance(answer, str):
            return answer.tokens + answer.finished
        n = len(model.tokenizer.encode(answer, add_special_tokens=False))
        return limit if n >= limit else n + 1

    audio_flops: dict[str, float] = {}

    def clip_flops(key: str) -> float:
        """FLOPs of the audio encoder and adapter on one clip alone."""
        clip = es.item(key).audio
        if clip not in audio_flops:
            with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=SDPA_FLOPS) as counter:
                model.encode_audio([es.audio[clip]])
            audio_flops[clip] = counter.get_total_flops()
        return audio_flops[clip]

    def work(system: str, keys: list[str], tokens: list[int]) -> Work:
        if system == "reference":
            prompts = [reference.generator.prompt_ids(reference_prompt(es.item(k).description, es.instruction(k)))
                       for k in keys]
            return Work(flops.generation([len(p) for p in prompts], tokens, prompt_prefix_length(prompts)), 0.0,
                        sum(tokens))
        examples = [example(k) for k in keys]
        pieces = [model.prompt.pieces(ex.instruction, ex.transcript, has_audio=ex.has_audio) for ex in examples]
        shared = len(model.shared_prefix(examples, pieces))
        return Work(flops.generation([model.example_positions(ex) for ex in examples], tokens, shared),
                    sum(clip_flops(k) for k in keys), sum(tokens))

    print(f"checkpoint {args.checkpoint}, {len(es.items)} task items, {len(es.fitems)} forgetting items, "
          f"at most {rows} answers at once, the two ways alternating {args.rounds}x", flush=True)
    totals = {"alone": 0.0, "refilled": 0.0}
    timed: list[tuple[str, str, float, Work]] = []  # (system, group, refilled seconds, its work)
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
            same = sum(text(a) == text(b) for a, b in zip(answers["alone"], answers["refilled"]))
            for way in totals:
                totals[way] += best[way]
            timed.append((system, desc, best["refilled"], work(system, orders[system],
                                                               [produced(a, gen.max_new_tokens) for a in answers["refilled"]])))
            print(f"{system}, {desc} ({len(keys)}, at most {gen.max_new_tokens} new tokens): batches alone "
                  f"{best['alone']:.1f} s, refilled {best['refilled']:.1f} s ({best['alone'] / best['refilled']:.2f}x); "
                  f"identical answers {same}/{len(keys)}", flush=True)

    peak = matmul_peak(dtype=next(model.llm.parameters()).dtype)
    bandwidth, wbytes = copy_bandwidth(), weight_bytes(model.llm)
    one_sequence = bandwidth / wbytes
    print(f"matmul peak {peak / 1e9:.1f} GFLOP/s, copy bandwidth {bandwidth / 1e9:.1f} GB/s, LLM weights "
          f"{wbytes / 1e6:.0f} MB -> one-sequence decoding bound {one_sequence:.1f} steps/s, x {rows} rows")
    for system, desc, seconds, w in timed:
        bound = w.seconds(peak, rows, one_sequence)
        print(f"{system}, {desc}, refilled: {w.tokens} answer tokens, LLM {w.llm_flops / 1e12:.2f} TFLOP + audio "
              f"{w.audio_flops / 1e12:.3f} TFLOP -> bound {bound:.1f} s; {bound / seconds:.0%} of the bound")
    for system in ("reference", "speech model"):
        mine = [(s, w) for who, _, s, w in timed if who == system]
        share = sum(w.seconds(peak, rows, one_sequence) for _, w in mine) / sum(s for s, _ in mine)
        print(f"{system}, all groups refilled: {share:.0%} of the bound")
    share = sum(w.seconds(peak, rows, one_sequence) for *_, w in timed) / sum(s for _, _, s, _ in timed)
    print(f"total: batches alone {totals['alone']:.1f} s, refilled {totals['refilled']:.1f} s")
    print(f"evaluation, refilled: {share:.0%} of the bound")
    print(f"refill speedup {totals['alone'] / totals['refilled']:.2f}")


if __name__ == "__main__":
    main()
