"""Target perplexity: how probable the base LLM finds a targets file's targets.

For each record, the base LLM reads the user turn the self-output targets are generated from,
`description\\n\\ninstruction` in its chat template with the run's system prompt, and scores the
target as training learns it (with the end-of-turn token when complete; a target flagged
`truncated` without it). The file's figure is the mean negative log-likelihood per target token
(nats), pooled over every token of every record. The ids every prompt starts with (chat template,
system prompt) are run once for the file and their KV cache shared by every batch, the LM head
runs only where a target token is predicted, and a minimum-change file takes the values of the
self-output records it kept unchanged (`targets.self_output_file`'s sidecar keeps each record's
sum): the demo's three files (192 records each, 79-token prompts, 28 ids shared; 2-core AVX2 CPU,
fp32) took 33 + 10 + 47 s against 59 + 55 + 66 s with full logits over whole prompts, every
figure the same to 7 digits. "The Self-Output is All You Need" measures why
self-output targets keep a model's abilities this way, its own answers being far more probable to
it than human-written labels.

The prompt has no worked examples, even where the teacher saw some (`targets.examples`): the
examples are the teacher's only, the speech model never sees them, and label or paraphrase targets
had none, so the zero-shot prompt is the one that measures every strategy's targets alike (it is
also what `train.token_masking` scores against).

The result is kept beside the file as `<targets>.nll.json` (like the fidelity sidecar), written
after every chunk of records with the identity of what was scored (the file's sha256, the LLM and
its fingerprint, the system prompt): a rerun on the same file and LLM continues where a killed run
stopped and returns a finished result without loading the LLM.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch

from ..config import Config
from ..errors import SpeechLLMError
from ..hub import weights
from ..io.jsonl import read_records, sibling_path, write_json_atomic
from ..model.generate import TextGenerator
from ..model.llm import llm_identity
from ..model.prefix import expand_cache, prefix_cache, prompt_prefix_length, states_after_prefix
from ..model.prompt import PromptBuilder, description_prompt
from ..model.speechllm import IGNORE_INDEX
from ..records import TargetRecord

NLL_SUFFIX = ".nll.json"
"""The sidecar of `<targets>.jsonl`: `<targets>.nll.json`."""
NLL_FORMAT = 2
"""Version of the scoring (prompt and target layout); a change makes every sidecar stale."""
CHUNK_BATCHES = 4
"""Batches between two writes of the sidecar (resume granularity)."""


class NLLError(SpeechLLMError, ValueError):
    """A targets file that cannot be scored (a malformed record, no description)."""


def nll_path(targets: str | Path) -> Path:
    """`data/x.targets.jsonl` -> `data/x.targets.nll.json`."""
    return sibling_path(targets, NLL_SUFFIX)


def _identity(targets: Path, cfg: Config) -> dict:
    return {"format": NLL_FORMAT, "targets_sha256": weights.sha256_file(targets), **llm_identity(cfg.model.llm),
            "prompt": "description + instruction, no worked examples"}


def _records(targets: Path) -> list[TargetRecord]:
    """The file's records, each with a description (a malformed one is an error naming file:line)."""
    def parse(obj: dict, where: str) -> TargetRecord:
        rec = TargetRecord.from_json(obj, where)
        if not rec.description.strip():
            raise NLLError(f"{where}: no description; the target's NLL is scored given the description the "
                           "targets stage wrote (rewrite the file with `speechllm targets`)")
        return rec
    return read_records(targets, parse, TargetRecord.REQUIRED)


