"""The annotation stage on clips with known attributes (espeak-ng), the description format,
resume after a crash, and every bad-input kind."""

import json
import shutil
import subprocess

import numpy as np
import pytest
import soundfile as sf

from annotate.base import ANNOTATORS, Annotation, Annotator, Clip, order_annotators, register_annotator
from speechllm.labels import to_bin
from annotate.description import describe
from annotate.evaluate import evaluate, format_report, normalize_text
from annotate.noise import estimate_snr
from speechllm.config import AnnotateConfig
from annotate.pipeline import annotate_batch, manifest_items, run, _init_worker
from speechllm.labels import count_syllables, word_syllables
from speechllm.io.audio import SAMPLE_RATE, load_audio

NO_ASR = ["duration", "vad", "pitch", "gender", "volume", "noise"]
SENTENCE = "The quick brown fox jumps over the lazy dog near the river bank."


def espeak(path, voice="en-us+m3", pitch=30, wpm=175, text=SENTENCE, gain_db=0.0, snr_db=None, pad_s=0.4, seed=0):
    """A clip with known settings: espeak-ng voice/pitch/rate, then gain and white noise at an SNR."""
    if shutil.which("espeak-ng") is None:
        pytest.fail("espeak-ng is missing: `make setup` installs the project's Debian packages")
    raw = path.with_suffix(".raw.wav")
    subprocess.run(["espeak-ng", "-v", voice, "-p", str(pitch), "-s", str(wpm), "-w", str(raw), text], check=True)
    wav = load_audio(raw)
    pad = np.zeros(int(pad_s * SAMPLE_RATE), np.float32)
    wav = np.concatenate([pad, wav, pad]) * 10 ** (gain_db / 20)
    if snr_db is not None:
        speech_power = np.mean(wav[len(pad):-len(pad)] ** 2)
        noise = np.random.default_rng(seed).normal(0, 1, len(wav)).astype(np.float32)
        wav = wav + noise * np.sqrt(speech_power / 10 ** (snr_db / 10))
    sf.write(path, wav.astype(np.float32), SAMPLE_RATE)
    return path


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    d = tmp_path_factory.mktemp("clips")
    return {
        "male_low": espeak(d / "male_low.wav", "en-us+m3", 30),
        "female_high": espeak(d / "female_high.wav", "en-us+f3", 70),
        "quiet": espeak(d / "quiet.wav", gain_db=-22),
        "noisy": espeak(d / "noisy.wav", snr_db=5),
        "slow": espeak(d / "slow.wav", wpm=100),
        "fast": espeak(d / "fast.wav", wpm=330),
    }


@pytest.fixture(scope="module")
def no_asr_worker():
    _init_worker(NO_ASR, {}, threads=1)


def annotate_files(paths, names=NO_ASR):
    from annotate.pipeline import Item

    _init_worker(names, {}, threads=1)
    items = [Item(p.stem, p.name, str(p), {}) for p in paths]
    records, errors = annotate_batch(items, max_seconds=30.0, trust_labels=False)
    assert not errors, errors
    return {r["id"]: r for r in records}


def test_pitch_gender_volume_noise_on_known_clips(clips):
    recs = annotate_files(list(clips.values()))
    a = lambda clip, name: recs[clip]["annotations"][name]  # noqa: E731
    assert a("male_low", "pitch")["bin"] == "low" and a("male_low", "gender")["bin"] == "male"
    assert a("female_high", "pitch")["bin"] == "high" and a("female_high", "gender")["bin"] == "female"
    assert a("male_low", "volume")["bin"] == "normal" and a("quiet", "volume")["bin"] == "quiet"
    assert a("quiet", "volume")["value"] == pytest.approx(a("male_low", "volume")["value"] - 22, abs=1.0)
    assert a("male_low", "noise")["bin"] == "clean" and a("noisy", "noise")["bin"] == "noisy"
    assert a("noisy", "noise")["value"] == pytest.approx(5, abs=3)
    segs = a("male_low", "vad")["value"]
    assert segs[0][0] == pytest.approx(0.4, abs=0.15)  # the padding is not speech
    assert recs["male_low"]["duration"] == pytest.approx(a("male_low", "duration")["value"])


def test_gender_abstains_near_the_boundary(no_asr_worker):
    gender = ANNOTATORS["gender"]()
    prior = [{"pitch": Annotation(value=f)} for f in (100.0, 158.0, 163.0, 230.0)]
    out = gender.annotate([None] * 4, prior)
    assert [o.bin for o in out] == ["male", None, None, "female"]
    assert out[0].confidence > out[1].confidence


