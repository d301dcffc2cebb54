"""Pseudo-replay data: the base LLM writes its own instruction-answer pairs (Magpie), or answers
instructions a user gives (self-output of given instructions, e.g. a share of harmful requests
whose answers are the base model's own refusals). The output is a `train.replay.data` file.

Magpie: the LLM is fed its chat template up to and including the user turn's header
(`PromptBuilder.user_turn_open_ids`, the system prompt included) and samples the user's message
until it closes the turn (`user_turn_end_ids`); then it answers that instruction as it answers any
user (`generation.*`, greedy by default). Candidate batch b (`replay.batch_size` candidates) is
sampled with a seed drawn from (replay.seed, b), so the candidate stream is fixed by the settings.

A candidate is written to `<out>.errors.jsonl` with its reason instead of the output when
(`instruction_problem`, checked in this order):
- `empty`: no word;
- `no end of turn`: the model did not close the user turn within `replay.max_instruction_tokens`;
- `too short`: fewer than `replay.min_words` words;
- `not text`: it holds a control character or an undecodable byte (U+FFFD), under
  `MIN_LETTER_SHARE` of its non-space characters are letters (code, symbols, byte soup), or a
  "word" is longer than `MAX_WORD_CHARS` characters;
- `loop` / `repeats`: a span repeated back to back, or a 6-word span three times (the targets
  stage's `degenerate_reason`);
- `duplicate`: its normalized text (lower case, words only) equals an earlier candidate's;
- `answer empty` / `answer loop` / `answer repeats`: the answer is degenerate (same rules).
Answers that reach `train.max_target_tokens` stop there and are kept, flagged `truncated` (training
learns them without an end-of-turn), as targets are.

Both files together always hold a prefix of the candidate stream, written in order and flushed
record by record: a rerun (same settings) continues after the last candidate written, regenerating
at most the batch in flight, and writes nothing twice; a larger --n continues the same stream. A
file begun with other settings (model, system prompt, sampling, seed, batch size) is an error.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import sys
import time
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import __version__
from ..config import Config, ConfigError, GenerationConfig
from ..errors import SpeechLLMError
from ..io.jsonl import JsonlError, ResumableJsonl, iter_lines, sibling_path
from ..model.generate import Generation, TextGenerator, provenance
from ..model.llm import llm_identity
from ..records import MAX_INSTRUCTION_CHARS, ReplayRecord
from .checks import degenerate_reason, words

MAGPIE, GIVEN = "magpie", "given"
"""`source` of a record: an instruction the LLM wrote, or one of the user's."""
RULES = "replay-rules/1"
"""Version of the degenerate-instruction rules (recorded in each Magpie record's provenance)."""
MIN_LETTER_SHARE = 0.6
"""An instruction whose non-space characters are under this share letters is not text."""
MAX_WORD_CHARS = 40
"""A "word" (run of non-space characters) longer than this marks an instruction as not text."""
UNDECODABLE = "\ufffd"
"""What decoding puts for bytes that are not UTF-8 (a model writing byte soup)."""
PER_RECORD = ("batch", "batch_seed", "speechllm")
"""Provenance keys that vary per record or per release (not compared when a file is continued)."""
_NORMAL = re.compile(r"[^\w]+")


class ReplayError(SpeechLLMError, ValueError):
    """A pseudo-replay run that cannot go on (an unreadable instruction list, an output begun
    with other settings)."""


