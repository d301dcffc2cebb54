"""The synthetic corpus: schema, splits, determinism, resume, and labels that the audio bears out.

Needs the espeak-ng and flite binaries (`make setup` installs them with
scripts/install_system_deps.sh); one 12-clip corpus is made per session, in a few seconds."""

from __future__ import annotations

import copy
import importlib.util
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from speechllm.data.synth import corpus as synth
from speechllm.labels import (GENDER_NAMES, NOISE_NAMES, PITCH_BINS_HZ, PITCH_NAMES, SPEED_NAMES, VOLUME_BINS_LUFS,
                              VOLUME_NAMES, to_bin)

N_CLIPS, SEED = 12, 7
LABEL_KEYS = {"transcript", "gender", "pitch", "speed", "volume", "noise", "f0_hz_target", "rate_wpm",
              "syllables_per_second_target", "syllables", "loudness_lufs", "snr_db", "noise_type",
              "speech_start_s", "speech_end_s", "voice", "engine", "engine_settings", "split"}
F0_FLOOR_HZ, F0_CEILING_HZ = 60.0, 500.0
SHIPPED_CALIBRATION = Path(synth.__file__).with_name(synth.CALIBRATION_RESOURCE)
CALIBRATE_SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "calibrate_synth.py"


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for split in synth.SPLITS
            for line in (out / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()]