def test_speaking_rate_separates_slow_and_fast(clips):
    from annotate.rate import SpeakingRate
    from annotate.pipeline import Item

    recs = annotate_files([clips["slow"], clips["fast"]], names=["duration", "vad"])
    rate = SpeakingRate()
    out = {}
    for name in ("slow", "fast"):
        prior = {k: Annotation(**{f: v for f, v in ann.items() if f != "annotator"})
                 for k, ann in recs[name]["annotations"].items()}
        prior["transcript"] = Annotation(value=SENTENCE)
        out[name] = rate.annotate([None], [prior])[0]
    assert out["slow"].bin == "slow" and out["fast"].bin == "fast", (out["slow"].value, out["fast"].value)


def test_syllable_counter():
    cases = {"make": 1, "table": 2, "walked": 1, "wanted": 2, "voices": 2, "makes": 1, "the": 1, "beautiful": 3,
             "river": 2, "whale": 1, "2024": 5}
    assert {w: word_syllables(w) for w in cases} == cases
    assert count_syllables("The quick brown fox jumps over the lazy dog.") == 11


def test_bins_and_description_format():
    assert to_bin(119.9, (120.0, 200.0), ("low", "normal", "high")) == "low"
    assert to_bin(120.0, (120.0, 200.0), ("low", "normal", "high")) == "normal"
    assert to_bin(250.0, (120.0, 200.0), ("low", "normal", "high")) == "high"
    line = describe(4.2, " the transcript ", [("Pitch", "high"), ("Noise", "clean"), ("Gender", "female"),
                                             ("Emotion", "sad"), ("Volume", "normal"), ("Speaking speed", "fast")])
    assert line == ('[00:00-00:05] "the transcript" (Gender: Female, Pitch: High, Speaking speed: Fast, '
                    'Volume: Normal, Noise: Clean, Emotion: Sad)')
    assert describe(75.0, None, []) == "[00:00-01:15]"


