"""Accuracy by likelihood (`speechllm.eval.likelihood`): the demo's experiment 3 and
scripts/probe_hearing.py score hearing with it."""

from __future__ import annotations

import shutil

import pytest
import torch

from speechllm.eval import likelihood
from speechllm.records import MetadataRecord

from conftest import SAMPLE


def _records(tmp_path, genders: list[str | None]) -> list[MetadataRecord]:
    shutil.copy(SAMPLE, tmp_path / "clip.wav")
    recs = []
    for i, g in enumerate(genders):
        ann = {"transcript": {"value": "hello there", "bin": None, "confidence": 1.0, "extra": {},
                              "annotator": "transcript/1"}}
        if g is not None:
            ann["gender"] = {"value": g, "bin": g, "confidence": 1.0, "extra": {}, "annotator": "gender/1"}
        recs.append(MetadataRecord.from_json({"id": f"c{i}", "audio": "clip.wav", "duration": 1.0, "annotations": ann,
                                              "description": '"hello there"'}, f"test:{i}"))
    return recs


def test_a_constant_answerer_scores_the_share_of_its_answer_and_unlabelled_clips_are_left_out(tmp_path, tiny_model,
                                                                                           monkeypatch):
    recs = _records(tmp_path, ["male", "male", "male", "female", None])
    monkeypatch.setattr(likelihood, "clip_states", lambda model, audio: [])
    asked = []

    def always_male(model, question, states, transcript, answers):
        asked.append((question, transcript, tuple(answers)))
        return answers.index("The speaker is male.")
    monkeypatch.setattr(likelihood, "choose", always_male)
    acc = likelihood.accuracy_by_likelihood(tiny_model, recs, tmp_path, "gender")
    assert (acc.items, acc.accuracy, acc.chance, acc.majority) == (4, 0.75, 0.5, 0.75)
    assert acc.ci_low <= acc.accuracy <= acc.ci_high
    assert set(asked) == {("Is the speaker male or female?", "hello there",
                           ("The speaker is female.", "The speaker is male."))}


def test_the_tiny_model_picks_the_answer_with_the_lowest_loss_and_given_states_change_nothing(tmp_path, tiny_model):
    import torch

    from speechllm.model.speechllm import Example

    tiny_model.eval()
    recs = _records(tmp_path, ["female", "male"])
    states = likelihood.clip_states(tiny_model, tmp_path / "clip.wav")
    answers = ["The speaker is female.", "The speaker is male."]
    with torch.no_grad():
        losses = [float(tiny_model([Example("Is the speaker male or female?", states=states, transcript="hello there",
                                            target=a)])) for a in answers]
    pick = likelihood.choose(tiny_model, "Is the speaker male or female?", states, "hello there", answers)
    assert losses[pick] == min(losses)
    # one clip, both labels: exactly one of the two is right, whatever the model prefers
    acc = likelihood.accuracy_by_likelihood(tiny_model, recs, tmp_path, "gender")
    assert acc.accuracy == pytest.approx(0.5)
    given = likelihood.accuracy_by_likelihood(tiny_model, recs, tmp_path, "gender",
                                              states={r.id: states for r in recs})
    assert given.to_json() == acc.to_json()


def test_as_asked_reads_the_value_from_each_generated_answer_to_the_question_as_given(tmp_path, tiny_model,
                                                                                    monkeypatch):
    recs = _records(tmp_path, ["male", "female", "female", None])
    monkeypatch.setattr(likelihood, "clip_states", lambda model, audio: [torch.zeros(10, 4)])  # one clip: one length
    asked = []

    def generate(examples, gen, batch_size=None):
        asked.extend(e.instruction for e in examples)
        return ["It is a man speaking.", "A woman.", "I cannot tell."][: len(examples)]
    monkeypatch.setattr(tiny_model, "generate", generate)
    acc = likelihood.accuracy_as_asked(tiny_model, recs, tmp_path, "gender", "What is the speaker's gender?")
    assert asked == ["What is the speaker's gender?"] * 3  # no answer-format line added; the unlabelled clip left out
    assert (acc.items, acc.accuracy, acc.majority, acc.question) == (3, 2 / 3, 2 / 3, "What is the speaker's gender?")