@dataclass
class ReplaySummary:
    wanted: int = 0
    """Magpie records asked for (--n)."""
    given: int = 0
    """Instructions read from --instructions."""
    done_before: int = 0
    """Records the output held before this run (of the sources asked for)."""
    written: int = 0
    """Records written by this run."""
    magpie: int = 0
    """Magpie records in the output at the end."""
    candidates: int = 0
    """Instructions the LLM wrote in this run (Magpie)."""
    rejected: dict[str, int] = field(default_factory=dict)
    """Candidates (and given instructions) sent to the errors file by this run, by reason."""
    truncated: int = 0
    """Answers written by this run that reached train.max_target_tokens (flagged truncated)."""
    new_tokens: int = 0
    seconds: float = 0.0

    @property
    def short(self) -> bool:
        """Fewer Magpie records than asked for: `replay.max_candidates` was reached."""
        return self.magpie < self.wanted

    def line(self, out: Path) -> str:
        rate = self.new_tokens / self.seconds if self.seconds else 0.0
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(self.rejected.items())) or "none"
        short = (f"; SHORT: {self.magpie} of {self.wanted} Magpie records after replay.max_candidates per record, "
                 "see the errors file" if self.short else "")
        return (f"replay: {self.written} written ({self.done_before} done before), {self.magpie}/{self.wanted} Magpie, "
                f"{self.given} given; {self.candidates} instructions written by the LLM, rejected: {reasons}; "
                f"{self.truncated} answers flagged too long; {self.new_tokens} tokens in {self.seconds:.1f} s "
                f"({rate:.1f} tok/s) -> {out}{short}")


def errors_path(out: Path) -> Path:
    return sibling_path(out, ".errors.jsonl")


def normalize(text: str) -> str:
    """What two instructions must share to be duplicates: lower-case words, punctuation and
    spacing dropped ("What is AI?" == "what is ai")."""
    return _NORMAL.sub(" ", text.lower()).strip()


def instruction_problem(text: str, finished: bool, min_words: int) -> str | None:
    """Why an instruction the LLM wrote is degenerate (see the module docstring), or None."""
    n_words = len(words(text))
    if n_words == 0:
        return "empty"
    if not finished:
        return "no end of turn"
    if n_words < min_words:
        return f"too short: {n_words} word(s)"
    if any(c == UNDECODABLE or unicodedata.category(c) == "Cc" and not c.isspace() for c in text):
        return "not text: control characters or undecodable bytes"
    visible = [c for c in text if not c.isspace()]
    letters = sum(c.isalpha() for c in visible) / len(visible)
    if letters < MIN_LETTER_SHARE:
        return f"not text: {letters:.0%} letters"
    if max(len(w) for w in text.split()) > MAX_WORD_CHARS:
        return f"not text: a {max(len(w) for w in text.split())}-character word"
    return degenerate_reason(text)


def answer_problem(text: str) -> str | None:
    """Why an answer is degenerate (empty, looping), or None."""
    reason = degenerate_reason(text)
    return f"answer {reason}" if reason else None


def read_instructions(path: str | Path) -> list[tuple[str, str]]:
    """(id, instruction) of a user's list: a `.jsonl` file of {"instruction", "id"?} objects, or a
    text file of one instruction a line (blank lines skipped). Ids default to `given-<line>`. A
    malformed JSONL line is an error naming the file and line."""
    path = Path(path)
    if not path.is_file():
        what = "is a folder, not" if path.is_dir() else "no such"
        raise ReplayError(f"--instructions {path}: {what} instruction file (one instruction a line, or JSONL with "
                          "an \"instruction\" each)")
    out = []
    if path.suffix == ".jsonl":
        for line in iter_lines(path, required=("instruction",)):
            if line.error:
                raise JsonlError(line.error)
            text, rid = line.record["instruction"], line.record.get("id")
            if not isinstance(text, str) or not text.strip():
                raise JsonlError(f"{path}:{line.number}: 'instruction' must be non-empty text")
            if rid is not None and (not isinstance(rid, (str, int)) or isinstance(rid, bool)):
                raise JsonlError(f"{path}:{line.number}: 'id' must be str or int")
            out.append((f"given-{line.number:06d}" if rid is None else str(rid), text.strip()))
    else:
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as err:
            raise ReplayError(f"--instructions {path}: cannot be read as UTF-8 text ({err})") from None
        out = [(f"given-{i:06d}", text.strip()) for i, text in enumerate(lines, start=1) if text.strip()]
    ids = [rid for rid, _ in out]
    if len(set(ids)) != len(ids):
        dup = next(rid for i, rid in enumerate(ids) if rid in ids[:i])
        raise ReplayError(f"--instructions {path}: id '{dup}' is given twice")
    return out