def test_snr_estimate_on_synthetic_signal():
    rng = np.random.default_rng(0)
    sr = SAMPLE_RATE
    tone = 0.3 * np.sin(2 * np.pi * 200 * np.arange(sr) / sr)
    for snr in (0.0, 10.0, 30.0):
        noise_std = np.sqrt(np.mean(tone ** 2) / 10 ** (snr / 10))
        wav = np.concatenate([np.zeros(sr // 2), tone, np.zeros(sr // 2)]) + rng.normal(0, noise_std, 2 * sr)
        est, method = estimate_snr(wav.astype(np.float32), [[0.5, 1.5]], sr)
        assert method == "vad" and est == pytest.approx(snr, abs=1.0)


def write_manifest(folder, clips):
    (folder / "audio").mkdir()
    for name, src in clips.items():
        shutil.copy(src, folder / "audio" / f"{name}.wav")
    (folder / "audio" / "empty.wav").write_bytes(b"")
    (folder / "audio" / "junk.wav").write_bytes(b"RIFF....WAVEfmt not really")
    sf.write(folder / "audio" / "silence.wav", np.zeros(SAMPLE_RATE, np.float32), SAMPLE_RATE)
    sf.write(folder / "audio" / "nan.wav", np.full(SAMPLE_RATE, np.nan, np.float32), SAMPLE_RATE, subtype="FLOAT")
    sf.write(folder / "audio" / "long.wav", np.zeros(9 * SAMPLE_RATE, np.float32), SAMPLE_RATE)
    good = [{"id": n, "audio": f"audio/{n}.wav", "labels": {"gender": "male" if "male" in n else "female"}}
            for n in clips]
    bad = [{"id": "empty", "audio": "audio/empty.wav"}, {"id": "junk", "audio": "audio/junk.wav"},
           {"id": "silence", "audio": "audio/silence.wav"}, {"id": "nan", "audio": "audio/nan.wav"},
           {"id": "missing", "audio": "audio/missing.wav"}, {"id": "escape", "audio": "../outside.wav"},
           {"id": "long", "audio": "audio/long.wav"}, {"id": good[0]["id"], "audio": good[0]["audio"]}]
    lines = [json.dumps(r) for r in good[:3] + bad + good[3:]]
    lines.insert(4, '{"id": "torn", "audio": ')
    (folder / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "manifest.jsonl", [g["id"] for g in good]


def test_every_bad_input_is_an_error_record_and_the_run_goes_on(tmp_path, clips):
    manifest, good = write_manifest(tmp_path, clips)
    out = tmp_path / "meta.jsonl"
    opts = AnnotateConfig(annotators=NO_ASR, workers=1, batch_size=3, max_seconds=8.0)
    summary = run(manifest_items(manifest, tmp_path), out, opts, progress=False)
    ids = [json.loads(l)["id"] for l in out.read_text().splitlines()]
    assert sorted(ids) == sorted(good)
    errors = {json.loads(l)["id"]: json.loads(l) for l in (tmp_path / "meta.errors.jsonl").read_text().splitlines()}
    kinds = {k: e["kind"] for k, e in errors.items()}
    assert kinds == {"empty": "audio", "junk": "audio", "silence": "vad", "nan": "audio", "missing": "audio",
                     "escape": "path", "long": "too_long", "manifest.jsonl:line5": "malformed",
                     "manifest.jsonl:line12": "duplicate"}
    assert "empty.wav: empty file" in errors["empty"]["error"]
    assert "contains NaN" in errors["nan"]["error"] and "no speech" in errors["silence"]["error"]
    assert "manifest.jsonl:5: not valid JSON" in errors["manifest.jsonl:line5"]["error"]
    assert summary.annotated == len(good) and summary.errors == 9
    # labels travel with the record; descriptions are deterministic
    rec = json.loads(out.read_text().splitlines()[0])
    assert rec["labels"]["gender"] in ("male", "female") and rec["description"].startswith("[00:00-00:0")
    assert "(Gender: " in rec["description"] or "(Pitch: " in rec["description"]


def test_resume_after_a_crash_loses_nothing_and_duplicates_nothing(tmp_path, clips):
    manifest, good = write_manifest(tmp_path, clips)
    out = tmp_path / "meta.jsonl"
    opts = AnnotateConfig(annotators=NO_ASR, workers=1, batch_size=2, max_seconds=8.0)
    run(manifest_items(manifest, tmp_path), out, opts, progress=False)
    full = out.read_text().splitlines()
    # simulate kill -9 mid-write: two records complete, the third torn in half
    out.write_text("\n".join(full[:2]) + "\n" + full[2][: len(full[2]) // 2])
    (tmp_path / "meta.errors.jsonl").write_text("")
    summary = run(manifest_items(manifest, tmp_path), out, opts, progress=False)
    ids = [json.loads(l)["id"] for l in out.read_text().splitlines()]
    assert sorted(ids) == sorted(good) and len(ids) == len(set(ids))
    assert summary.done_before == 2 and summary.annotated == len(good) - 2 and summary.errors == 9
    again = run(manifest_items(manifest, tmp_path), out, opts, progress=False)
    assert again.annotated == 0 and again.errors == 0 and again.done_before == len(good)
    assert again.errors_before == 9


def test_parallel_workers_match_one_worker(tmp_path, clips):
    manifest, good = write_manifest(tmp_path, clips)
    one, two = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    run(manifest_items(manifest, tmp_path), one,
        AnnotateConfig(annotators=NO_ASR, workers=1, batch_size=2), progress=False)
    run(manifest_items(manifest, tmp_path), two,
        AnnotateConfig(annotators=NO_ASR, workers=2, batch_size=2), progress=False)
    load = lambda p: {json.loads(l)["id"]: json.loads(l) for l in p.read_text().splitlines()}  # noqa: E731
    assert load(one) == load(two)
    assert list(load(two)) == list(load(one)) == good  # input order, whichever worker finished first


def test_trust_labels_override_and_label_only_fields(tmp_path, clips):
    shutil.copy(clips["male_low"], tmp_path / "a.wav")
    (tmp_path / "m.jsonl").write_text(json.dumps(
        {"id": "a", "audio": "a.wav", "labels": {"pitch": "high", "emotion": "happy", "accent": "scottish"}}) + "\n")
    for trust, expect in ((False, "Pitch: Low"), (True, "Pitch: High")):
        out = tmp_path / f"m{trust}.jsonl"
        run(manifest_items(tmp_path / "m.jsonl", tmp_path), out,
            AnnotateConfig(annotators=NO_ASR, workers=1, trust_labels=trust), progress=False)
        desc = json.loads(out.read_text())["description"]
        assert expect in desc and "Emotion: Happy" in desc and "Accent: Scottish" in desc


def test_registered_annotator_joins_the_description(tmp_path, clips):
    @register_annotator
    class Emotion(Annotator):
        name, version, field, requires = "emotion", "1", "Emotion", ("pitch",)

        def annotate(self, clips_, prior):
            return [Annotation(value=p["pitch"].value, bin="calm") for p in prior]

    try:
        assert order_annotators(["emotion", "pitch"]) == ["pitch", "emotion"]
        with pytest.raises(ValueError, match="requires pitch"):
            order_annotators(["emotion"])
        rec = annotate_files([clips["male_low"]], names=["duration", "pitch", "emotion"])["male_low"]
        assert "Emotion: Calm" in rec["description"] and rec["annotations"]["emotion"]["annotator"] == "emotion/1"
    finally:
        ANNOTATORS.pop("emotion")


def test_evaluate_scores_and_confusions():
    def rec(label, pred, text=None, hyp=None):
        r = {"labels": {"gender": label}, "annotations": {"gender": {"bin": pred}}}
        if text:
            r["labels"]["transcript"] = text
            r["annotations"]["transcript"] = {"value": hyp}
        return r

    report = evaluate([rec("male", "male", "Cold-hearted, yes.", "cold hearted yes"), rec("male", None),
                       rec("female", "female", "a b c d", "a b x d"), rec("female", "male")])
    assert report["gender"]["accuracy"] == 0.5 and report["gender"]["coverage"] == 0.75
    assert report["gender"]["confusion"] == {"female": {"(none)": 0, "female": 1, "male": 1},
                                             "male": {"(none)": 1, "female": 0, "male": 1}}
    assert report["transcript"]["wer"] == pytest.approx(1 / 7, abs=1e-4)
    assert "| gender | 4 | accuracy 50.0% | 75.0% |" in format_report(report)
    assert normalize_text("Ill-disposed, Mr. Smith? Ten of clubs.") == normalize_text("ill disposed mister smith 10 of clubs")


def test_folder_and_hf_dataset_inputs(tmp_path, clips):
    import datasets

    from annotate.pipeline import folder_items, hf_items

    (tmp_path / "f" / "sub").mkdir(parents=True)
    shutil.copy(clips["male_low"], tmp_path / "f" / "sub" / "one.wav")
    sf.write(tmp_path / "f" / "two.flac", load_audio(clips["female_high"]), SAMPLE_RATE)
    items = list(folder_items(tmp_path / "f", tmp_path))
    assert [i.id for i in items] == ["sub/one", "two"]

    ds = datasets.Dataset.from_dict({"id": ["x1", "x2"], "audio": [str(clips["male_low"]), str(clips["quiet"])],
                                     "text": [SENTENCE, SENTENCE], "gender": ["male", "male"]})
    ds = ds.cast_column("audio", datasets.Audio())
    ds.save_to_disk(str(tmp_path / "hf"))
    out = tmp_path / "hf.metadata.jsonl"
    summary = run(hf_items(str(tmp_path / "hf"), tmp_path, tmp_path / "hf.audio"), out,
                  AnnotateConfig(annotators=NO_ASR, workers=1), progress=False)
    assert summary.annotated == 2
    recs = [json.loads(l) for l in out.read_text().splitlines()]
    assert recs[0]["labels"] == {"transcript": SENTENCE, "gender": "male"}
    assert (tmp_path / recs[0]["audio"]).is_file()


def test_dnsmos_background_score_when_asked(clips):
    pytest.importorskip("speechmos", reason="optional package of the `quality` extra")
    from annotate.noise import Noise

    recs = annotate_files([clips["male_low"], clips["noisy"]], names=["duration", "vad"])
    noise = Noise(dnsmos=True)
    scores = {}
    for name in ("male_low", "noisy"):
        prior = {"vad": Annotation(**{f: v for f, v in recs[name]["annotations"]["vad"].items() if f != "annotator"})}
        scores[name] = noise.annotate([Clip(name, "", load_audio(clips[name]))],
                                      [prior])[0].extra["dnsmos_bak"]
    assert scores["noisy"] < scores["male_low"] - 1.0


def test_a_trusted_transcript_label_is_used_without_running_asr(clips, monkeypatch):
    # the label replaces ASR's result whole, so ASR runs only on a clip without a transcript label
    from annotate.asr import Transcript
    from annotate.pipeline import Item

    heard = []

    def fake_asr(self, clips_, prior):
        heard.extend(c.id for c in clips_)
        return [Annotation(value="words the asr heard") for _ in clips_]

    monkeypatch.setattr(Transcript, "annotate", fake_asr)
    monkeypatch.setattr(Transcript, "__init__", lambda self, **kw: None)
    _init_worker(["duration", "transcript", "vad", "speed"], {}, threads=1)
    items = [Item("said", "a.wav", str(clips["male_low"]), {"transcript": "the true sentence"}),
             Item("unsaid", "b.wav", str(clips["female_high"]), {})]
    for trust, expect in ((True, ["unsaid"]), (False, ["said", "unsaid"])):
        heard.clear()
        records, errors = annotate_batch(items, max_seconds=30.0, trust_labels=trust)
        assert not errors and heard == expect
        by_id = {r["id"]: r for r in records}
        said = by_id["said"]["annotations"]["transcript"]
        assert said["value"] == ("the true sentence" if trust else "words the asr heard")
        assert ("the true sentence" in by_id["said"]["description"]) == trust
        assert by_id["unsaid"]["annotations"]["transcript"]["value"] == "words the asr heard"
