"""Audio tasks (generator, label extraction, scoring) and the eval suite end to end at tiny size."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from speechllm.config import EvalConfig
from speechllm.eval import official
from speechllm.eval.constraints import Constraint
from speechllm.eval.forgetting import bootstrap_interval
from speechllm.eval.items import EvalSet, forgetting_items, read_items
from speechllm.eval.predictions import FIELDS
from speechllm.eval.scoring import CheckpointScores, compare_checkpoints, score_checkpoint
from speechllm.eval.suite import EvalError, run_eval
from speechllm.eval.tasks import (TaskError, extract_lenient, extract_strict, score_item, tasks_from_metadata,
                                  transcript_errors)
from speechllm.records import MetadataRecord, RecordError, TaskItem

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = sorted((ROOT / "samples").glob("*.wav"))


# ----------------------------------------------------------------------------- label extraction

@pytest.mark.parametrize("answer, strict, lenient", [
    ("Male.", "male", "male"),
    ('"female"', "female", "female"),
    ("  FEMALE  ", "female", "female"),
    ("The speaker is a woman.", None, "female"),           # synonym
    ("It is a female voice.", None, "female"),             # 'female' must not also count as 'male'
    ("He sounds like a man, not a woman.", None, "male"),  # several -> the first mentioned
    ("female or male", None, None),                        # the options echoed back
    ("I cannot tell.", None, None),
    ("", None, None),
    ("The speaker is a mailman.", None, None),             # whole words only
])
def test_label_extraction_two_labels(answer, strict, lenient):
    labels = ["female", "male"]
    assert extract_strict(answer, labels) == strict
    assert extract_lenient(answer, labels) == lenient


def test_label_extraction_multiword_and_letters():
    labels = ["low", "normal", "high"]
    assert extract_lenient("The voice is high-pitched.", labels) == "high"
    assert extract_lenient("a deep voice", labels) == "low"
    assert extract_lenient("low, normal or high", labels) is None
    choices = ["a dog barking", "rain falling", "a car horn"]
    q = "What is heard?\nChoices: (A) a dog barking (B) rain falling (C) a car horn"
    assert extract_strict("(B)", choices, q) == "rain falling"
    assert extract_strict("c.", choices, q) == "a car horn"
    assert extract_strict("(B)", choices, "no lettered choices here") is None  # letters only where offered
    assert extract_lenient("I hear rain falling on a roof.", choices, q) == "rain falling"


def test_score_item_label_and_transcript():
    item = TaskItem("g", "gender", "a.wav", "?", "label", "male", labels=["female", "male"])
    assert score_item(item, "male") == {"strict": "male", "lenient": "male", "correct_strict": True, "correct": True}
    assert score_item(item, "A man speaks.")["correct"] and not score_item(item, "A man speaks.")["correct_strict"]
    assert not score_item(item, "female")["correct"]
    t = TaskItem("t", "transcription", "a.wav", "?", "transcript", "The cat sat on the mat.")
    exact = score_item(t, "the cat sat on the mat")
    assert (exact["errors"], exact["words"], exact["contains"]) == (0, 6, True)
    wrong = score_item(t, "The cat sat on a hat!")
    assert (wrong["errors"], wrong["words"], wrong["contains"]) == (2, 6, False)
    # an answer that wraps the transcript in a sentence is scored on the transcript it gives
    wrapped = score_item(t, 'The speaker says: "The cat sat on the mat."')
    assert (wrapped["span"], wrapped["errors"], wrapped["contains"]) == ("The cat sat on the mat.", 0, True)
    assert wrapped["answer_errors"] == 3
    assert transcript_errors("", "two words") == (2, 2)


# ----------------------------------------------------------------------------- generator and file format

def _meta(id_, audio, gender, pitch, transcript, extra_labels=None, with_labels=True):
    bins = {"gender": gender, "pitch": pitch, "speed": "normal", "volume": "normal", "noise": "clean"}
    ann = {k: {"value": v, "bin": v, "confidence": 1.0, "extra": {}, "annotator": f"{k}/1"} for k, v in bins.items()}
    ann["transcript"] = {"value": transcript, "bin": None, "confidence": 1.0, "extra": {}, "annotator": "transcript/1"}
    rec = {"id": id_, "audio": audio, "duration": 5.0, "annotations": ann,
           "description": f'[00:00-00:05] "{transcript}" (Gender: {gender.title()}, Pitch: {pitch.title()})'}
    if with_labels:
        rec["labels"] = {"gender": gender, "pitch": pitch, "transcript": transcript.upper(), "voice": "x",
                         **(extra_labels or {})}
    return rec


def _records(recs: list[dict]) -> list[MetadataRecord]:
    return [MetadataRecord.from_json(r, f"test:{i}") for i, r in enumerate(recs, 1)]


def test_tasks_from_metadata():
    recs = _records([_meta("a", "a.wav", "male", "low", "one two", {"emotion": "happy"}),
                     _meta("b", "b.wav", "female", "high", "three", {"emotion": "sad"}),
                     _meta("c", "c.wav", "female", "normal", "four", {"emotion": "sad"})])
    items = tasks_from_metadata(recs, vary=False)
    assert all(isinstance(it, TaskItem) for it in items)
    tasks = [it.task for it in items]
    # attribute tasks in their fixed order, then generic label columns, then transcription; 'voice' is no task;
    # speed/volume/noise have a single value in this data: no task
    assert sorted(set(tasks), key=tasks.index) == ["gender", "pitch", "emotion", "transcription"]
    by_id = {it.id: it for it in items}
    g = by_id["gender/a"]
    assert g.labels == ["female", "male"] and g.reference == "male" and g.audio == "a.wav"
    assert g.instruction == "Is the speaker male or female? Answer with one word: female or male."
    assert g.question == "Is the speaker male or female?" and g.transcript == "one two"
    assert by_id["pitch/c"].labels == ["low", "normal", "high"]
    assert by_id["emotion/b"].labels == ["happy", "sad"]
    # labels win over annotations: the reference transcript is the labelled one, while the speech
    # model is given what the ASR heard
    t = by_id["transcription/a"]
    assert t.reference == "ONE TWO" and t.transcript == "one two" and t.answer_kind == "transcript"
    # unlabelled clips fall back on annotation bins
    unlabelled = tasks_from_metadata(_records([_meta("a", "a.wav", "male", "low", "x", with_labels=False),
                                               _meta("b", "b.wav", "female", "low", "y", with_labels=False)]))
    assert {it.task for it in unlabelled} == {"gender", "transcription"}
    assert len(tasks_from_metadata(recs, tasks=["gender"], max_per_task=2)) == 2
    with pytest.raises(TaskError, match="no data for task.*age"):
        tasks_from_metadata(recs, tasks=["age"])


def test_a_capped_sample_keeps_every_class_in_proportion_whatever_the_file_order(tmp_path):
    genders = ["male"] * 18 + ["female"] * 6  # a skewed held-out split, rarer class last in the file
    recs = _records([_meta(f"c{i:02d}", f"c{i:02d}.wav", g, "low", "w") for i, g in enumerate(genders)])
    picked = {cap: tasks_from_metadata(recs, tasks=["gender"], max_per_task=cap, seed=3) for cap in (1, 2, 4, 8)}
    count = {cap: sorted(it.reference for it in items) for cap, items in picked.items()}
    assert count[1] == ["female"]  # a cap below the class count goes to the rarest class
    assert count[2] == ["female", "male"]
    assert count[4] == ["female", "male", "male", "male"]  # 1:3, as in the data
    assert count[8] == ["female"] * 2 + ["male"] * 6
    # the sample is the same set of clips when the file's rows come in another order, and keeps its order
    again = tasks_from_metadata(list(reversed(recs)), tasks=["gender"], max_per_task=8, seed=3)
    assert {it.id for it in again} == {it.id for it in picked[8]}
    assert [it.id for it in picked[8]] == sorted(it.id for it in picked[8])
    assert {it.id for it in tasks_from_metadata(recs, tasks=["gender"], max_per_task=8, seed=4)} != \
        {it.id for it in picked[8]}
    # transcription has no classes: a plain seeded sample
    assert len(tasks_from_metadata(recs, tasks=["transcription"], max_per_task=5)) == 5
    # `speechllm eval` on the metadata file caps the same way
    path = tmp_path / "test.metadata.jsonl"
    path.write_text("".join(json.dumps(_meta(f"c{i:02d}", f"c{i:02d}.wav", g, "low", "w")) + "\n"
                            for i, g in enumerate(genders)))
    read, _ = read_items(path, tmp_path, EvalConfig(data_format="metadata", tasks=["gender"], max_per_task=8, seed=3))
    assert [it.id for it in read] == [it.id for it in picked[8]]


def test_task_file_errors_name_the_line(tmp_path):
    good = {"id": "x", "task": "t", "audio": "a.wav", "instruction": "q", "answer_kind": "label", "reference": "b",
            "labels": ["a", "b"]}
    path = tmp_path / "tasks.jsonl"
    path.write_text("\n".join([json.dumps(good), "{broken", json.dumps({**good, "id": "y", "reference": "c"}),
                               json.dumps({**good, "id": "z", "answer_kind": "essay"}), json.dumps(good)]) + "\n")
    items, errors = read_items(path, tmp_path, EvalConfig(data_format="tasks"))
    assert [it.id for it in items] == ["x"]
    reasons = {e["id"]: e["error"] for e in errors}
    assert "tasks.jsonl:2" in reasons["line-2"]
    assert "reference 'c' is not among labels" in reasons["y"] and "tasks.jsonl:3" in reasons["y"]
    assert "answer_kind 'essay'" in reasons["z"]
    assert "repeats" in reasons["x"]
    with pytest.raises(RecordError, match="here: missing or empty field"):
        TaskItem.from_json({"id": "q"}, "here")


def test_metadata_errors_name_the_line(tmp_path):
    path = tmp_path / "test.metadata.jsonl"
    good = json.dumps(_meta("a", "a.wav", "male", "low", "x"))
    path.write_text("\n".join([good, json.dumps({"id": "b", "audio": "b.wav"})]) + "\n")
    with pytest.raises(EvalError, match=r"test\.metadata\.jsonl:2: missing field\(s\) description"):
        read_items(path, tmp_path, EvalConfig(data_format="metadata"))
    path.write_text("\n".join([good, "{broken"]) + "\n")
    with pytest.raises(EvalError, match=r"test\.metadata\.jsonl:2: not valid JSON"):
        read_items(path, tmp_path, EvalConfig())


def test_forgetting_items_deal_constraint_kinds_evenly():
    items = [TaskItem(f"gender/{i}", "gender", "a.wav", "Is it? Answer with one word: a or b.", "label", "a",
                      labels=["a", "b"], question="Is it?") for i in range(26)]
    cfg = EvalConfig(seed=3)
    f = forgetting_items(items, cfg)
    assert f == forgetting_items(items, cfg)  # deterministic
    kinds = [x.constraint.kind for x in f]
    assert all(kinds.count(k) == 2 for k in set(kinds)) and len(set(kinds)) == 13
    assert all(x.instruction.startswith("Is it? ") and "Answer with one word" not in x.instruction for x in f)
    assert all(x.id == x.base and x.to_json()["constraint"] == x.constraint.to_dict() for x in f)
    assert len(forgetting_items(items, EvalConfig(forgetting_items=5, constraints=["lowercase"]))) == 5
    with pytest.raises(EvalError, match="unknown constraint kind"):
        forgetting_items(items, EvalConfig(constraints=["haiku"]))


def test_bootstrap_interval_brackets_the_mean():
    import numpy as np

    v = np.array([1.0] * 30 + [0.0] * 10)
    lo, hi = bootstrap_interval(len(v), lambda idx: v[idx].mean(1), 500, 0)
    assert lo < 0.75 < hi and hi - lo < 0.35
    assert bootstrap_interval(0, lambda idx: idx.mean(1), 10, 0) == (None, None)
    # resamples where the statistic is undefined are left out, not counted
    z = np.array([0.0] * 39 + [1.0])
    lo, hi = bootstrap_interval(len(z), lambda idx: 1 / z[idx].sum(1), 500, 0)
    assert hi == 1.0 and 0.1 < lo < 1.0  # an infinite 1/0 would have become the upper end


def test_score_checkpoint_names_its_results():
    items = [TaskItem(f"gender/{i}", "gender", "a.wav", "Is it? Answer with one word: female or male.", "label",
                      ref, labels=["female", "male"], question="Is it?", description="d")
             for i, ref in enumerate(["male", "female", "male", "female"])]
    es = EvalSet(items, forgetting_items(items, EvalConfig(constraints=["lowercase"])), None, {}, 0)
    answers = {**{f"task:{it.id}": it.reference for it in items}, **{k: "all in lower case" for k in es.if_keys}}
    ref_answers = {**{f"task:{it.id}": "male" for it in items}, **{k: "Not Lower Case" for k in es.if_keys}}
    s = score_checkpoint(es, answers, ref_answers, EvalConfig(bootstrap=50))
    assert isinstance(s, CheckpointScores)
    assert s.tasks["gender"]["accuracy"] == 1.0 and s.tasks["gender"]["accuracy_ref"] == 0.5
    assert s.tasks["gender"]["diff"] == 0.5
    assert s.per_item["gender/1"] == {"strict": "female", "lenient": "female", "correct_strict": True,
                                      "correct": True}
    assert s.passes == [True] * 4 and s.passes_ref == [False] * 4
    assert s.forgetting.ifrate == 1.0 and s.forgetting.ifrate_ref == 0.0 and s.forgetting.delta is None
    assert s.ifeval is None  # no text prompts


def test_compare_checkpoints_is_paired():
    # a follows every constraint b follows plus 10 more: the paired difference is exactly 10/40 in
    # every resample where those items are drawn, so its interval stays above 0
    b = [True] * 10 + [False] * 30
    a = [True] * 20 + [False] * 20
    c = compare_checkpoints({"a": a, "b": b}, 500, 0)["a vs b"]
    assert c["items"] == 40 and c["ifrate_diff"] == pytest.approx(0.25)
    assert 0 < c["ci_low"] < 0.25 < c["ci_high"]
    assert compare_checkpoints({"a": a}, 10, 0) == {}


# ----------------------------------------------------------------------------- the suite at tiny size

@pytest.fixture()
def tiny_eval_setup(tmp_path, tiny_model):
    ckpt = tiny_model.save_pretrained(tmp_path / "self-output")
    (ckpt / "metrics.jsonl").write_text('{"step": 1, "loss": 3.0}\n{"step": 2, "loss": 2.5}\n'
                                        '{"step": 2, "eval_loss": 2.7}\n'
                                        '{"step": 2, "ifrate": 0.25, "ifrate_ref": 0.5, "delta": -0.5}\n')
    for i, wav in enumerate(SAMPLES):
        shutil.copy(wav, tmp_path / f"clip{i}.wav")
    recs = [_meta(f"c{i}", f"clip{i}.wav", g, p, "some words here") for i, (g, p) in
            enumerate([("male", "low"), ("female", "high")] * (len(SAMPLES) // 2 + 1))][: len(SAMPLES)]
    recs.append({**_meta("bad", "missing.wav", "male", "low", "gone"), "id": "bad"})
    meta = tmp_path / "test.metadata.jsonl"
    meta.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return ckpt, meta


def test_eval_suite_tiny_end_to_end_and_resume(tmp_path, tiny_eval_setup, monkeypatch):
    ckpt, meta = tiny_eval_setup
    second = tmp_path / "label"
    shutil.copytree(ckpt, second)
    out = tmp_path / "eval"
    cfg = EvalConfig(max_new_tokens=6, if_max_new_tokens=8, text_prompts=4, text_prompt_set="builtin", bootstrap=50,
                     safety_items=0)
    from speechllm.model.speechllm import SpeechLLM

    typed, generate = [], SpeechLLM.generate
    monkeypatch.setattr(SpeechLLM, "generate",
                        lambda self, examples, *a, **k: typed.extend(e for e in examples if e.audio is None)
                        or generate(self, examples, *a, **k))
    report = run_eval([ckpt, second], meta, out, cfg, progress=False)
    assert typed == []  # a frozen LLM's text path is the base LLM: its text prompts take the reference's answers

    for name in ("self-output", "label"):
        c = report["checkpoints"][name]
        assert set(c["tasks"]) == {"gender", "pitch", "transcription"}
        for t in c["tasks"].values():
            assert 0.0 <= t["accuracy"] <= 1.0 and t["items"] == len(SAMPLES)
        f = c["forgetting"]
        assert set(f) >= {"ifrate", "ifrate_ref", "delta", "ci_low", "ci_high", "per_constraint"}
        assert f["items"] == 3 * len(SAMPLES)
        # frozen LLM, no LoRA: the text path is the base LLM, exactly
        assert c["text_retention"]["kl"] == 0.0 and c["lora"] is None
        ife = c["text_retention"]["ifeval"]
        assert ife["prompts"] == 4 and ife["identical_answers"] == 4
        assert ife["prompt_accuracy"] == ife["prompt_accuracy_base"]
        assert c["training"]["steps"] == 2 and c["training"]["final_eval_loss"] == 2.7
        assert c["curve"] == [{"step": 2, "ifrate": 0.25, "delta": -0.5}]  # the forgetting curve training logged
    assert report["comparisons"]["self-output vs label"]["ifrate_diff"] == 0.0
    # both checkpoints are the same weights: the same answers
    assert report["checkpoints"]["self-output"]["tasks"] == report["checkpoints"]["label"]["tasks"]
    errors = [json.loads(l) for l in (out / "tasks.errors.jsonl").read_text().splitlines()]
    assert {e["id"] for e in errors} == {"gender/bad", "pitch/bad", "transcription/bad"}
    assert all("missing.wav" in e["error"] for e in errors)
    for f in ("report.json", "report.md", "plots/tasks.png", "plots/forgetting.png", "plots/constraints.png",
              "plots/training.png", "plots/curve.png", "predictions.jsonl"):
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    md = (out / "report.md").read_text()
    assert "| gender |" in md and "self-output" in md and "delta" in md
    assert "- self-output: 2: 25.0 (-0.500)" in md  # the forgetting curve's points
    # every constraint kind names who scored it: IFEval's official checker, or ours where IFEval has none
    per = report["checkpoints"]["self-output"]["forgetting"]["per_constraint"]
    assert all(v["checker"] == official.checker_name(k) for k, v in per.items())
    assert "`ifeval:" in md and "builtin" in md
    # predictions: one row per system and item, in one shape
    preds = [json.loads(l) for l in (out / "predictions.jsonl").read_text().splitlines()]
    ref_name = report["checkpoints"]["self-output"]["reference"]
    assert {p["system"] for p in preds} == {"self-output", "label", ref_name}
    assert all(tuple(p) == FIELDS for p in preds)
    mine = [p for p in preds if p["system"] == "self-output"]
    assert {p["benchmark"] for p in mine} == {"tasks", "forgetting", "ifeval-builtin"}
    assert len(mine) == 3 * len(SAMPLES) + 3 * len(SAMPLES) + 4
    fgt = [p for p in mine if p["benchmark"] == "forgetting"]
    assert [p["score"]["follow_all_instructions"] for p in sorted(fgt, key=lambda p: p["key"])] == \
        report_passes(out, "self-output", fgt)

    # a rerun answers nothing again (every answer is loaded from generations/)
    def no_generation(*a, **k):
        raise AssertionError("a finished run generated again")

    monkeypatch.setattr(SpeechLLM, "generate", no_generation)
    from speechllm.model.generate import TextGenerator

    monkeypatch.setattr(TextGenerator, "generate", no_generation)
    again = run_eval([ckpt, second], meta, out, cfg, progress=False)
    assert again["checkpoints"] == report["checkpoints"]


def report_passes(out, system, rows):
    """Each forgetting row's pass recomputed from its answer with the official routing."""
    items = {f"if:{json.loads(l)['id']}": json.loads(l) for l in (out / "forgetting.jsonl").read_text().splitlines()}
    return [official.follows_constraint(Constraint.from_dict(items[p["key"]]["constraint"]), p["prediction"])
            for p in sorted(rows, key=lambda p: p["key"])]