def _snapshot(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "corpus"
    summary = synth.synthesize(out, N_CLIPS, seed=SEED, workers=2, progress=False)
    assert summary.generated == N_CLIPS and summary.skipped == 0
    assert sum(summary.clips.values()) == N_CLIPS
    return out


def test_manifest_schema_and_label_values(corpus):
    records = _records(corpus)
    assert len(records) == N_CLIPS and len({r["id"] for r in records}) == N_CLIPS
    for r in records:
        assert set(r) == {"id", "audio", "labels"}
        assert r["audio"] == f"audio/{r['id']}.wav"
        lab = r["labels"]
        assert set(lab) == LABEL_KEYS
        assert lab["gender"] in GENDER_NAMES and lab["pitch"] in PITCH_NAMES
        assert lab["speed"] in SPEED_NAMES and lab["volume"] in VOLUME_NAMES and lab["noise"] in NOISE_NAMES
        assert (lab["gender"], lab["pitch"]) in synth.PITCH_TARGETS_HZ  # never male-high or female-low
        assert to_bin(lab["f0_hz_target"], PITCH_BINS_HZ, PITCH_NAMES) == lab["pitch"]
        assert to_bin(lab["loudness_lufs"], VOLUME_BINS_LUFS, VOLUME_NAMES) == lab["volume"]
        lo, hi = synth.SPEED_TARGETS_SYLL_PER_S[lab["speed"]]
        assert lo <= lab["syllables_per_second_target"] <= hi
        assert lab["transcript"] in synth.load_sentences()
        assert synth.VOICES_BY_NAME[lab["voice"]].gender == lab["gender"]
        assert lab["engine"] == lab["voice"].split(":")[0]
        assert (lab["rate_wpm"] is None) == (lab["engine"] == synth.FLITE)
        if lab["noise"] == "clean":
            assert lab["snr_db"] is None and lab["noise_type"] is None
        else:
            assert synth.NOISY_SNR_DB[0] <= lab["snr_db"] <= synth.NOISY_SNR_DB[1]
            assert lab["noise_type"] in synth.NOISE_TYPES
        info = sf.info(corpus / r["audio"])
        assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")
        assert synth.SILENCE_S[0] <= lab["speech_start_s"] <= synth.SILENCE_S[1] + 0.001
        trailing = info.frames / info.samplerate - lab["speech_end_s"]
        assert synth.SILENCE_S[0] - 0.001 <= trailing <= synth.SILENCE_S[1] + 0.001
    info = json.loads((corpus / "synth.json").read_text())
    assert info["complete"] and info["clips"] == {s: sum(r["labels"]["split"] == s for r in records)
                                                 for s in synth.SPLITS}
    assert set(info["settings"]["engines"]) == {synth.ESPEAK, synth.FLITE}


def test_splits_are_disjoint_by_sentence_and_voice(corpus):
    records = _records(corpus)
    by_split = {s: [r["labels"] for r in records if r["labels"]["split"] == s] for s in synth.SPLITS}
    assert by_split["train"] and by_split["test"]
    for split in synth.SPLITS:
        lines = (corpus / f"{split}.jsonl").read_text().splitlines()
        assert all(json.loads(ln)["labels"]["split"] == split for ln in lines)
    settings = json.loads((corpus / "synth.json").read_text())["settings"]
    assert not set(settings["voices"]["train"]) & set(settings["voices"]["test"])
    for split, labels in by_split.items():
        assert {lab["voice"] for lab in labels} <= set(settings["voices"][split])
    splits = synth.split_voices_and_sentences(SEED, 0.2, synth.VOICES, synth.load_sentences())
    assert not set(splits.sentences["train"]) & set(splits.sentences["test"])
    for split, labels in by_split.items():
        assert {lab["transcript"] for lab in labels} <= set(splits.sentences[split])


def test_same_seed_same_bytes_other_seed_differs(corpus, tmp_path):
    again = tmp_path / "again"
    synth.synthesize(again, N_CLIPS, seed=SEED, workers=1, progress=False)
    assert _snapshot(again) == _snapshot(corpus)
    other = tmp_path / "other"
    synth.synthesize(other, N_CLIPS, seed=SEED + 1, workers=1, progress=False)
    assert (other / "train.jsonl").read_bytes() != (corpus / "train.jsonl").read_bytes()
    wavs = {k: v for k, v in _snapshot(corpus).items() if k.endswith(".wav")}
    assert not {v for k, v in _snapshot(other).items() if k.endswith(".wav")} & set(wavs.values())


def test_resume_after_a_crash(corpus, tmp_path):
    out = tmp_path / "crashed"
    shutil.copytree(corpus, out)
    train = out / "train.jsonl"
    lines = train.read_bytes().splitlines(keepends=True)
    torn = json.loads(lines[-1])["id"]
    train.write_bytes(b"".join(lines[:-1]) + lines[-1][: len(lines[-1]) // 2])  # died mid-line
    first = json.loads(lines[0])["id"]
    (out / "audio" / f"{first}.wav").unlink()  # a manifest line whose wav is gone
    (out / "audio" / f"{torn}.wav").unlink()
    (out / "audio" / f".{first}.wav.123.tmp").write_bytes(b"half a wav")  # a rename that never happened
    summary = synth.synthesize(out, N_CLIPS, seed=SEED, workers=1, progress=False)
    assert (summary.generated, summary.skipped) == (2, N_CLIPS - 2)
    ids = [r["id"] for r in _records(out)]
    assert sorted(ids) == sorted(set(ids)) and len(ids) == N_CLIPS
    assert _snapshot(out) == _snapshot(corpus)


def test_other_settings_in_the_same_folder_are_refused(corpus, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(corpus, out)
    with pytest.raises(synth.SynthError, match=r"synth.json: this folder holds a corpus made with other settings"):
        synth.synthesize(out, N_CLIPS, seed=SEED + 1, progress=False)


def test_realised_pitch_is_in_the_labelled_bin(corpus):
    import parselmouth

    for r in _records(corpus):
        wav, sr = sf.read(corpus / r["audio"])
        pitch = parselmouth.Sound(wav, sampling_frequency=sr).to_pitch(pitch_floor=F0_FLOOR_HZ,
                                                                        pitch_ceiling=F0_CEILING_HZ)
        f0 = pitch.selected_array["frequency"]
        median = float(np.median(f0[f0 > 0]))
        assert to_bin(median, PITCH_BINS_HZ, PITCH_NAMES) == r["labels"]["pitch"], (r["id"], median)
        assert abs(median / r["labels"]["f0_hz_target"] - 1) < 0.1, (r["id"], median)


def test_loudness_label_matches_the_file(corpus):
    import pyloudnorm

    meter = pyloudnorm.Meter(16000)
    for r in _records(corpus):
        wav, _ = sf.read(corpus / r["audio"])
        assert abs(meter.integrated_loudness(wav) - r["labels"]["loudness_lufs"]) < 1.0
        assert 20 * np.log10(np.abs(wav).max()) <= synth.PEAK_LIMIT_DBFS + 0.01


def test_noisy_clips_have_their_labelled_snr(corpus):
    noisy = [r for r in _records(corpus) if r["labels"]["noise"] == "noisy"]
    assert noisy, "the test corpus should hold noisy clips"
    for r in noisy:
        wav, sr = sf.read(corpus / r["audio"])
        start, end = (round(r["labels"][k] * sr) for k in ("speech_start_s", "speech_end_s"))
        noise = np.mean(np.concatenate([wav[:start], wav[end:]]) ** 2)  # the silence holds only noise
        speech = np.mean(wav[start:end] ** 2) - noise
        assert abs(10 * np.log10(speech / noise) - r["labels"]["snr_db"]) < 1.0, r["id"]
    for r in _records(corpus):
        if r["labels"]["noise"] == "clean":
            wav, sr = sf.read(corpus / r["audio"])
            assert np.abs(wav[: round(r["labels"]["speech_start_s"] * sr)]).max() == 0.0


def test_speed_target_is_met_by_the_rendering(corpus):
    for r in _records(corpus):
        lab = r["labels"]
        reached = lab["syllables"] / (lab["speech_end_s"] - lab["speech_start_s"])
        assert abs(reached / lab["syllables_per_second_target"] - 1) <= synth.RATE_TOLERANCE + 0.01, r["id"]


def test_missing_engine_names_its_debian_package(monkeypatch, tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "espeak-ng").symlink_to(shutil.which("espeak-ng"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(synth.SynthError, match="espeak-ng not found on PATH: install the Debian package espeak-ng"):
        synth.require_engines({synth.ESPEAK})
    monkeypatch.setenv("PATH", str(bin_dir))
    with pytest.raises(synth.SynthError, match="flite not found on PATH: install the Debian package flite"):
        synth.synthesize(tmp_path / "out", 2, progress=False)
    assert not (tmp_path / "out").exists()


def test_plan_depends_only_on_seed_and_index():
    splits = synth.split_voices_and_sentences(SEED, 0.2, synth.VOICES, synth.load_sentences())
    a = [synth.plan_clip(i, SEED, 0.2, splits) for i in range(20)]
    assert a == [synth.plan_clip(i, SEED, 0.2, splits) for i in range(20)]
    assert [s.split for s in a].count("test") == 4
    for spec in a:
        assert spec.voice in splits.voices[spec.split] and spec.sentence in splits.sentences[spec.split]


def _calibrate_script():
    """scripts/calibrate_synth.py as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location("calibrate_synth", CALIBRATE_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_shipped_calibration_round_trips():
    text = SHIPPED_CALIBRATION.read_text(encoding="utf-8")
    calibration = synth.load_calibration()
    assert synth.calibration_to_json(calibration) == json.loads(text)
    assert _calibrate_script().calibration_text(calibration) == text
    assert synth.calibration_from_json(json.loads(text), str(SHIPPED_CALIBRATION)) == calibration
    assert set(calibration.pitch) == set(calibration.rate) == {v.name for v in synth.VOICES}


def test_calibration_holds_the_numbers_it_had_as_python_literals():
    calibration = synth.load_calibration()
    f1 = calibration.pitch["espeak-ng:en-us+f1"]
    assert list(f1) == [80, 175, 330] and all(type(rate) is int for rate in f1)
    assert f1[80][0] == (0, 114.5) and type(f1[80][0][0]) is int
    assert f1[330][-1] == (99, 305.8)
    f1_rate = calibration.rate["espeak-ng:en-us+f1"]
    assert (f1_rate[0], f1_rate[-1]) == ((80, 2.21), (450, 11.27))
    kal16 = calibration.pitch["flite:kal16"]
    assert list(kal16) == [2.0, 1.0, 0.6] and all(type(rate) is float for rate in kal16)
    assert kal16[2.0][0] == (70.0, 65.9) and kal16[0.6][-1] == (290.0, 296.8)
    kal16_rate = calibration.rate["flite:kal16"]
    assert (kal16_rate[0], kal16_rate[-1]) == ((3.0, 1.79), (0.4, 13.39))
    assert calibration.pitch["flite:rms"] == {2.0: ((None, 103.5),), 1.0: ((None, 101.8),), 0.6: ((None, 98.9),)}
    assert isinstance(kal16[1.0], tuple) and all(isinstance(row, tuple) for row in kal16_rate)


def test_calibration_script_writes_the_shipped_file(tmp_path):
    script = _calibrate_script()
    calibration = synth.load_calibration()
    results = []
    for voice, table in calibration.pitch.items():
        pitch = {}
        for rate, rows in table.items():
            measured = [(s, f0 + 0.004, f0 - 9.0, f0 + 9.0) for s, f0 in rows]
            if rows[0][0] is not None:  # a lower setting an octave up (as espeak-ng -p 0 can be): cut
                measured.insert(0, (rows[0][0] - 10, 2 * rows[0][1], 0.0, 0.0))
            pitch[rate] = measured
        rate_rows = [(s, sps + 0.001, sps - 0.5, sps + 0.5) for s, sps in calibration.rate[voice]]
        results.append({"voice": voice, "pitch": pitch, "rate": rate_rows})
    assert script.DEFAULT_OUT == SHIPPED_CALIBRATION
    out = tmp_path / "calibration.json"
    script.write_calibration(out, script.calibration_tables(results, calibration.engines))
    assert out.read_bytes() == SHIPPED_CALIBRATION.read_bytes()
    with pytest.raises(synth.SynthError, match="no pitch calibration for voice flite:rms"):  # checked, then replaced
        script.write_calibration(out, script.calibration_tables(results[:-1], calibration.engines))
    assert out.read_bytes() == SHIPPED_CALIBRATION.read_bytes()
    assert [p.name for p in tmp_path.iterdir()] == [out.name]  # no temporary file left


def test_bad_calibration_file_names_the_file_and_the_voice(tmp_path):
    path = tmp_path / "calibration.json"
    with pytest.raises(synth.SynthError, match=re.escape(f"{path}: calibration file missing")):
        synth.read_calibration(path)
    path.write_text("{", encoding="utf-8")
    with pytest.raises(synth.SynthError, match=re.escape(f"{path}: calibration file is not valid JSON")):
        synth.read_calibration(path)
    doc = synth.calibration_to_json(synth.load_calibration())
    breakages = [
        (lambda d: d.update(format=2), "format: 2, this version reads format 1"),
        (lambda d: d["rate"].pop("flite:awb"), "no rate calibration for voice flite:awb"),
        (lambda d: d["pitch"].pop("espeak-ng:en+m2"), "no pitch calibration for voice espeak-ng:en+m2"),
        (lambda d: d["pitch"]["espeak-ng:en+f2"]["175"].__setitem__(3, [30]),
         'pitch["espeak-ng:en+f2"]["175"][3]: [30] is not a [setting, value] pair of numbers'),
        (lambda d: d["pitch"]["flite:slt"].update(fast=[[70.0, 73.3]]),
         "pitch[\"flite:slt\"]: key 'fast' is not a rate setting written as a JSON number"),
    ]
    for break_it, message in breakages:
        broken = copy.deepcopy(doc)
        break_it(broken)
        path.write_text(json.dumps(broken), encoding="utf-8")
        with pytest.raises(synth.SynthError, match=re.escape(f"{path}: ") + ".*" + re.escape(message)):
            synth.read_calibration(path)


def test_synthesize_without_its_calibration_names_the_file(monkeypatch, tmp_path):
    missing = tmp_path / "calibration.json"
    monkeypatch.setattr(synth, "_calibration_ref", lambda: missing)
    synth.load_calibration.cache_clear()
    with pytest.raises(synth.SynthError, match=re.escape(f"{missing}: calibration file missing")):
        synth.synthesize(tmp_path / "out", 2, progress=False)
    assert not (tmp_path / "out").exists()
