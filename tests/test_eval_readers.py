"""Benchmark readers: Dynamic-SUPERB datasets (built here with `datasets`) and MMAU JSON."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from speechllm.io.audio import SAMPLE_RATE
from speechllm.eval.readers import MMAU_ANSWER_LINE, read_dynamic_superb, read_mmau
from speechllm.records import TaskItem

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "eval"
INSTRUCTION = "Does the audio contain speech? The answer could be yes or no."


def _wav_bytes(seconds: float, sr: int, channels: int = 1, freq: float = 440.0) -> bytes:
    t = np.arange(int(seconds * sr)) / sr
    tone = (0.3 * np.sin(2 * np.pi * freq * t)).astype("float32")
    data = np.stack([tone] * channels, axis=1) if channels > 1 else tone
    buf = io.BytesIO()
    sf.write(buf, data, sr, format="WAV")
    return buf.getvalue()


def _save(tmp_path: Path, name: str, columns: dict, splits: tuple[str, ...] = ()) -> Path:
    """A Dynamic-SUPERB-style dataset saved with save_to_disk (audio as raw bytes, no decoding)."""
    import datasets

    ds = datasets.Dataset.from_dict(columns)
    if "audio" in columns:
        ds = ds.cast_column("audio", datasets.Audio())
    folder = tmp_path / name
    if splits:
        datasets.DatasetDict({s: ds for s in splits}).save_to_disk(str(folder))
    else:
        ds.save_to_disk(str(folder))
    return folder


def _superb_columns() -> dict:
    return {
        "file": ["clip_a.wav", "clip_b.wav", "clip_c.wav", "clip_d.wav"],
        "audio": [
            {"bytes": _wav_bytes(0.5, 8000), "path": None},
            {"bytes": _wav_bytes(0.75, 22050, channels=2), "path": None},
            {"bytes": _wav_bytes(0.25, SAMPLE_RATE), "path": None},
            {"bytes": b"RIFF this is not audio at all", "path": None},
        ],
        "instruction": [INSTRUCTION] * 4,
        "label": ["yes", "no", "yes", "maybe"],
    }


@pytest.fixture()
def superb(tmp_path):
    return _save(tmp_path, "SpeechDetection_Tones", _superb_columns())


def test_dynamic_superb_items_errors_and_flacs(superb, tmp_path):
    out = tmp_path / "out"
    items, errors = read_dynamic_superb(str(superb), out)
    task = "SpeechDetection_Tones"
    assert [i.id for i in items] == [f"{task}/clip_a.wav", f"{task}/clip_b.wav", f"{task}/clip_c.wav"]
    first = items[0]
    assert isinstance(first, TaskItem)
    assert first.to_json() == {
        "id": f"{task}/clip_a.wav",
        "task": task,
        "audio": f"audio/{task}/clip_a.wav.flac",
        "instruction": INSTRUCTION,
        "answer_kind": "label",
        "reference": "yes",
        "labels": ["maybe", "no", "yes"],  # the whole dataset's labels, the failed row's included
        "source": f"dynamic-superb:{superb}",
    }
    assert [i.reference for i in items] == ["yes", "no", "yes"]
    durations = [0.5, 0.75, 0.25]
    for item, seconds in zip(items, durations):
        path = out / item.audio
        assert path.is_file() and not Path(item.audio).is_absolute()
        data, sr = sf.read(path)
        assert sr == SAMPLE_RATE and data.ndim == 1
        assert abs(len(data) - seconds * SAMPLE_RATE) <= 2
    assert len(errors) == 1
    err = errors[0]
    assert set(err) == {"id", "error", "kind"}
    assert err["id"] == f"{task}/clip_d.wav" and err["kind"] == "audio"
    assert str(superb) in err["error"] and "[3]" in err["error"]
    assert not list((out / "audio" / task).glob("*tmp*"))  # atomic writes left nothing behind


def test_dynamic_superb_rerun_does_not_rewrite(superb, tmp_path):
    out = tmp_path / "out"
    items, _ = read_dynamic_superb(str(superb), out)
    before = {i.audio: (out / i.audio).stat() for i in items}
    items2, errors2 = read_dynamic_superb(str(superb), out)
    assert items2 == items and len(errors2) == 1
    for rel, st in before.items():
        now = (out / rel).stat()
        assert (now.st_mtime_ns, now.st_ino, now.st_size) == (st.st_mtime_ns, st.st_ino, st.st_size)


def test_dynamic_superb_task_name_split_and_row_ids(tmp_path):
    cols = _superb_columns()
    cols["file"] = ["same.wav"] * 4  # not unique: rows are numbered instead
    folder = _save(tmp_path, "Multi", cols, splits=("test",))
    items, errors = read_dynamic_superb(str(folder), tmp_path / "out", task="my_task")
    assert [i.id for i in items] == ["my_task/00000000", "my_task/00000001", "my_task/00000002"]
    assert errors[0]["id"] == "my_task/00000003"
    assert items[0].audio == "audio/my_task/00000000.flac"
    assert items[0].source == f"dynamic-superb:{folder}[test]"

    two = _save(tmp_path, "TwoSplits", _superb_columns(), splits=("train", "test"))
    with pytest.raises(ValueError, match="train, test"):
        read_dynamic_superb(str(two), tmp_path / "out2")
    items, _ = read_dynamic_superb(str(two), tmp_path / "out2", split="test")
    assert len(items) == 3
    with pytest.raises(ValueError, match="no split 'dev'"):
        read_dynamic_superb(str(two), tmp_path / "out2", split="dev")


def test_dynamic_superb_class_label_and_empty_fields(tmp_path):
    import datasets

    cols = _superb_columns()
    cols["label"] = [1, 0, 1, 0]
    cols["instruction"] = [INSTRUCTION, INSTRUCTION, "  ", INSTRUCTION]
    ds = datasets.Dataset.from_dict(cols).cast_column("audio", datasets.Audio())
    ds = ds.cast_column("label", datasets.ClassLabel(names=["no", "yes"]))
    ds.save_to_disk(str(tmp_path / "ClassLabels"))
    items, errors = read_dynamic_superb(str(tmp_path / "ClassLabels"), tmp_path / "out")
    assert [(i.id, i.reference) for i in items] == [("ClassLabels/clip_a.wav", "yes"),
                                                    ("ClassLabels/clip_b.wav", "no")]
    assert items[0].labels == ["no", "yes"]
    kinds = {e["id"]: e["kind"] for e in errors}
    assert kinds == {"ClassLabels/clip_c.wav": "malformed", "ClassLabels/clip_d.wav": "audio"}
    assert "[2]" in next(e["error"] for e in errors if e["kind"] == "malformed")


def test_dynamic_superb_missing_columns(tmp_path):
    cols = _superb_columns()
    del cols["label"]
    folder = _save(tmp_path, "NoLabel", cols)
    with pytest.raises(ValueError) as exc:
        read_dynamic_superb(str(folder), tmp_path / "out")
    msg = str(exc.value)
    assert str(folder) in msg and "no column(s) label" in msg and "file, audio, instruction" in msg


# ----------------------------------------------------------------------------- MMAU

@pytest.fixture()
def mmau(tmp_path):
    """The fixture JSON beside the audio it names (entry 5's audio is deliberately absent)."""
    folder = tmp_path / "mmau"
    (folder / "test-mini-audios").mkdir(parents=True)
    shutil.copy(FIXTURES / "mmau-mini.json", folder / "mmau-mini.json")
    for i in (1, 2, 3, 4):
        (folder / "test-mini-audios" / f"a1b2c3d4-000{i}.wav").write_bytes(_wav_bytes(0.3, SAMPLE_RATE))
    return folder / "mmau-mini.json"


def test_mmau_items(mmau):
    items, errors = read_mmau(mmau)
    assert [i.id for i in items] == ["mmau/a1b2c3d4-0001", "mmau/a1b2c3d4-0002"]
    sound, music = items
    question = ("Based on the given audio, identify the source of the tone.\n"
                "Choices: (A) Alarm (B) Electronic device (C) Musical instrument (D) Bird")
    assert sound.to_json() == {
        "id": "mmau/a1b2c3d4-0001",
        "task": "mmau/sound",
        "audio": str(mmau.parent / "test-mini-audios" / "a1b2c3d4-0001.wav"),
        "instruction": f"{question}\n{MMAU_ANSWER_LINE}",
        "question": question,
        "answer_kind": "label",
        "reference": "Electronic device",
        "labels": ["Alarm", "Electronic device", "Musical instrument", "Bird"],
        "source": "mmau:mmau-mini.json",
        "meta": {"category": "Reasoning", "sub-category": "Acoustic Source Inference",
                 "difficulty": "medium", "dataset": "AudioSet"},
    }
    assert set(sound.extra) == {"meta"} and sound.extra["meta"]["dataset"] == "AudioSet"  # kept as given
    assert Path(sound.audio).is_absolute() and Path(sound.audio).is_file()
    # a repeated choice is listed once
    assert music.task == "mmau/music" and music.labels == ["one", "six", "four"]
    assert music.instruction.endswith("Choices: (A) one (B) six (C) four\n" + MMAU_ANSWER_LINE)
    assert music.reference == "one"


def test_mmau_errors_name_file_and_entry(mmau):
    _, errors = read_mmau(mmau)
    by_id = {e["id"]: e for e in errors}
    assert set(by_id) == {"mmau/a1b2c3d4-0003", "mmau/a1b2c3d4-0004", "mmau/a1b2c3d4-0005"}
    for index, e in enumerate(errors, start=2):
        assert e["error"].startswith(f"{mmau}: entry {index} ")
    assert "'Surprised' is not one of the choices" in by_id["mmau/a1b2c3d4-0003"]["error"]
    assert by_id["mmau/a1b2c3d4-0003"]["kind"] == "malformed"
    assert "missing field(s) choices" in by_id["mmau/a1b2c3d4-0004"]["error"]
    assert by_id["mmau/a1b2c3d4-0005"]["kind"] == "audio"
    assert "no such file" in by_id["mmau/a1b2c3d4-0005"]["error"]


def test_mmau_relative_to_out_dir_and_duplicates(mmau):
    data = json.loads(mmau.read_text())
    data.append(dict(data[0]))  # duplicate id
    data.append("not an object")
    mmau.write_text(json.dumps(data))
    (mmau.parent / "test-mini-audios" / "a1b2c3d4-0005.wav").write_bytes(b"not audio")
    items, errors = read_mmau(mmau, out_dir=mmau.parent)
    assert items[0].audio == "test-mini-audios/a1b2c3d4-0001.wav"
    assert all((mmau.parent / i.audio).is_file() for i in items)
    by_id = {e["id"]: e for e in errors}
    assert by_id["mmau-mini.json[5]"]["kind"] == "duplicate"
    assert "expected an object, got str" in by_id["mmau-mini.json[6]"]["error"]
    assert "cannot read audio header" in by_id["mmau/a1b2c3d4-0005"]["error"]


@pytest.mark.parametrize("content, match", [
    ("{not json", "not valid JSON"),
    ('{"id": "x"}', "expected a JSON list"),
])
def test_mmau_unreadable_file(tmp_path, content, match):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=match) as exc:
        read_mmau(path)
    assert str(path) in str(exc.value)
    with pytest.raises(ValueError, match="cannot read"):
        read_mmau(tmp_path / "missing.json")