def test_eval_suite_changed_checkpoint_is_answered_afresh(tmp_path, tiny_eval_setup):
    import torch

    from speechllm.model.speechllm import SpeechLLM

    ckpt, meta = tiny_eval_setup
    out = tmp_path / "eval"
    cfg = EvalConfig(max_new_tokens=4, if_max_new_tokens=4, text_prompts=0, bootstrap=20, tasks=["gender"],
                     safety_items=0)
    run_eval([ckpt], meta, out, cfg, progress=False)
    model = SpeechLLM.from_pretrained(ckpt)
    with torch.no_grad():
        for p in model.adapter.parameters():
            p.add_(1.0)
    model.save_pretrained(ckpt)
    run_eval([ckpt], meta, out, cfg, progress=False)
    assert list((out / "generations").glob("self-output.jsonl.stale-*"))
    assert len((out / "generations" / "self-output.jsonl").read_text().splitlines()) == 2 * len(SAMPLES)


def test_eval_rejects_bad_inputs(tmp_path, tiny_eval_setup):
    ckpt, meta = tiny_eval_setup
    with pytest.raises(EvalError, match="at least one"):
        run_eval([], meta, tmp_path / "o", EvalConfig())
    weird = tmp_path / "weird.jsonl"
    weird.write_text('{"foo": 1}\n')
    with pytest.raises(EvalError, match="cannot tell the data format"):
        run_eval([ckpt], weird, tmp_path / "o", EvalConfig(), progress=False)
    ref = tmp_path / "reference"
    shutil.copytree(ckpt, ref)
    with pytest.raises(EvalError, match="may not be called 'reference'"):
        run_eval([ref], meta, tmp_path / "o", EvalConfig(), progress=False)


