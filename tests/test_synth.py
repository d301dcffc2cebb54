"""The synthetic corpus: schema, splits, determinism, resume, and labels that the audio bears out.

Needs the espeak-ng and flite binaries (`make setup` installs them with
scripts/install_system_deps.sh); one 12-clip corpus is made per session, in a few seconds."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from annotate import synth
from annotate.bins import (GENDER_NAMES, NOISE_NAMES, PITCH_BINS_HZ, PITCH_NAMES, SPEED_NAMES, VOLUME_BINS_LUFS,
                           VOLUME_NAMES, to_bin)

N_CLIPS, SEED = 12, 7
LABEL_KEYS = {"transcript", "gender", "pitch", "speed", "volume", "noise", "f0_hz_target", "rate_wpm",
              "syllables_per_second_target", "syllables", "loudness_lufs", "snr_db", "noise_type",
              "speech_start_s", "speech_end_s", "voice", "engine", "engine_settings", "split"}
F0_FLOOR_HZ, F0_CEILING_HZ = 60.0, 500.0


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
