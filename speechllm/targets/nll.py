"""Target perplexity: how probable the base LLM finds a targets file's targets.

For each record, the base LLM reads the user turn the self-output targets are generated from,
`description\\n\\ninstruction` in its chat template with the run's system prompt, and scores the
target as training learns it (with the end-of-turn token when complete; a target flagged
`truncated` without it). The file's figure is the mean negative log-likelihood per target token
(nats), pooled over every token of every record: "The Self-Output is All You Need" measures why
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
from ..model.prompt import description_prompt
from ..records import TargetRecord

NLL_SUFFIX = ".nll.json"
"""The sidecar of `<targets>.jsonl`: `<targets>.nll.json`."""
NLL_FORMAT = 1
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
def _batch_nll(generator: TextGenerator, pairs: list[tuple[list[int], list[int]]]) -> list[float]:
    """Summed NLL (nats) of each target given its prompt; `pairs` are (prompt ids, target ids),
    scored right-padded in one forward pass: logits (batch, longest, vocab)."""
    llm = generator.llm
    device = llm.get_input_embeddings().weight.device
    longest = max(len(p) + len(t) for p, t in pairs)
    ids = torch.full((len(pairs), longest), generator.pad_id, dtype=torch.long)
    mask = torch.zeros((len(pairs), longest), dtype=torch.long)
    for row, (p, t) in enumerate(pairs):
        ids[row, : len(p) + len(t)] = torch.tensor(p + t)
        mask[row, : len(p) + len(t)] = 1
    logits = llm(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
    out = []
    for row, (p, t) in enumerate(pairs):
        predicted = logits[row, len(p) - 1: len(p) - 1 + len(t)].float()
        out.append(float(torch.nn.functional.cross_entropy(predicted, torch.tensor(t, device=device),
                                                           reduction="sum")))
    return out


def target_pair(generator: TextGenerator, rec: TargetRecord) -> tuple[list[int], list[int]]:
    """(prompt ids, target ids) of one record: the zero-shot teacher prompt and the target as
    trained (end-of-turn only when the target is complete)."""
    return (generator.prompt_ids(description_prompt(rec.description, rec.instruction)),
            generator.prompt.target(rec.target, complete=not rec.truncated))


def summary_line(result: dict, path: Path) -> str:
    """The one line `speechllm targets` prints."""
    if result["nll"] is None:
        return f"target NLL: no targets to score -> {path}"
    return (f"target NLL: {result['nll']:.3f} nats/token (perplexity {math.exp(result['nll']):.1f}) over "
            f"{result['tokens']} tokens of {result['records']} targets, given the description -> {path}")


def target_nll(targets: str | Path, cfg: Config, device: str = "cpu", progress: bool = True,
               generator: TextGenerator | None = None) -> dict:
    """The mean per-token NLL of a targets file's targets under `cfg`'s base LLM given each
    description (see the module docstring): {"nll", "tokens", "records"} (nll None for a file
    with no records). Reads and writes the
    sidecar `nll_path(targets)`, so a finished file is not scored again and a killed run resumes;
    `generator` reuses a loaded LLM (else it is loaded when there is something to score)."""
    from tqdm import tqdm

    targets = Path(targets)
    path = nll_path(targets)
    identity = _identity(targets, cfg)
    state = {"identity": identity, "records_done": 0, "nll_sum": 0.0, "tokens": 0, "complete": False}
    if path.exists():
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            saved = None
        if isinstance(saved, dict) and saved.get("identity") == identity:
            state = saved
    if not state["complete"]:
        records = _records(targets)
        todo = records[state["records_done"]:]
        if todo and generator is None:
            generator = TextGenerator.from_config(cfg, device)
        batch = cfg.targets.batch_size
        chunk = batch * CHUNK_BATCHES
        bar = tqdm(total=len(records), initial=state["records_done"], desc="target NLL", unit="rec",
                   disable=not progress, file=sys.stderr)
        for start in range(0, len(todo), chunk):
            pairs = [target_pair(generator, r) for r in todo[start: start + chunk]]
            order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]) + len(pairs[i][1]))
            for b in range(0, len(order), batch):
                idx = order[b: b + batch]
                state["nll_sum"] += sum(_batch_nll(generator, [pairs[i] for i in idx]))
            state["tokens"] += sum(len(t) for _, t in pairs)
            state["records_done"] += len(pairs)
            write_json_atomic(path, state)
            bar.update(len(pairs))
        bar.close()
        state.update(complete=True, records=state["records_done"],
                     nll=state["nll_sum"] / state["tokens"] if state["tokens"] else None)
        write_json_atomic(path, state)
    return {"nll": state["nll"], "tokens": state["tokens"], "records": state["records"]}