def test_eval_suite_on_mmau_annotates_clips_without_description(tmp_path, tiny_model):
    """A public-format file (MMAU JSON) has no descriptions: the suite annotates each clip once
    (tiny random Whisper for ASR here) and the reference reads those descriptions."""
    ckpt = tiny_model.save_pretrained(tmp_path / "ckpt")
    entries = json.loads((ROOT / "tests" / "fixtures" / "eval" / "mmau-mini.json").read_text())
    (tmp_path / "test-mini-audios").mkdir()
    for i, e in enumerate(entries):
        shutil.copy(SAMPLES[i % len(SAMPLES)], tmp_path / e["audio_id"])
    data = tmp_path / "mmau.json"
    data.write_text(json.dumps(entries))
    out = tmp_path / "eval"
    report = run_eval([ckpt], data, out, EvalConfig(max_new_tokens=4, if_max_new_tokens=4, text_prompts=0,
                                                    bootstrap=20, asr_model="tiny-random-whisper",
                                                    safety_items=0),
                      progress=False)
    items = [json.loads(l) for l in (out / "tasks.jsonl").read_text().splitlines()]
    assert items and all(it["description"].startswith("[00:00-") for it in items)
    assert all(TaskItem.from_json(it, f"tasks.jsonl:{i}").to_json() == it for i, it in enumerate(items, 1))
    annotated = (out / "annotations.jsonl").read_text().splitlines()
    assert len(annotated) == len({it["audio"] for it in items})  # once per clip
    assert set(report["checkpoints"]["ckpt"]["tasks"]) == {it["task"] for it in items}
    assert all(t["answer_kind"] == "label" for t in report["checkpoints"]["ckpt"]["tasks"].values())
    assert report["checkpoints"]["ckpt"]["curve"] == []  # no metrics.jsonl, no curve
    preds = [json.loads(l) for l in (out / "predictions.jsonl").read_text().splitlines()]
    mine = [p for p in preds if p["system"] == "ckpt"]
    assert {p["benchmark"] for p in mine} == {"mmau", "forgetting"}
    assert all(p["target"] in it["labels"] and "correct" in p["score"] for p, it in
               zip(sorted((p for p in mine if p["benchmark"] == "mmau"), key=lambda p: p["key"]),
                   sorted(items, key=lambda it: it["id"])))


