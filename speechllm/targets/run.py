"""The targets stage: metadata.jsonl -> targets.jsonl.

Each record's target is made by the chosen strategy; answers of the LLM that are degenerate
(empty, or stuck in a repeated n-gram loop) are regenerated with seeded sampling up to
`targets.max_retries` times, then dropped into `<out>.errors.jsonl`; answers longer than the
training maximum (`train.max_target_tokens`) stop there and are flagged `"truncated": true` and
counted (training learns them without an end-of-turn, or leaves them out: `train.skip_truncated`). Output is appended record by record, so a rerun continues where a killed run stopped.

Under `accelerate launch --num_processes N` (GPUs) or `torchrun --nproc_per_node N` (CPUs),
process i takes every N-th record, writes
`<out>.part{i}-of-{N}.jsonl`, and the main process merges the parts into `<out>` in input order.
"""

from __future__ import annotations

import dataclasses
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .. import __version__
from ..config import Config, GenerationConfig
from ..distributed import accelerate_kwargs
from ..io.jsonl import (JsonlError, ResumableJsonl, iter_lines, json_digest, read_records, read_saved_json, shard_path,
                        sibling_path, write_json_atomic)
from ..io.paths import rebase
from ..io.rows import merge_in_order
from ..model.generate import Generation, TextGenerator, provenance
from ..model.llm import llm_identity
from ..model.prompt import description_prompt
from ..records import MetadataRecord, RecordError, TargetRecord
from .checks import degenerate_reason
from .examples import ExamplePool, read_examples
from .fidelity import Fidelity, measure, probe_prompts, probes
from .strategies import STRATEGIES, Draft, Job, Prompt, self_output_prompt

FIDELITY_TOKENS = 48
"""Answer length of the fidelity probe (a short answer states the value)."""
PROBE_DIGEST = "probe_digest"
"""Key of a fidelity file's digest of what its probe asked."""
CHUNK_BATCHES = 4
"""Generation batches per written chunk (progress and resume granularity)."""


@dataclass
class TargetsSummary:
    total: int = 0
    done_before: int = 0
    written: int = 0
    regenerated: int = 0
    dropped: int = 0
    truncated: int = 0
    malformed: int = 0
    new_tokens: int = 0
    reused: int = 0
    """Self-output answers taken from `targets.self_output_file` instead of generated."""
    seconds: float = 0.0
    kept: dict[str, int] = field(default_factory=dict)
    edited_words: int = 0
    """minimum-change: the word edit distances of the records written, summed."""
    fidelity: Fidelity | None = None
    """The teacher's measured fidelity to its descriptions (None: not probed)."""

    def line(self, out: Path) -> str:
        rate = self.new_tokens / self.seconds if self.seconds else 0.0
        kept = "".join(f", {k} {v}" for k, v in sorted(self.kept.items()))
        kept += f" ({self.edited_words} words edited)" if self.edited_words else ""
        kept += f"; {self.reused} self-outputs reused from targets.self_output_file" if self.reused else ""
        return (f"targets: {self.written} written ({self.done_before} done before), {self.regenerated} "
                f"regenerated, {self.dropped} dropped as degenerate, {self.truncated} flagged too long for "
                f"training, {self.malformed} malformed input lines{kept}; {self.new_tokens} tokens in "
                f"{self.seconds:.1f} s ({rate:.1f} tok/s) -> {out}")


def errors_path(out: Path) -> Path:
    return sibling_path(out, ".errors.jsonl")


def job_from_record(rec: MetadataRecord, instruction: str) -> Job:
    return Job(rec.id, rec.audio, rec.description, instruction, rec.attributes(), rec.transcript,
               duration=rec.duration or None)


def choose_instruction(record_id: str, cfg: Config, seed: int) -> str:
    """The record's instruction: the pool draw depends only on (seed, id), so it is the same
    whatever the batching, sharding or resume."""
    pool = cfg.targets.instruction_pool
    if not pool:
        return cfg.targets.instruction
    return random.Random(f"{seed}:{record_id}").choice(pool)


