"""Slow tier: Magpie pseudo-replay from the real embedded LLM (SmolLM2-135M-Instruct)."""

import json

import pytest

from speechllm.config import load_config
from speechllm.hub import weights
from speechllm.targets.replay import MAGPIE, answer_problem, errors_path, instruction_problem, make_replay, normalize

pytestmark = pytest.mark.slow


def test_smollm2_writes_and_answers_its_own_instructions(tmp_path):
    out = tmp_path / "replay.jsonl"
    cfg = load_config(None, ["model.llm.system_prompt=You are a helpful assistant. Answer briefly.",
                             "train.max_target_tokens=48", "replay.batch_size=8"])
    summary = make_replay(cfg, out, n=4, progress=False)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    errors = [json.loads(line) for line in errors_path(out).read_text().splitlines()] if errors_path(out).exists() else []
    assert summary.magpie == len(records) == 4 and summary.candidates == len(records) + len(errors)
    assert len({normalize(r["instruction"]) for r in records}) == 4
    for rec in records:
        assert rec["source"] == MAGPIE
        assert instruction_problem(rec["instruction"], True, cfg.replay.min_words) is None
        assert answer_problem(rec["answer"]) is None
        assert rec["generator"]["fingerprint"] == weights.REGISTRY["smollm2-135m-instruct"].fingerprint
        assert rec["generator"]["system_prompt"] == "You are a helpful assistant. Answer briefly."
        assert "<|im_" not in rec["instruction"] + rec["answer"]
    assert all(e["error"] for e in errors)
