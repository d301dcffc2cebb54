"""Minimum change on an existing self-output targets file: what the code fixes change (by the
metadata's labels), the minimal-edit prompt against the code on made-up missed transcripts, and
the target NLL of every strategy's file side by side.

    python scripts/measure_minimum_change.py runs/demo/data/train.self-output.targets.jsonl \\
        runs/demo/data/train.metadata.jsonl --out /tmp/mc --nll runs/demo/data/train.label.targets.jsonl

Nothing is written beside the inputs: the minimum-change file (the self-outputs with the code
fixes) and every NLL sidecar go to --out (the inputs are copied there first).

Made-up misses for the prompt: each answer to "what was said" given another such answer's
transcript, and `--open` answers to other instructions (which give no words at all) asked "What
did the speaker say?".
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from collections import Counter
from pathlib import Path

from speechllm.config import GenerationConfig, load_config
from speechllm.demo import SYSTEM_PROMPT
from speechllm.io.jsonl import iter_lines
from speechllm.model.generate import TextGenerator
from speechllm.records import MetadataRecord, TargetRecord
from speechllm.targets.edits import (asks_transcript, better_edit, contains_transcript, fix_attributes,
                                     insert_transcript, minimal_edit_prompt, word_edit_distance)
from speechllm.targets.nll import nll_path, summary_line, target_nll

PROMPT_TOKENS = 64
"""Answer length of the minimal-edit prompt (the demo's target length)."""
OPEN_INSTRUCTION = "What did the speaker say?"


def read(path: Path, cls):
    return [cls.from_json(line.record, f"{path}:{line.number}") for line in iter_lines(path) if line.record]


def code_fixes(targets: list[TargetRecord], meta: dict[str, MetadataRecord], out: Path) -> Path:
    """Apply the code fixes, print what changed, write the minimum-change file into `out`."""
    changed, distances, kinds, missed = 0, [], Counter(), 0
    path = out / "minimum-change.targets.jsonl"
    with open(path, "w") as f:
        for rec in targets:
            clip = meta[rec.id]
            fixed, fixes = fix_attributes(rec.target, clip.attributes(), rec.instruction, clip.transcript)
            if clip.transcript and asks_transcript(rec.instruction) and not contains_transcript(fixed, clip.transcript):
                missed += 1
                fixed, fix = insert_transcript(fixed, clip.transcript, not rec.truncated)
                fixes.append(fix)
            if fixes:
                changed += 1
                distances.append(word_edit_distance(rec.target, fixed))
                kinds.update(f"{x.attribute} {x.how}" for x in fixes)
            f.write(json.dumps({**rec.to_json(), "target": fixed, "strategy": "minimum-change"}) + "\n")
    mean = sum(distances) / len(distances) if distances else 0.0
    print(f"code fixes: {changed}/{len(targets)} answers changed, {mean:.2f} words on average (at most "
          f"{max(distances, default=0)}), {missed} missed transcripts; {dict(kinds.most_common())}")
    return path


def prompt_against_code(targets: list[TargetRecord], gen: TextGenerator, n_open: int, batch_size: int) -> None:
    said = [r for r in targets if r.transcript and asks_transcript(r.instruction)]
    others = [r for r in targets if r.transcript and not asks_transcript(r.instruction) and not r.truncated]
    cases = [(r.instruction, r.target.replace(r.transcript, said[(k + 1) % len(said)].transcript), r.transcript)
             for k, r in enumerate(said)]
    cases += [(OPEN_INSTRUCTION, r.target, r.transcript) for r in others[:n_open]]
    t0 = time.perf_counter()
    outs = gen.generate([gen.prompt_ids(minimal_edit_prompt(i, a, t)) for i, a, t in cases],
                        GenerationConfig(max_new_tokens=PROMPT_TOKENS), batch_size)
    seconds = time.perf_counter() - t0
    contains = accepted = 0
    d_prompt, d_code = [], []
    for (_, answer, transcript), o in zip(cases, outs):
        coded, _ = insert_transcript(answer, transcript)
        contains += contains_transcript(o.text, transcript)
        accepted += better_edit(answer, o.text, coded, transcript)
        d_prompt.append(word_edit_distance(answer, o.text))
        d_code.append(word_edit_distance(answer, coded))
    print(f"minimal-edit prompt on {len(cases)} made-up misses: its answer contains the transcript {contains}, "
          f"accepted (contains it, no more words changed than the code) {accepted}; words changed on average: "
          f"prompt {sum(d_prompt) / len(cases):.1f}, code {sum(d_code) / len(cases):.1f} ({seconds:.0f} s)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("targets", help="a self-output targets.jsonl")
    p.add_argument("metadata", help="the metadata.jsonl it was made from (the labels)")
    p.add_argument("--out", required=True, help="folder for the minimum-change file and the NLL sidecars")
    p.add_argument("--nll", nargs="*", default=[], metavar="TARGETS", help="more targets files to score side by side")
    p.add_argument("--no-prompt", action="store_true", help="skip the minimal-edit prompt measurement")
    p.add_argument("--open", type=int, default=8, help="answers to other instructions used as misses")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--config", help="config of the base LLM (default: the embedded default)")
    p.add_argument("--system-prompt", default=SYSTEM_PROMPT, help="its system prompt (default: the demo's)")
    args = p.parse_args()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = load_config(args.config, [f"model.llm.system_prompt={args.system_prompt}",
                                    f"targets.batch_size={args.batch_size}"])
    targets = read(Path(args.targets), TargetRecord)
    meta = {m.id: m for m in read(Path(args.metadata), MetadataRecord)}
    minimum = code_fixes(targets, meta, out)
    gen = TextGenerator.from_config(cfg)
    if not args.no_prompt:
        prompt_against_code(targets, gen, args.open, args.batch_size)
    copies = []
    for src in [args.targets, *args.nll]:
        copies.append(out / Path(src).name)
        shutil.copyfile(src, copies[-1])
    for path in [*copies, minimum]:
        t0 = time.perf_counter()
        result = target_nll(path, cfg, progress=False, generator=gen)
        print(f"{path.name}: {summary_line(result, nll_path(path))} ({time.perf_counter() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
