"""Refusal rate of a base LLM on the held-out AdvBench requests, typed, as `speechllm eval`'s safety
check measures its reference (`speechllm.eval.safety`): how often the model refuses at all, which
decides whether a speech model built on it can be seen to lose refusals.

    python scripts/measure_safety.py --items 24                      # the demo's system prompt
    python scripts/measure_safety.py --items 24 --system-prompt ""   # the chat template's own default
"""

from __future__ import annotations

import argparse
import time
from collections import Counter

from speechllm.config import GenerationConfig, load_config
from speechllm.demo import SYSTEM_PROMPT
from speechllm.eval.safety import held_out_requests, load_requests, refusal_pattern
from speechllm.model.generate import TextGenerator

ANSWER_TOKENS: int = load_config(None).eval.safety_max_new_tokens
"""Answer length, as `speechllm eval` asks (eval.safety_max_new_tokens)."""
PREVIEW_CHARS = 100
"""Characters of each answer printed with --show."""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=int, default=24, help="held-out requests asked (eval.safety_items)")
    p.add_argument("--seed", type=int, default=0, help="which sample of the held-out requests (eval.seed)")
    p.add_argument("--system-prompt", default=SYSTEM_PROMPT,
                   help="system prompt (default: the demo's); an empty string keeps the chat template's default")
    p.add_argument("--config", help="config naming the LLM (default: the embedded default)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--safety-file", help="requests to use instead of AdvBench, one per line")
    p.add_argument("--show", action="store_true", help="print each request with the start of its answer")
    args = p.parse_args()

    overrides = [f"model.llm.system_prompt={args.system_prompt}"] if args.system_prompt else []
    cfg = load_config(args.config, overrides)
    requests = held_out_requests(load_requests(args.safety_file), args.items, args.seed)
    gen = TextGenerator.from_config(cfg)
    t0 = time.perf_counter()
    answers = gen.generate([gen.prompt_ids(r.text) for r in requests], GenerationConfig(max_new_tokens=ANSWER_TOKENS),
                           args.batch_size)
    seconds = time.perf_counter() - t0
    patterns = [refusal_pattern(a.text) for a in answers]
    if args.show:
        for r, a, pat in zip(requests, answers, patterns):
            print(f"[{pat or 'complies'}] {r.id} {r.text!r} -> {a.text[:PREVIEW_CHARS]!r}")
    refused = sum(pat is not None for pat in patterns)
    shown = repr(args.system_prompt) if args.system_prompt else "the chat template's default"
    print(f"{cfg.model.llm.name}, system prompt {shown}: refused {refused}/{len(requests)} "
          f"({100 * refused / len(requests):.1f}%); patterns {dict(Counter(p for p in patterns if p))}")
    print(f"{seconds:.1f} s for {len(requests)} answers of up to {ANSWER_TOKENS} tokens, batch {args.batch_size}: "
          f"{seconds / len(requests):.2f} s per request, {sum(a.tokens for a in answers)} tokens")


if __name__ == "__main__":
    main()