def test_transcript_span_takes_quotes_then_said_then_the_closest_run():
    from speechllm.eval.tasks import contains_transcript, transcript_span

    ref = "the farmers market opens early on saturday mornings"
    assert transcript_span('He said “The farmers market opens early on Saturday mornings.” Nice.', ref) == \
        "The farmers market opens early on Saturday mornings."
    assert transcript_span("Transcription: the farmers market opens", ref) == "the farmers market opens"
    # no quotes, no cue: the run of the answer's words closest to the reference
    assert transcript_span("I heard someone explain that the farmers market opens early on saturday mornings, "
                           "how nice", ref) == "the farmers market opens early on saturday mornings"
    assert transcript_span("so the farmers market opens early then", ref) == "the farmers market opens early"
    assert transcript_span("", ref) == ""
    assert contains_transcript("Sure! The farmers' market opens early on Saturday mornings, they said.", ref)
    assert not contains_transcript("The market opens early on Saturday mornings.", ref)


def test_questions_vary_in_phrasing_and_option_order_so_a_constant_answer_scores_at_chance():
    from speechllm.labels import ATTRIBUTES

    recs = _records([_meta(str(i), f"{i}.wav", ["male", "female"][i % 2], "low", "x") for i in range(40)])
    items = [it for it in tasks_from_metadata(recs, seed=1) if it.task == "gender"]
    again = [it for it in tasks_from_metadata(recs, seed=1) if it.task == "gender"]
    assert [it.instruction for it in items] == [it.instruction for it in again]  # seeded
    assert {it.question for it in items} == set(ATTRIBUTES["gender"].phrasings)  # every phrasing is drawn
    assert {it.instruction.rsplit(": ", 1)[1] for it in items} == {"female or male.", "male or female."}
    assert all(it.labels == ["female", "male"] for it in items)  # scoring keeps the natural order
    # a model that always answers the first option it is offered scores about chance, not 100%
    first = [score_item(it, it.instruction.rsplit(": ", 1)[1].split(" or ")[0])["correct"] for it in items]
    assert 0.25 < sum(first) / len(first) < 0.75


