"""`speechllm demo --quick` end to end on the real embedded models (slow tier: several minutes)."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow


def test_quick_demo_writes_the_report_and_a_rerun_reuses_every_stage(tmp_path):
    from speechllm.cli import main

    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--quick", "--quiet"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert set(report["checkpoints"]) == {"self-output", "label"}
    for name, c in report["checkpoints"].items():
        assert {"gender", "pitch", "speed", "volume", "noise", "transcription"} <= set(c["tasks"]), name
        f = c["forgetting"]
        assert f["items"] > 0 and f["ci_low"] is not None and f["ci_low"] <= f["ci_high"]
        assert c["text_retention"]["kl"] == 0.0  # frozen LLM, no LoRA
        assert c["training"]["steps"] > 0
    # both halves: the teacher's fidelity to its descriptions, and the adapters on real recordings
    fidelity = report["demo"]["teacher_fidelity"]["self-output"]
    assert fidelity["examples"] >= 1 and {"gender", "transcript"} <= set(fidelity["attributes"])
    real = report["demo"]["real"]
    assert real is not None and set(real) == {"self-output", "label"}  # make installs the Debian packages
    assert real["self-output"]["gender"]["items"] == 13 and 0 < real["self-output"]["gender"]["majority"] < 1
    md = (out / "report.md").read_text()
    assert "## Teacher fidelity" in md and "## Real recordings" in md and "ref fidelity" in md
    for plot in ("tasks.png", "forgetting.png", "constraints.png", "training.png"):
        assert (out / "plots" / plot).stat().st_size > 0
    # train and test clips share no voice (held-out split)
    meta = {s: [json.loads(l) for l in (out / "data" / f"{s}.metadata.jsonl").read_text().splitlines()]
            for s in ("train", "test")}
    voices = {s: {r["labels"]["voice"] for r in recs} for s, recs in meta.items()}
    assert voices["train"] and voices["test"] and not voices["train"] & voices["test"]

    answers = {p.name: p.read_bytes() for p in (out / "generations").glob("*.jsonl")}
    targets = (out / "data" / "train.self-output.targets.jsonl").read_bytes()
    assert main(["demo", "--out", str(out), "--quick", "--quiet"]) == 0
    assert {p.name: p.read_bytes() for p in (out / "generations").glob("*.jsonl")} == answers
    assert (out / "data" / "train.self-output.targets.jsonl").read_bytes() == targets
    assert json.loads((out / "report.json").read_text())["checkpoints"] == report["checkpoints"]