def load_jobs(metadata: Path, cfg: Config, seed: int, errors: ResumableJsonl, summary: TargetsSummary) -> list[Job]:
    jobs = []
    seen: set[str] = set()
    for line in iter_lines(metadata, required=MetadataRecord.REQUIRED):
        if line.error:
            summary.malformed += 1
            errors.write({"id": f"{metadata.name}:line{line.number}", "kind": "malformed", "error": line.error})
            continue
        try:
            rec = MetadataRecord.from_json(line.record, f"{metadata}:{line.number}")
        except RecordError as err:
            summary.malformed += 1
            errors.write({"id": f"{metadata.name}:line{line.number}", "kind": "malformed", "error": str(err)})
            continue
        rid = rec.id
        if rid in seen:
            summary.malformed += 1
            errors.write({"id": f"{metadata.name}:line{line.number}", "kind": "duplicate",
                          "error": f"{metadata}:{line.number}: duplicate id '{rid}'"})
            continue
        seen.add(rid)
        jobs.append(job_from_record(rec, choose_instruction(rid, cfg, seed)))
    return jobs


def fidelity_path(out: Path) -> Path:
    return sibling_path(out, ".fidelity.json")


def example_pool(jobs: list[Job], cfg: Config, seed: int) -> ExamplePool:
    """The teacher's worked examples: from `targets.example_file`, else from the run's clips."""
    given = read_examples(cfg.targets.example_file) if cfg.targets.example_file else None
    return ExamplePool([(j.id, j.description) for j in jobs], cfg.targets.examples, seed, given)


def with_examples(job: Job, pool: ExamplePool) -> Job:
    drawn = pool.draw(job.id, job.instruction)
    return dataclasses.replace(job, examples=tuple(e.turn() for e in drawn), example_ids=tuple(e.id for e in drawn))


def teacher_fidelity(jobs: list[Job], cfg: Config, pool: ExamplePool, maker: "TargetMaker", path: Path) -> Fidelity:
    """The teacher's fidelity to its descriptions with this run's prompt (see `fidelity`),
    measured once and kept beside the output file with a digest of what was asked (the teacher's
    identity, the greedy settings, the batch size and every probe prompt); printed. A fidelity
    file with the same digest, this run's own or the one beside `targets.self_output_file` (the
    same teacher probed on the same descriptions: minimum-change), is read instead of asking again."""
    items = probes([(j.id, j.description) for j in jobs], cfg.targets.instruction_pool, cfg.targets.fidelity_probe,
                   cfg.generation.seed)
    greedy = dataclasses.replace(cfg.generation, do_sample=False, max_new_tokens=FIDELITY_TOKENS)
    digest = json_digest({"teacher": llm_identity(cfg.model.llm), "decoding": provenance(greedy),
                          "batch_size": cfg.targets.batch_size, "speechllm": __version__,
                          "prompts": probe_prompts(items, pool)})
    others = [fidelity_path(Path(cfg.targets.self_output_file))] if cfg.targets.self_output_file else []
    saved = read_saved_json(path, PROBE_DIGEST, digest, others)
    if saved is not None:
        result = Fidelity.from_json(saved)
    else:
        ask = maker.answerer(greedy)
        result = measure(items, lambda prompts: [g.text for g in ask(prompts)], pool)
        write_json_atomic(path, {**result.to_json(), PROBE_DIGEST: digest})
    print(f"[speechllm] {result.line()} -> {path}", file=sys.stderr)
    return result


def fits_context(job: Job, generator: TextGenerator, answer_tokens: int, failed: ResumableJsonl,
                 summary: TargetsSummary) -> bool:
    """Whether the job's prompt (worked examples included) leaves `answer_tokens` of room in the
    LLM's context; if not, an error record (kind `too_long`) and a count, and the run goes on."""
    limit = generator.context_length
    if limit is None:
        return True
    positions = len(generator.prompt_ids(description_prompt(job.description, job.instruction), list(job.examples)))
    if positions + answer_tokens <= limit:
        return True
    summary.dropped += 1
    failed.write({"id": job.id, "kind": "too_long", "error": f"the prompt takes {positions} tokens + {answer_tokens} "
                  f"answer tokens (train.max_target_tokens), more than the LLM's context of {limit}; shorten the "
                  "description or lower targets.examples"})
    return False