def batch_seed(seed: int, b: int) -> int:
    """The sampling seed of candidate batch `b` (a pure function of the run's seed and b)."""
    return int(np.random.SeedSequence([seed, b]).generate_state(1)[0])


class ReplayMaker:
    """Writes pseudo-replay records (see the module docstring) with one loaded base LLM."""

    def __init__(self, cfg: Config, generator: TextGenerator):
        self.cfg, self.gen, self.r = cfg, generator, cfg.replay
        self.answering = dataclasses.replace(cfg.generation, max_new_tokens=cfg.train.max_target_tokens)
        self.writing = GenerationConfig(max_new_tokens=self.r.max_instruction_tokens, do_sample=True,
                                        temperature=self.r.temperature, top_p=self.r.top_p, seed=self.r.seed)
        self.new_tokens = 0
        self.stop: list[int] = []
        """Token ids that end a written instruction: the token that closes the user turn, and eos
        (set by `check_magpie`)."""
        self.base = {**llm_identity(cfg.model.llm), "answer": provenance(self.answering)}
        self.magpie_settings = {**self.base, "instruction": {
            "temperature": self.r.temperature, "top_p": self.r.top_p, "max_new_tokens": self.r.max_instruction_tokens,
            "seed": self.r.seed, "batch_size": self.r.batch_size, "min_words": self.r.min_words, "rules": RULES}}

    def provenance(self, source: str, b: int, seed: int) -> dict:
        settings = self.magpie_settings if source == MAGPIE else self.base
        return {**settings, "batch": b, "batch_seed": seed, "speechllm": __version__}

    def answers(self, texts: list[str], seed: int) -> list[Generation]:
        """The base LLM's answers to user turns (`generation.*`, sampling seeded with `seed`)."""
        if not texts:
            return []
        sampling = dataclasses.replace(self.answering, seed=seed)
        outs = self.gen.generate([self.gen.prompt_ids(t) for t in texts], sampling, self.r.batch_size)
        self.new_tokens += sum(o.tokens for o in outs)
        return outs

    def instructions(self, seed: int) -> list[Generation]:
        """One batch of instructions written from the bare template (Magpie), seeded."""
        outs = self.gen.generate([self.gen.prompt.user_turn_open_ids] * self.r.batch_size,
                                 dataclasses.replace(self.writing, seed=seed), self.r.batch_size, stop_ids=self.stop)
        self.new_tokens += sum(o.tokens for o in outs)
        return outs

    def record(self, rid: str, source: str, instruction: str, answer: Generation, b: int, seed: int) -> ReplayRecord:
        n_tokens = self.gen.target_length(answer.text)
        truncated = not answer.finished or n_tokens > self.cfg.train.max_target_tokens
        return ReplayRecord(instruction, answer.text, rid, source, truncated, n_tokens,
                            self.provenance(source, b, seed))

    def check_magpie(self) -> None:
        """Before anything is written: the template closes a user turn with a token to stop on
        (`ChatTemplateError` otherwise), and a Magpie prompt, its longest instruction and answer
        fit the LLM's context (`ConfigError` otherwise)."""
        eos = self.gen.tokenizer.eos_token_id
        self.stop = self.gen.prompt.user_turn_end_ids + ([eos] if eos is not None else [])
        limit = self.gen.context_length
        need = (len(self.gen.prompt.user_turn_open_ids) + self.r.max_instruction_tokens
                + len(self.gen.prompt.suffix_ids) + self.answering.max_new_tokens)
        if limit is not None and need > limit:
            raise ConfigError(f"replay.max_instruction_tokens={self.r.max_instruction_tokens} and "
                              f"train.max_target_tokens={self.answering.max_new_tokens}: a Magpie record takes up "
                              f"to {need} positions, more than the LLM's context of {limit}")

    def fits(self, instruction: str) -> bool:
        limit = self.gen.context_length
        return limit is None or len(self.gen.prompt_ids(instruction)) + self.answering.max_new_tokens <= limit