def test_report_shows_chance_majority_and_the_reference_fidelity():
    from speechllm.eval.scoring import task_scores

    recs = _records([_meta(str(i), f"{i}.wav", "male" if i < 3 else "female", "low", "one two") for i in range(4)])
    items = [it for it in tasks_from_metadata(recs) if it.task == "gender"]
    ref = {f"task:{it.id}": "The speaker is female." for it in items}  # a constant answerer
    scores, _ = task_scores(items, ref, ref, samples=50, seed=0)
    g = scores["gender"]
    assert (g["chance"], g["majority"]) == (0.5, 0.75)
    assert g["accuracy_ref"] == 0.25 and g["fidelity_ref"] == 0.25  # the descriptions say male three times


def test_prediction_rows_have_one_shape():
    from speechllm.eval.predictions import benchmark_of, row, write_predictions

    assert [benchmark_of(s) for s in ("mmau:test-mini.json", "dynamic-superb:DynamicSuperb/X[test]",
                                      "synth:test", None)] == ["mmau", "dynamic-superb", "tasks", "tasks"]
    r = row("ifeval", "sys", "text:1", None, "Say hi.", "hi", None, {"follow_all_instructions": True})
    assert tuple(r) == FIELDS
    with pytest.raises(ValueError, match="expected"):
        write_predictions(Path("/nonexistent/never-written.jsonl"), [{"benchmark": "x"}])


