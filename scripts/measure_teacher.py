"""Teacher fidelity by prompt: how often the frozen LLM's answer from a description agrees with
the description, zero-shot (DeSTA2's prompt) and with 1, 2, 3 worked examples, side by side on
the same seeded probe set (`speechllm.targets.fidelity`).

    python scripts/measure_teacher.py runs/demo/data/train.metadata.jsonl --per-attribute 24
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

from speechllm.config import load_config
from speechllm.demo import INSTRUCTION_POOL, SYSTEM_PROMPT
from speechllm.io.jsonl import iter_lines
from speechllm.model.generate import TextGenerator
from speechllm.records import MetadataRecord
from speechllm.targets.examples import ExamplePool
from speechllm.targets.fidelity import measure, probes

ANSWER_TOKENS = 48
"""Answer length of a probe (as in `speechllm targets`)."""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("metadata", help="metadata.jsonl whose descriptions are probed (and examples drawn from)")
    p.add_argument("--examples", type=int, nargs="+", default=[0, 1, 2, 3], help="worked examples per prompt")
    p.add_argument("--per-attribute", type=int, default=24, help="probe questions per attribute")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--config", help="config of the teacher (default: the embedded default)")
    p.add_argument("--system-prompt", default=SYSTEM_PROMPT, help="the teacher's system prompt (default: the demo's)")
    p.add_argument("--json", metavar="FILE", help="also write the table as JSON")
    args = p.parse_args()

    cfg = load_config(args.config, [f"model.llm.system_prompt={args.system_prompt}"])
    clips = [MetadataRecord.from_json(line.record, f"{args.metadata}:{line.number}")
             for line in iter_lines(Path(args.metadata)) if line.record is not None]
    described = [(c.id, c.description) for c in clips]
    items = probes(described, INSTRUCTION_POOL, args.per_attribute, args.seed)
    gen = TextGenerator.from_config(cfg)
    greedy = dataclasses.replace(cfg.generation, do_sample=False, max_new_tokens=ANSWER_TOKENS)

    def answer(prompts):
        ids = [gen.prompt_ids(text, list(turns)) for text, turns in prompts]
        return [g.text for g in gen.generate(ids, greedy, args.batch_size)]

    table = {}
    for k in args.examples:
        t0 = time.perf_counter()
        result = measure(items, answer, ExamplePool(described, k, args.seed))
        table[k] = result.to_json()["attributes"]
        print(f"{result.line()}  [{time.perf_counter() - t0:.0f} s]", flush=True)
    attributes = list(next(iter(table.values())))
    print("\n| attribute | " + " | ".join(f"{k} examples" for k in table) + " |")
    print("|---|" + "---|" * len(table))
    for a in attributes:
        print(f"| {a} | " + " | ".join(f"{v[a]['agreed']}/{v[a]['asked']} ({v[a]['fidelity']:.0%})"
                                       for v in table.values()) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(table, indent=2) + "\n")


if __name__ == "__main__":
    main()