class _Output:
    """The output and errors files of a run, what they hold, and the dedup state they imply."""

    def __init__(self, out: Path, maker: ReplayMaker, summary: ReplaySummary):
        self.summary = summary
        self.seen: dict[str, str] = {}
        """Normalized instruction -> the id of the first candidate that passed the instruction rules."""
        self.magpie = 0
        for line in iter_lines(out) if out.exists() else ():
            rec = line.record
            if rec is None or not isinstance(rec.get("instruction"), str):
                continue
            self.seen.setdefault(normalize(rec["instruction"]), str(rec.get("id")))
            self.magpie += rec.get("source") == MAGPIE
            if rec.get("source") in (MAGPIE, GIVEN):
                self._check_settings(out, line.number, rec, maker)
        for line in iter_lines(errors_path(out)) if errors_path(out).exists() else ():
            rec = line.record
            if rec is not None and rec.get("kind") == "answer" and isinstance(rec.get("instruction"), str):
                self.seen.setdefault(normalize(rec["instruction"]), str(rec.get("id")))
        self.done = ResumableJsonl(out)
        self.failed = ResumableJsonl(errors_path(out))

    @staticmethod
    def _check_settings(out: Path, number: int, rec: dict, maker: ReplayMaker) -> None:
        expected = maker.magpie_settings if rec["source"] == MAGPIE else maker.base
        found = {k: v for k, v in (rec.get("generator") or {}).items() if k not in PER_RECORD}
        if found != expected:
            keys = sorted(k for k in found.keys() | expected.keys() if found.get(k) != expected.get(k))
            raise ReplayError(f"{out}:{number}: a {rec['source']} record made with other settings ({', '.join(keys)} "
                              f"differ: {json.dumps({k: found.get(k) for k in keys})} now "
                              f"{json.dumps({k: expected.get(k) for k in keys})}); continue it with those settings "
                              "or write to another --out")

    def written(self, rid: str) -> bool:
        return rid in self.done or rid in self.failed

    def duplicate_of(self, rid: str, text: str) -> str | None:
        """The id of an earlier candidate with the same normalized instruction; else None, and
        `text` is remembered as `rid`'s."""
        first = self.seen.setdefault(normalize(text), rid)
        return first if first != rid else None

    def reject(self, rid: str, kind: str, reason: str, instruction: str, answer: str | None = None) -> None:
        if self.failed.write({"id": rid, "kind": kind, "error": reason, "instruction": instruction,
                              **({"answer": answer} if answer is not None else {})}):
            key = reason.split(":")[0]
            self.summary.rejected[key] = self.summary.rejected.get(key, 0) + 1

    def keep(self, record: ReplayRecord) -> None:
        if self.done.write(record.to_json()):
            self.summary.written += 1
            self.summary.truncated += record.truncated
            self.magpie += record.source == MAGPIE

    def close(self) -> None:
        self.done.close()
        self.failed.close()


def _given(maker: ReplayMaker, given: list[tuple[str, str]], files: _Output, bar) -> None:
    """Answer the user's instructions, batch by batch (batch b answered with seed (generation.seed, b))."""
    size = maker.r.batch_size
    for b, start in enumerate(range(0, len(given), size)):
        batch = given[start: start + size]
        if all(files.written(rid) for rid, _ in batch):
            continue
        asked: list[tuple[str, str]] = []
        problems: dict[str, tuple[str, str]] = {}
        for rid, text in batch:
            if len(text) > MAX_INSTRUCTION_CHARS or not maker.fits(text):
                problems[rid] = ("instruction", f"too long: {len(text)} characters, more than "
                                                f"{MAX_INSTRUCTION_CHARS} or than the LLM's context leaves room for")
            elif (first := files.duplicate_of(rid, text)) is not None:
                problems[rid] = ("instruction", f"duplicate: of {first}")
            else:
                asked.append((rid, text))
        seed = batch_seed(maker.cfg.generation.seed, b)
        answers = dict(zip((rid for rid, _ in asked), maker.answers([t for _, t in asked], seed)))
        for rid, text in batch:
            if files.written(rid):
                continue
            if rid in problems:
                files.reject(rid, *problems[rid], text)
            elif (why := answer_problem(answers[rid].text)) is not None:
                files.reject(rid, "answer", why, text, answers[rid].text)
            else:
                files.keep(maker.record(rid, GIVEN, text, answers[rid], b, seed))
            bar.update(1)