@torch.inference_mode()
def _batch_token_nll(llm, pad_id: int, pairs: list[tuple[list[int], list[int]]], prefix: list[int],
                     prefix_kv) -> list[torch.Tensor]:
    """NLL (nats) of each target token given its prompt, one (len(target),) float32 tensor per
    pair; `pairs` are (prompt ids, target ids), every prompt starting with `prefix` (whose batch-1
    KV cache is `prefix_kv`; None when empty). The rest of each prompt and its target are scored
    right-padded (with `pad_id`) after the expanded prefix in one pass of the decoder: hidden states
    (batch, longest rest, width); the LM head runs only on the positions that predict a target token."""
    device = llm.get_input_embeddings().weight.device
    n = len(prefix)
    rests = [p[n:] + t for p, t in pairs]
    longest = max(map(len, rests))
    ids = torch.full((len(pairs), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(pairs), longest), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(pairs), n + longest), dtype=torch.long)
    mask[:, :n] = 1
    for row, ((p, t), rest) in enumerate(zip(pairs, rests)):
        ids[row, : len(rest)] = torch.tensor(rest)
        mask[row, n: n + len(rest)] = 1
        first = len(p) - n - 1  # the prompt's last position predicts the target's first token
        labels[row, first: first + len(t)] = torch.tensor(t, dtype=torch.long)
    ids, labels, mask = ids.to(device), labels.to(device), mask.to(device)
    cache = None if prefix_kv is None else expand_cache(llm, prefix_kv, len(pairs))
    hidden = states_after_prefix(llm, mask, n, cache, input_ids=ids)
    predict = labels != IGNORE_INDEX
    logits = llm.get_output_embeddings()(hidden[predict]).float()
    tokens = torch.nn.functional.cross_entropy(logits, labels[predict], reduction="none")
    return list(tokens.cpu().split([len(t) for _, t in pairs]))  # row-major: each pair's tokens in order


@torch.inference_mode()
def pairs_prefix(pairs: list[tuple[list[int], list[int]]]) -> list[int]:
    """The ids every pair's prompt starts with, each prompt keeping its last id (empty for no pairs)."""
    return pairs[0][0][: prompt_prefix_length([p for p, _ in pairs])] if pairs else []


def token_nll(llm, pad_id: int, pairs: list[tuple[list[int], list[int]]], batch_size: int,
              prefix: list[int] | None = None, prefix_kv=None, on_batch=None) -> list[torch.Tensor]:
    """NLL (nats) of every target token given its prompt under `llm`, one (len(target),) float32
    tensor per (prompt ids, target ids) pair, in `pairs`' order. The ids all prompts start with run
    once (or give them as `prefix` with their batch-1 `prefix_kv`, shared by all pairs), the pairs go
    in batches of `batch_size` sorted by length (least padding), the LM head only where a target
    token is predicted. `on_batch(n)` is called after each batch of n pairs (a progress bar).
    A `prefix` given without its `prefix_kv` is run here; one that does not start every prompt
    (before the prompt's last id, which predicts the target's first token) is a ValueError."""
    if prefix is None:
        prefix, prefix_kv = pairs_prefix(pairs), None
    elif any(len(p) <= len(prefix) or p[: len(prefix)] != prefix for p, _ in pairs):
        raise ValueError(f"token_nll: the prefix ({len(prefix)} ids) must start every prompt and leave it "
                         "at least one id of its own")
    if prefix and prefix_kv is None:
        prefix_kv = prefix_cache(llm, prefix)
    out: list[torch.Tensor | None] = [None] * len(pairs)
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]) + len(pairs[i][1]))
    for b in range(0, len(order), batch_size):
        idx = order[b: b + batch_size]
        for i, tokens in zip(idx, _batch_token_nll(llm, pad_id, [pairs[i] for i in idx], prefix, prefix_kv)):
            out[i] = tokens
        if on_batch is not None:
            on_batch(len(idx))
    return out


def scored_pair(prompt: PromptBuilder, description: str, instruction: str, target: str,
                complete: bool) -> tuple[list[int], list[int]]:
    """(prompt ids, target ids) the base LLM scores: the zero-shot teacher prompt (the chat prompt of
    `description\\n\\ninstruction`) and the target as trained (end-of-turn only when `complete`).
    Target perplexity and `train.token_masking` both score these."""
    return (prompt.conversation([], description_prompt(description, instruction)),
            prompt.target(target, complete=complete))


def summary_line(result: dict, path: Path) -> str:
    """The one line `speechllm targets` prints."""
    if result["nll"] is None:
        return f"target NLL: no targets to score -> {path}"
    return (f"target NLL: {result['nll']:.3f} nats/token (perplexity {math.exp(result['nll']):.1f}) over "
            f"{result['tokens']} tokens of {result['records']} targets, given the description -> {path}")


