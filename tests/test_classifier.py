"""Hub audio classifiers as annotators (`speechllm annotate --classifier KEY=MODEL`), on tiny
random-init transformers classifiers saved to folders: labels from their configs, batched results
equal to one clip at a time, the description field, replacing a built-in, and clear errors."""

import json

import numpy as np
import pytest
import soundfile as sf

from annotate.classifier import AudioClassifier, ClassifierError, check_classifier
from annotate.evaluate import evaluate, format_report
from annotate.pipeline import manifest_items, run
from conftest import SAMPLE
from speechllm.config import AnnotateConfig, ConfigError, load_config
from speechllm.io.audio import SAMPLE_RATE, load_audio

EMOTIONS = ["happy", "sad", "neutral", "angry"]
LENGTHS_S = (0.6, 1.3, 2.1, 0.9, 1.7)
"""Clips of different lengths: one batch pads all but the longest."""


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from speechllm.hub.tiny import build_tiny_audio_classifier

    root = tmp_path_factory.mktemp("classifiers")
    build_tiny_audio_classifier(root / "emotion", EMOTIONS, "wav2vec2")
    build_tiny_audio_classifier(root / "accent", ["scottish", "us", "indian"], "whisper")
    return root


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    root = tmp_path_factory.mktemp("clips")
    wav = load_audio(SAMPLE)
    lines = []
    for i, seconds in enumerate(LENGTHS_S):
        start = int(i * 0.5 * SAMPLE_RATE)
        sf.write(root / f"c{i}.wav", wav[start: start + int(seconds * SAMPLE_RATE)], SAMPLE_RATE)
        lines.append({"id": f"c{i}", "audio": f"c{i}.wav", "labels": {"emotion": EMOTIONS[i % 2]}})
    (root / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return root / "m.jsonl"


def annotate(manifest, out, **kw):
    opts = AnnotateConfig(**{"annotators": ["duration"], "workers": 1, "batch_size": 4, **kw})
    summary = run(manifest_items(manifest, out.parent), out, opts, progress=False)
    assert summary.errors == 0
    return {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}


def one_at_a_time(folder, wav):
    """The model's probabilities for one clip, computed here straight through transformers."""
    import torch
    from transformers import AutoFeatureExtractor, AutoModelForAudioClassification

    fe = AutoFeatureExtractor.from_pretrained(folder)
    model = AutoModelForAudioClassification.from_pretrained(folder).eval()
    inputs = fe([wav], sampling_rate=SAMPLE_RATE, return_tensors="pt")
    inputs.pop("attention_mask", None) if model.config.model_type == "whisper" else None
    with torch.no_grad():
        return model(**inputs).logits.softmax(-1)[0].numpy()


def test_classifier_label_and_score_become_the_annotation_and_the_field(models, manifest, tmp_path):
    recs = annotate(manifest, tmp_path / "meta.jsonl",
                    classifiers=[f"emotion={models / 'emotion'}", f"accent={models / 'accent'}",
                                 f"speaker_type={models / 'emotion'}"])
    assert len(recs) == len(LENGTHS_S)
    for i, rec in recs.items():
        wav = load_audio(manifest.parent / rec["audio"])
        for key, folder, labels in (("emotion", "emotion", EMOTIONS), ("accent", "accent", ["scottish", "us", "indian"])):
            ann = rec["annotations"][key]
            probs = one_at_a_time(models / folder, wav)  # batched with padding == alone
            assert ann["value"] == labels[int(np.argmax(probs))] == ann["bin"]
            assert ann["confidence"] == pytest.approx(float(probs.max()), abs=2e-4)
            assert ann["annotator"] == f"{key}/classifier-1" and ann["extra"]["model"] == str(models / folder)
            assert list(ann["extra"]["scores"])[0] == ann["value"] and len(ann["extra"]["scores"]) == 3
        desc = rec["description"]
        emotion = rec["annotations"]["emotion"]["bin"]
        assert f"Emotion: {emotion.capitalize()}" in desc and "Accent: " in desc and "Speaker Type: " in desc
        assert desc.count("Emotion:") == 1  # the manifest's emotion label does not add a second field
    assert rec["annotations"]["speaker_type"]["value"] in EMOTIONS


def test_trusted_labels_override_a_classifier_and_eval_scores_it(models, manifest, tmp_path):
    recs = annotate(manifest, tmp_path / "trusted.jsonl", classifiers=[f"emotion={models / 'emotion'}"],
                    trust_labels=True)
    for rec in recs.values():
        ann = rec["annotations"]["emotion"]
        assert ann["bin"] == rec["labels"]["emotion"] and ann["extra"]["source"] == "label"
        assert f"Emotion: {rec['labels']['emotion'].capitalize()}" in rec["description"]
    report = evaluate(list(recs.values()))
    guesses = [r["annotations"]["emotion"]["extra"]["annotator_bin"] for r in recs.values()]
    truth = [r["labels"]["emotion"] for r in recs.values()]
    assert report["emotion"]["accuracy"] == pytest.approx(np.mean([g == t for g, t in zip(guesses, truth)]), abs=1e-4)
    assert "| emotion |" in format_report(report)


def test_a_classifier_key_replaces_the_built_in_annotator(models, manifest, tmp_path):
    recs = annotate(manifest, tmp_path / "g.jsonl", annotators=["duration", "pitch", "gender"],
                    classifiers=[f"gender={models / 'emotion'}"])
    for rec in recs.values():
        assert rec["annotations"]["gender"]["annotator"] == "gender/classifier-1"
        assert rec["annotations"]["gender"]["value"] in EMOTIONS
        assert rec["annotations"]["pitch"]["annotator"] == "pitch/1"


def test_cli_flag_and_device(models, manifest, tmp_path, capsys):
    from speechllm.cli import main

    out = tmp_path / "cli.jsonl"
    assert main(["annotate", str(manifest), "--out", str(out), "--annotators", "duration", "--workers", "1",
                 "--classifier", f"emotion={models / 'emotion'}", "--classifier", f"age={models / 'emotion'}",
                 "--device", "cpu", "--quiet"]) == 0
    rec = json.loads(out.read_text().splitlines()[0])
    assert {"emotion", "age"} <= set(rec["annotations"]) and "Age: " in rec["description"]


def test_bad_classifiers_are_clear_errors(models, manifest, tmp_path, capsys, monkeypatch):
    from speechllm.cli import main
    from speechllm.hub.tiny import build_tiny_whisper

    with pytest.raises(ConfigError, match="'emotion' is not KEY=MODEL"):
        load_config(None, ["annotate.classifiers=[emotion]"])
    with pytest.raises(ConfigError, match="'Emotion=x' is not KEY=MODEL"):
        AnnotateConfig(classifiers=["Emotion=x"])
    with pytest.raises(ConfigError, match="KEY 'age' is given twice"):
        AnnotateConfig(classifiers=["age=a", "age=b"])
    with pytest.raises(ClassifierError, match=r"--classifier emotion=\./no/such/model: .*no such folder"):
        check_classifier("emotion", "./no/such/model")
    build_tiny_whisper(tmp_path / "asr")
    with pytest.raises(ClassifierError, match="WhisperForConditionalGeneration, which has no audio-classification head"):
        AudioClassifier(str(tmp_path / "asr"), key="emotion")
    (tmp_path / "asr" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ClassifierError, match="a 'llama' model is not an audio-classification model"):
        check_classifier("emotion", str(tmp_path / "asr"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ClassifierError, match=r"--classifier emotion=.*empty: cannot load"):
        check_classifier("emotion", str(tmp_path / "empty"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ClassifierError, match="--classifier emotion=someone/not-cached-model"):
        check_classifier("emotion", "someone/not-cached-model")
    out = tmp_path / "bad.jsonl"
    assert main(["annotate", str(manifest), "--out", str(out), "--annotators", "duration", "--workers", "1",
                 "--classifier", f"emotion={tmp_path / 'nope'}", "--quiet"]) == 2
    assert f"emotion={tmp_path / 'nope'}" in capsys.readouterr().err
    assert not out.exists() or out.read_text() == ""  # nothing annotated without the asked-for classifier