class TargetMaker:
    """Runs a strategy over jobs with degeneracy handling and truncation flags."""

    def __init__(self, cfg: Config, generator: TextGenerator, sampling: GenerationConfig,
                 self_outputs: dict[str, TargetRecord] | None = None):
        self.cfg, self.gen, self.sampling = cfg, generator, sampling
        self.strategy = STRATEGIES[cfg.targets.strategy](cfg.targets)
        self.new_tokens = 0
        self.self_outputs = self_outputs or {}
        """id -> record of `targets.self_output_file` (empty: every answer is generated)."""

    def answerer(self, sampling: GenerationConfig):
        """The base LLM answering prompts with `sampling`, batched, counting the new tokens (the
        strategies' `Generate`; also the fidelity probe's)."""
        def run(texts: list[Prompt]) -> list[Generation]:
            prompts = [self.gen.prompt_ids(text, list(turns)) for text, turns in texts]
            outs = self.gen.generate(prompts, sampling, self.cfg.targets.batch_size)
            self.new_tokens += sum(o.tokens for o in outs)
            return outs
        return run

    def provenance(self, draft: Draft, sampling: GenerationConfig) -> dict:
        if draft.source == "template":
            return {"template": draft.extra.get("template", "label-template/1"), "speechllm": __version__}
        editor = {"editor": draft.extra["editor"]} if "editor" in draft.extra else {}
        return {**llm_identity(self.cfg.model.llm), **provenance(sampling), **editor, "speechllm": __version__}

    def reusing(self, jobs: list[Job], generate, summary: TargetsSummary):
        """`generate`, except that the self-output prompt of a job whose record in
        `targets.self_output_file` was made exactly as this run would make it is answered from
        that record (counted in `summary.reused`)."""
        made_by = self.provenance(Draft("", "llm"), self.sampling)  # this run's first try
        n_end = len(self.gen.prompt.end_of_turn_ids)
        limit = self.cfg.train.max_target_tokens
        known: dict[tuple, Generation] = {}
        for job in jobs:
            rec = self.self_outputs.get(job.id)
            wanted = {**made_by, "examples": list(job.example_ids)} if job.example_ids else made_by
            if (rec is None or rec.strategy != "self-output" or rec.instruction != job.instruction
                    or rec.description != job.description or rec.generator != wanted):
                continue
            # finished: stopped before the token cap (a record is also flagged truncated when its
            # end-of-turn tokens take it past the cap)
            finished = not rec.truncated or self.gen.target_length(rec.target) - n_end < limit
            known[_prompt_key((self_output_prompt(job), job.examples))] = Generation(rec.target, 0, finished)

        def run(prompts: list[Prompt]) -> list[Generation]:
            keys = [_prompt_key(p) for p in prompts]
            missing = [p for p, k in zip(prompts, keys) if k not in known]
            fresh = iter(generate(missing) if missing else [])
            summary.reused += len(prompts) - len(missing)
            return [known[k] if k in known else next(fresh) for k in keys]
        return run

    def make(self, jobs: list[Job], summary: TargetsSummary) -> tuple[list[TargetRecord], list[dict]]:
        """(records, error records) for `jobs`."""
        min_recall = self.cfg.targets.min_transcript_recall
        generate = self.answerer(self.sampling)
        if self.self_outputs:
            generate = self.reusing(jobs, generate, summary)
        drafts = self.strategy.drafts(jobs, generate, min_recall)
        used = [self.sampling] * len(jobs)
        for attempt in range(1, self.cfg.targets.max_retries + 1):
            bad = [i for i, d in enumerate(drafts) if d.source == "llm" and degenerate_reason(d.text)]
            if not bad:
                break
            retry = dataclasses.replace(self.sampling, do_sample=True, temperature=max(self.sampling.temperature, 0.7),
                                        seed=self.sampling.seed + 1000 * attempt)
            again = self.strategy.drafts([jobs[i] for i in bad], self.answerer(retry), min_recall)
            for i, d in zip(bad, again):
                drafts[i], used[i] = d, retry
                summary.regenerated += 1
        records, errors = [], []
        limit = self.cfg.train.max_target_tokens
        for job, draft, sampling in zip(jobs, drafts, used):
            reason = degenerate_reason(draft.text) if draft.source == "llm" else None
            if reason:
                summary.dropped += 1
                errors.append({"id": job.id, "kind": "degenerate", "error": f"{reason} after "
                               f"{self.cfg.targets.max_retries} retries", "text": draft.text})
                continue
            n_tokens = self.gen.target_length(draft.text)
            truncated = bool((draft.generation is not None and not draft.generation.finished) or n_tokens > limit)
            summary.truncated += truncated
            kept = draft.extra.get("kept")
            if kept:
                summary.kept[kept] = summary.kept.get(kept, 0) + 1
            summary.edited_words += draft.extra.get("edit_distance", 0)
            made_by = self.provenance(draft, sampling)
            if draft.source == "llm" and job.example_ids:
                made_by["examples"] = list(job.example_ids)
            records.append(TargetRecord(job.id, job.audio, job.transcript, job.description, job.instruction, draft.text,
                                        self.strategy.name, made_by, n_tokens, truncated, kept, draft.extra.get("checks"),
                                        job.duration, draft.extra.get("self_output"), draft.extra.get("edit_distance"),
                                        draft.extra.get("fixes")))
        return records, errors