def _magpie(maker: ReplayMaker, n: int, files: _Output, summary: ReplaySummary, bar) -> None:
    """Candidate batches until the output holds `n` Magpie records (or `replay.max_candidates` per
    record were sampled); each batch written in candidate order, up to the n-th record."""
    size = maker.r.batch_size
    batches = math.ceil(n * maker.r.max_candidates / size)
    for b in range(batches):
        if files.magpie >= n:
            return
        ids = [f"{MAGPIE}-{b:06d}-{i:03d}" for i in range(size)]
        if all(files.written(rid) for rid in ids):
            continue
        seed = batch_seed(maker.r.seed, b)
        drafts = maker.instructions(seed)
        verdicts: list[str | None] = []
        for rid, g in zip(ids, drafts):
            reason = instruction_problem(g.text, g.finished, maker.r.min_words)
            if reason is None and (first := files.duplicate_of(rid, g.text)) is not None:
                reason = f"duplicate: of {first}"
            verdicts.append(reason)
        asked = [i for i, v in enumerate(verdicts) if v is None]
        answers = dict(zip(asked, maker.answers([drafts[i].text for i in asked], batch_seed(maker.answering.seed, b))))
        for i, (rid, g) in enumerate(zip(ids, drafts)):
            if files.magpie >= n:
                return
            if files.written(rid):
                continue
            summary.candidates += 1
            if verdicts[i] is not None:
                files.reject(rid, "instruction", verdicts[i], g.text)
            elif (why := answer_problem(answers[i].text)) is not None:
                files.reject(rid, "answer", why, g.text, answers[i].text)
            else:
                files.keep(maker.record(rid, MAGPIE, g.text, answers[i], b, seed))
                bar.update(1)


def make_replay(cfg: Config, out: str | Path, n: int = 0, instructions: str | Path | None = None,
                device: str = "cpu", progress: bool = True, generator: TextGenerator | None = None) -> ReplaySummary:
    """Write pseudo-replay data to `out` (see the module docstring): the answers of the base LLM
    (`cfg.model.llm`, with its system prompt) to the instructions in `instructions` (if given),
    then Magpie records until `out` holds `n` of them. Resumable; returns the counts.
    `generator` may be passed to reuse a loaded LLM."""
    from tqdm import tqdm

    out = Path(out)
    t0 = time.perf_counter()
    summary = ReplaySummary(wanted=n)
    given = read_instructions(instructions) if instructions is not None else []
    summary.given = len(given)
    if generator is None:
        generator = TextGenerator.from_config(cfg, device)
    maker = ReplayMaker(cfg, generator)
    if n:
        maker.check_magpie()
    files = _Output(out, maker, summary)
    try:
        done_given = sum(rid in files.done for rid, _ in given)
        summary.done_before = done_given + min(files.magpie, n)
        bar = tqdm(total=len(given) + n, initial=sum(files.written(rid) for rid, _ in given) + min(files.magpie, n),
                   desc="replay", unit="rec", disable=not progress, file=sys.stderr)
        _given(maker, given, files, bar)
        if n:
            _magpie(maker, n, files, summary, bar)
        bar.close()
        summary.magpie = files.magpie
    finally:
        files.close()
    summary.new_tokens = maker.new_tokens
    summary.seconds = time.perf_counter() - t0
    return summary
