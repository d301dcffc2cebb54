"""Slow tier: self-output targets from the real embedded LLM."""

import json

import pytest

from speechllm.hub import weights
from speechllm.config import load_config
from speechllm.targets.checks import degenerate_reason
from speechllm.targets.run import run_targets

pytestmark = pytest.mark.slow


def test_self_output_targets_from_smollm2(tmp_path):
    meta = tmp_path / "m.jsonl"
    descs = ['[00:00-00:06] "Unless to be rather cold-hearted and rather selfish is to be ill-disposed." '
             '(Gender: Male, Pitch: Low, Speaking speed: Normal, Volume: Normal, Noise: Clean)',
             '[00:00-00:04] "The wind can be seen from across the valley." (Gender: Female, Pitch: High, '
             'Speaking speed: Fast, Volume: Quiet, Noise: Clean)']
    meta.write_text("".join(json.dumps({"id": f"c{i}", "audio": f"c{i}.wav", "description": d}) + "\n"
                            for i, d in enumerate(descs)))
    out = tmp_path / "t.jsonl"
    summary = run_targets(meta, out, load_config(None, ["train.max_target_tokens=96"]), progress=False)
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert summary.written + summary.dropped == 2 and summary.written >= 1
    for rec in recs:
        assert degenerate_reason(rec["target"]) is None and len(rec["target"].split()) >= 5
        assert rec["generator"]["fingerprint"] == weights.REGISTRY["smollm2-135m-instruct"].fingerprint
        assert rec["target_tokens"] > 0 and isinstance(rec["truncated"], bool)
        assert rec["truncated"] or rec["target_tokens"] <= 96