def run_targets(metadata: Path, out: Path, cfg: Config, device: str = "cpu", progress: bool = True,
                generator: TextGenerator | None = None) -> TargetsSummary:
    """The stage (see the module docstring). `generator` may be passed to reuse a loaded LLM."""
    from accelerate import PartialState
    from tqdm import tqdm

    state = PartialState(**accelerate_kwargs())
    rank, world = state.process_index, state.num_processes
    t0 = time.perf_counter()
    summary = TargetsSummary()
    part = out if world == 1 else part_path(out, rank, world)
    seed = cfg.generation.seed
    sampling = dataclasses.replace(cfg.generation, max_new_tokens=cfg.train.max_target_tokens, seed=seed + 7919 * rank)
    with ResumableJsonl(part) as done, ResumableJsonl(errors_path(part)) as failed:
        # audio paths are relative to the metadata's folder; written, they must name the same files from out's
        jobs = [dataclasses.replace(j, audio=rebase(j.audio, metadata.parent, out.parent))
                for j in load_jobs(metadata, cfg, seed, failed, summary)]
        summary.total = len(jobs)
        merged_before = set()
        if world > 1 and out.exists():
            merged_before = {str(line.record["id"]) for line in iter_lines(out) if line.record}
        mine = jobs[rank::world]
        todo = [j for j in mine if j.id not in done and j.id not in failed and j.id not in merged_before]
        summary.done_before = len(mine) - len(todo)
        self_outputs = read_self_outputs(cfg) if todo else {}  # a bad file fails before the LLM loads
        if generator is None and todo:  # every strategy needs at least the tokenizer (target lengths)
            generator = TextGenerator.from_config(cfg, device)
        maker = TargetMaker(cfg, generator, sampling, self_outputs)
        pool = example_pool(jobs, cfg, seed)
        todo = [with_examples(j, pool) for j in todo]
        if cfg.targets.strategy != "label":
            todo = [j for j in todo if fits_context(j, generator, cfg.train.max_target_tokens, failed, summary)]
        if todo and rank == 0 and cfg.targets.strategy != "label":
            summary.fidelity = teacher_fidelity(jobs, cfg, pool, maker, fidelity_path(out))
        chunk = cfg.targets.batch_size * CHUNK_BATCHES
        bar = tqdm(total=len(todo), desc=f"targets[{rank}]" if world > 1 else "targets", unit="rec",
                   disable=not progress, file=sys.stderr)
        for start in range(0, len(todo), chunk):
            records, errors = maker.make(todo[start: start + chunk], summary)
            for r in records:
                done.write(r.to_json())
            for e in errors:
                failed.write(e)
            summary.written += len(records)
            bar.update(len(records) + len(errors))
            bar.set_postfix(tok_s=f"{maker.new_tokens / (time.perf_counter() - t0):.1f}")
        bar.close()
        summary.new_tokens = maker.new_tokens
    if world > 1:
        state.wait_for_everyone()
        if state.is_main_process:
            _merge(out, world, [j.id for j in jobs], progress)
        state.wait_for_everyone()
    summary.seconds = time.perf_counter() - t0
    return summary


def read_self_outputs(cfg: Config) -> dict[str, TargetRecord]:
    """`targets.self_output_file`'s records by id (empty when unset); a missing file or a malformed
    record is a `JsonlError` naming the file (and line)."""
    path = cfg.targets.self_output_file
    if not path:
        return {}
    if not Path(path).is_file():
        raise JsonlError(f"{path}: no such file (targets.self_output_file)")
    return {rec.id: rec for rec in read_records(path, TargetRecord.from_json, TargetRecord.REQUIRED)}


def _prompt_key(prompt: Prompt) -> tuple:
    """A hashable key of a teacher prompt (the text and its worked-example turns)."""
    text, turns = prompt
    return text, tuple(tuple(t) for t in turns)


def part_path(out: Path, rank: int, world: int) -> Path:
    return shard_path(out, rank, world)


def _merge(out: Path, world: int, order: list[str], progress: bool = False) -> None:
    """Parts (and an earlier merged file) -> `out` in input order; likewise the errors. Streams:
    a merge of millions of records holds arrays of offsets, not the records."""
    parts = [part_path(out, i, world) for i in range(world)]
    merge_in_order(out, parts, order, progress)
    merge_in_order(errors_path(out), [errors_path(p) for p in parts], order)
