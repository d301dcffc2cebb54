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
    lora_runs = {"lora-label", "lora-label-replay", "lora-minimum-change", "lora-self-output"}
    assert set(report["checkpoints"]) == {"self-output", "label"} | lora_runs
    for name, c in report["checkpoints"].items():
        tasks = {"gender", "transcription"} if name in lora_runs else {"gender", "pitch", "speed", "volume", "noise",
                                                                        "transcription"}
        assert tasks <= set(c["tasks"]), name
        f = c["forgetting"]
        assert f["items"] > 0 and f["ci_low"] is not None and f["ci_low"] <= f["ci_high"]
        if name in lora_runs:
            assert c["lora"]["r"] == 8 and c["text_retention"]["kl"] >= 0.0
        else:
            assert c["text_retention"]["kl"] == 0.0  # frozen LLM, no LoRA
        assert c["training"]["steps"] > 0
        for kind in ("safety", "safety_text"):  # refusal rates of the run and the base LLM
            assert set(c[kind]) >= {"refusal", "refusal_ref", "delta", "ci_low", "ci_high", "n"} and c[kind]["n"] == 2
        assert c["curve"] and c["curve"][-1]["step"] == c["training"]["steps"], name  # scored at the last step
        assert {"step", "ifrate", "delta"} <= set(c["curve"][0])
    for strategy in ("self-output", "label", "minimum-change"):
        assert report["strategies"][strategy]["target_nll"] > 0
    assert report["strategies"]["self-output"]["target_nll"] < report["strategies"]["label"]["target_nll"]
    replay = [json.loads(l) for l in (out / "data" / "replay.jsonl").read_text().splitlines()]
    assert replay and all(r["instruction"] and r["answer"] for r in replay)
    # both halves: the teacher's fidelity to its descriptions, and the adapters on real recordings
    fidelity = report["demo"]["teacher_fidelity"]["self-output"]
    assert fidelity["examples"] >= 1 and {"gender", "transcript"} <= set(fidelity["attributes"])
    real = report["demo"]["real"]
    assert real is not None and set(real) == {"self-output", "label"}  # make installs the Debian packages
    assert real["self-output"]["gender"]["items"] == 13 and 0 < real["self-output"]["gender"]["majority"] < 1
    md = (out / "report.md").read_text()
    assert "## Teacher fidelity" in md and "## Real recordings" in md and "ref fidelity" in md
    assert "## Experiment 2: LoRA on the LLM" in md and "## Target NLL" in md
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

    # --hearing on the finished demo: only experiment 3 runs (its own targets, adapter and evaluation)
    assert main(["demo", "--out", str(out), "--quick", "--quiet", "--hearing"]) == 0
    heard = json.loads((out / "report.json").read_text())
    assert {k: v for k, v in heard["checkpoints"].items() if k != "hearing"} == report["checkpoints"]
    assert heard["checkpoints"]["hearing"]["training"]["steps"] == 12
    assert heard["experiments"]["hearing"]["runs"] == ["hearing"]
    rows = [json.loads(l) for l in
            (out / "data" / "train.hearing.minimum-change.targets.jsonl").read_text().splitlines()]
    from speechllm.demo import HEARING_POOL, HEARING_QUESTIONS
    assert rows and {r["instruction"] for r in rows} <= set(HEARING_POOL)
    for split, items in (("held_out", 4), ("real", 13)):
        runs = heard["demo"]["hearing"][split]
        assert set(runs) == {"hearing", "self-output"}  # experiment 1's self-output adapter beside it
        assert runs["hearing"]["gender"]["items"] == items and 0 < runs["hearing"]["gender"]["majority"] < 1
        by_likelihood = runs["hearing"]["gender_likelihood"]  # every clip of the split, no decoding
        assert by_likelihood["items"] >= items and 0 <= by_likelihood["accuracy"] <= 1
        as_trained = runs["hearing"]["gender_as_trained"]  # generated, the training's own gender questions
        assert set(as_trained) == set(HEARING_QUESTIONS)
        assert all(a["items"] == by_likelihood["items"] for a in as_trained.values())
        by_phrasing = runs["hearing"]["gender_by_phrasing"]  # the evaluation's items, trained phrasing or not
        assert sum(g["items"] for g in by_phrasing.values()) == items
    assert "## Experiment 3: hearing" in (out / "report.md").read_text()
    assert "gender, by likelihood" in (out / "report.md").read_text()
    assert (out / "data" / "train.self-output.targets.jsonl").read_bytes() == targets  # experiment 1's untouched