def _key(rec: TargetRecord) -> tuple:
    """What decides a record's scored pair (with the LLM and system prompt of the identity)."""
    return rec.description, rec.instruction, rec.target, rec.truncated


def _saved(path: Path, identity: dict) -> dict | None:
    """The sidecar at `path` when it scored what `identity` names and is well-formed (a list of
    per-record sums, a token count, a completion flag); None otherwise (missing, unreadable, stale,
    foreign): then scoring starts afresh."""
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not (isinstance(saved, dict) and saved.get("identity") == identity
            and isinstance(saved.get("record_nll"), list) and isinstance(saved.get("tokens"), int)
            and isinstance(saved.get("complete"), bool)
            and all(isinstance(v, (int, float)) for v in saved["record_nll"])):
        return None
    return saved


def _reusable(cfg: Config, targets: Path) -> dict[tuple, float]:
    """Summed NLL by `_key` of the records of `targets.self_output_file` (minimum-change edits a copy
    of those self-outputs; most of its records are theirs unchanged) where that file's sidecar is
    complete, current and scored by the same LLM and prompt; empty otherwise."""
    other = Path(cfg.targets.self_output_file) if cfg.targets.self_output_file else None
    if other is None or not other.is_file() or other.resolve() == targets.resolve():
        return {}
    saved = _saved(nll_path(other), _identity(other, cfg))
    if saved is None or not saved["complete"]:
        return {}
    records = _records(other)
    if not records or len(records) != len(saved["record_nll"]):
        return {}
    return {_key(r): v for r, v in zip(records, saved["record_nll"])}


def target_nll(targets: str | Path, cfg: Config, device: str = "cpu", progress: bool = True,
               generator: TextGenerator | None = None) -> dict:
    """The mean per-token NLL of a targets file's targets under `cfg`'s base LLM given each
    description (see the module docstring): {"nll", "tokens", "records"} (nll None for a file
    with no records). Reads and writes the sidecar `nll_path(targets)`, which keeps each record's
    summed NLL (`record_nll`, in file order), so a finished file is not scored again and a killed
    run resumes; records identical to ones of `targets.self_output_file` (scored before) take their
    value; `generator` reuses a loaded LLM (else it is loaded when there is something to score)."""
    from tqdm import tqdm

    targets = Path(targets)
    path = nll_path(targets)
    identity = _identity(targets, cfg)
    state = _saved(path, identity) or {"identity": identity, "record_nll": [], "tokens": 0, "complete": False}
    if not state["complete"]:
        records = _records(targets)
        todo = records[len(state["record_nll"]):]
        if todo and generator is None:
            generator = TextGenerator.from_config(cfg, device)
        known = _reusable(cfg, targets) if todo else {}
        batch = cfg.targets.batch_size
        chunk = batch * CHUNK_BATCHES
        bar = tqdm(total=len(records), initial=len(state["record_nll"]), desc="target NLL", unit="rec",
                   disable=not progress, file=sys.stderr)
        every = [scored_pair(generator.prompt, r.description, r.instruction, r.target, not r.truncated)
                 for r in todo]
        fresh = [pair for pair, r in zip(every, todo) if _key(r) not in known]
        prefix = pairs_prefix(fresh)  # run once for every chunk
        prefix_kv = prefix_cache(generator.llm, prefix) if prefix else None
        for start in range(0, len(todo), chunk):
            recs, pairs = todo[start: start + chunk], every[start: start + chunk]
            sums = [known.get(_key(r)) for r in recs]
            idx = [i for i, v in enumerate(sums) if v is None]
            scored = token_nll(generator.llm, generator.pad_id, [pairs[i] for i in idx], batch, prefix, prefix_kv)
            for i, tokens in zip(idx, scored):
                sums[i] = float(tokens.sum())
            state["record_nll"] += sums
            state["tokens"] += sum(len(t) for _, t in pairs)
            write_json_atomic(path, state)
            bar.update(len(pairs))
        bar.close()
        state.update(complete=True, records=len(state["record_nll"]),
                     nll=sum(state["record_nll"]) / state["tokens"] if state["tokens"] else None)
        write_json_atomic(path, state)
    return {"nll": state["nll"], "tokens": state["tokens"], "records": state["records"]}
