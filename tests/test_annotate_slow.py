"""Slow tier: the whole annotation pipeline with real Whisper ASR on real recorded speech."""

import json

import pytest

from conftest import ROOT

from annotate.evaluate import evaluate
from speechllm.config import AnnotateConfig
from annotate.pipeline import manifest_items, run

pytestmark = pytest.mark.slow

REFERENCES = {
    "librivox_austen_0890": "unless to be rather cold hearted and rather selfish is to be ill disposed",
    "librivox_austen_0920": "had he married a more a amiable woman he might have been made still more respectable "
                            "than he was",
}


def test_real_speech_transcript_speed_and_description(tmp_path):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps({"id": k, "audio": str(ROOT / "samples" / f"{k}.wav"),
                                            "labels": {"transcript": v, "gender": "male"}}) + "\n"
                                for k, v in REFERENCES.items()))
    # absolute audio paths are outside the manifest's folder: refused, as documented
    out = tmp_path / "meta.jsonl"
    summary = run(manifest_items(manifest, tmp_path), out, AnnotateConfig(workers=1), progress=False)
    assert summary.errors == 2 and summary.error_kinds == {"path": 2}

    (tmp_path / "samples").symlink_to(ROOT / "samples")
    manifest.write_text("".join(json.dumps({"id": k, "audio": f"samples/{k}.wav",
                                            "labels": {"transcript": v, "gender": "male"}}) + "\n"
                                for k, v in REFERENCES.items()))
    out = tmp_path / "meta2.jsonl"
    summary = run(manifest_items(manifest, tmp_path), out, AnnotateConfig(workers=2, batch_size=1), progress=False)
    assert summary.annotated == 2, (tmp_path / "meta2.errors.jsonl").read_text()
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    report = evaluate(recs)
    assert report["transcript"]["wer"] <= 0.15
    assert report["gender"]["accuracy"] == 1.0
    for rec in recs:
        assert rec["annotations"]["speed"]["bin"] == "normal"  # an audiobook reader, ~4 syllables/s
        assert rec["description"].startswith('[00:00-00:0') and "(Gender: Male, Pitch: Low, Speaking speed: Normal, " \
               "Volume: Normal, Noise: Clean)" in rec["description"]


def test_any_transformers_asr_model_by_folder_agrees_with_ctranslate2():
    from annotate.asr import SpeechRecognizer
    from speechllm.hub import weights
    from speechllm.io.audio import load_audio

    wavs = [load_audio(ROOT / "samples" / f"{k}.wav") for k in REFERENCES]
    fast = SpeechRecognizer("whisper-tiny.en").transcribe(wavs)
    # a plain folder is not an embedded name: it runs through transformers' ASR pipeline
    generic = SpeechRecognizer(str(weights.model_path("whisper-tiny.en"))).transcribe(wavs)
    assert generic == fast