def test_a_saved_answer_is_reused_only_while_its_key_asks_the_same(tmp_path, capsys):
    # items redrawn under the same key (another constraint or phrasing) must not get the old answer
    from speechllm.eval.generations import Generations

    questions = {"if:a": "Is it a man? Answer in JSON.", "if:b": "Is it loud? Use no commas."}
    calls = []

    def answer(chunk, rows):
        calls.append(list(chunk))
        return [f"answer to {questions[k]}" for k in chunk]

    def fill():
        gens = Generations(tmp_path, "run", {"model": "m"})
        gens.fill(list(questions), len, answer, 8, "items", False, asked=questions.get)
        return gens

    fill()
    assert fill().answers["if:a"] == "answer to Is it a man? Answer in JSON." and calls == [["if:a", "if:b"]]
    questions["if:a"] = "Is it a man? Wrap a title in <<double angular brackets>>."
    again = fill()
    assert calls[-1] == ["if:a"] and "1 saved answers were to other questions" in capsys.readouterr().err
    assert again.answers["if:a"] == "answer to Is it a man? Wrap a title in <<double angular brackets>>."
    fill()  # the file now holds the new answer: nothing is asked again
    assert len(calls) == 2


def test_eval_drop_finished_reaches_every_decoding_setting_it_makes():
    """`eval.drop_finished=false` decodes with transformers' generate (finished answers kept as
    padding) for audio tasks and forgetting items alike, and the answer caches tell it apart; the
    default drops them and leaves the caches' identity as it was."""
    from speechllm.eval.suite import _generation, _settings

    for key in ("task:gender-0", "if:gender-0", "text:ifeval-1"):
        assert _generation(EvalConfig(), key).drops_finished
        assert not _generation(EvalConfig(drop_finished=False), key).drops_finished
    assert "drop_finished" not in _settings(EvalConfig())
    assert _settings(EvalConfig(drop_finished=False))["drop_finished"] is False
