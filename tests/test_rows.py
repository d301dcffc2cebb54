"""Millions of rows: the JSONL row index (offsets + columns beside the file, rebuilt when it
changes), training data read through it (durations from the records, no audio header read),
token limits applied as batches are drawn, the numpy batch order, and the streaming in-order merge
of shard files. Sizes here are small; scripts/bench_rows.py runs the same code at 5M rows."""

import json
import os

import numpy as np
import pytest

from conftest import SAMPLE, TINY_CONFIG
from speechllm.config import load_config
from speechllm.io.jsonl import JsonlError
from speechllm.io.rows import RowIndex, index_folder, merge_in_order
from speechllm.training import data as td
from speechllm.training.data import (DROPPED, MEGABATCH, batch_at, batch_count, bound_records, epoch_batches,
                                     held_out, held_out_rows, load_targets)

COLUMNS = {"n": "int32", "name": "category"}


def extract(obj, where):
    if "n" not in obj:
        raise JsonlError(f"{where}: no n")
    return {"n": obj["n"], "name": obj.get("name", "")}


def write(path, records, tail="\n"):
    path.write_text("\n".join(json.dumps(r) if isinstance(r, dict) else r for r in records) + tail)
    return path


def test_row_index_reads_rows_by_offset_and_is_reused_until_the_file_changes(tmp_path, monkeypatch):
    from speechllm.io import rows

    path = write(tmp_path / "a.jsonl", [{"n": 1, "name": "x"}, "", "   ", {"n": 2, "name": "é"}, {"n": 3, "name": "x"}],
                 tail="")  # blank lines are not rows; the last line has no newline
    index = RowIndex.open(path, "test/1", extract, COLUMNS)
    assert len(index) == 3 and index.saved and (index_folder(path) / "header.json").is_file()
    assert list(index.column("n")) == [1, 2, 3] and list(index.lines) == [1, 4, 5]
    assert index.read(1) == (4, {"n": 2, "name": "é"}) and index.read(2) == (5, {"n": 3, "name": "x"})
    assert index.categories("name") == ["x", "é"] and index.categories("name", index.column("name")[[2]]) == ["x"]
    assert index.digest == td.file_digest(path)

    def no_build(*args):
        raise AssertionError("a fresh saved index was rebuilt")
    monkeypatch.setattr(rows, "_build", no_build)
    again = RowIndex.open(path, "test/1", extract, COLUMNS)
    assert isinstance(again.column("n"), np.memmap) and list(again.column("n")) == [1, 2, 3]
    monkeypatch.undo()
    with open(path, "a") as f:  # appended: another size, rebuilt
        f.write("\n" + json.dumps({"n": 4}) + "\n")
    assert list(RowIndex.open(path, "test/1", extract, COLUMNS).column("n")) == [1, 2, 3, 4]
    st = path.stat()  # same size and time, other bytes: the probe sees it
    path.write_bytes(path.read_bytes().replace(b'"n": 1', b'"n": 7'))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert list(RowIndex.open(path, "test/1", extract, COLUMNS).column("n"))[0] == 7
    assert list(RowIndex.open(path, "test/2", lambda o, w: {"n": 0, "name": ""}, COLUMNS).column("n")) == [0] * 4


def test_row_index_errors_name_the_file_and_line(tmp_path):
    bad = write(tmp_path / "bad.jsonl", [{"n": 1}, "{not json", {"n": 2}])
    with pytest.raises(JsonlError, match=rf"{bad}:2: not valid JSON"):
        RowIndex.open(bad, "test/1", extract, COLUMNS)
    with pytest.raises(JsonlError, match=rf"{tmp_path / 'x.jsonl'}:2: no n"):
        RowIndex.open(write(tmp_path / "x.jsonl", [{"n": 1}, {"m": 2}]), "test/1", extract, COLUMNS)
    (tmp_path / "bytes.jsonl").write_bytes(b'{"n": 1}\n\xff\xfe\n')
    with pytest.raises(JsonlError, match="bytes.jsonl:2: not UTF-8"):
        RowIndex.open(tmp_path / "bytes.jsonl", "test/1", extract, COLUMNS)
    with pytest.raises(JsonlError, match="no-such.jsonl: cannot be read"):
        RowIndex.open(tmp_path / "no-such.jsonl", "test/1", extract, COLUMNS)


def target(i, audio, **kw):
    return {"id": f"r{i}", "audio": audio, "instruction": "What can you hear?", "target": f"answer number {i}",
            "description": "[00:00-00:02] (Gender: Male)", **kw}


def test_training_rows_take_durations_from_the_records_not_the_audio(tmp_path):
    # the clips do not exist: with a duration per record, no audio file is opened to load the data
    recs = [target(i, f"gone/{i % 3}.wav", duration=1.0 + i / 10) for i in range(20)]
    recs[3]["truncated"] = True
    recs[4]["target"] = "  "
    path = write(tmp_path / "t.jsonl", recs)
    rows, report = load_targets(path, skip_truncated=True)
    assert (report.truncated, report.empty_target, report.kept) == (1, 1, 18)
    got = list(rows)
    assert [r.id for r in got] == [f"r{i}" for i in range(20) if i not in (3, 4)]
    assert [r.seconds for r in got] == pytest.approx([1.0 + i / 10 for i in range(20) if i not in (3, 4)])
    assert got[0].audio == (tmp_path / "gone" / "0.wav").absolute()
    assert sorted(p.name for p in rows.audio_paths()) == ["0.wav", "1.wav", "2.wav"]
    held = held_out_rows(rows, 0.3)
    assert [r.id for r, h in zip(got, held) if h] == [r.id for r in got if held_out(r.id, 0.3)]
    # an older file without durations reads the header, and names the line whose audio is missing
    write(tmp_path / "old.jsonl", [target(0, str(SAMPLE)), target(1, "gone.wav")])
    with pytest.raises(JsonlError, match=r"old.jsonl:2: audio gone.wav cannot be used .*no such file"):
        load_targets(tmp_path / "old.jsonl")
    with pytest.raises(JsonlError, match=r"t2.jsonl:1: 'duration' must be a positive number"):
        load_targets(write(tmp_path / "t2.jsonl", [target(0, "a.wav", duration=0)]))


def test_token_limits_applied_as_batches_are_drawn_match_those_applied_up_front(tmp_path, tiny_model):
    from speechllm.training.trainer import Stream

    cfg = load_config(TINY_CONFIG, ["train.max_target_tokens=12"]).train
    recs = [target(i, str(SAMPLE), duration=2.0 + (i % 5) / 10) for i in range(40)]
    recs[5]["target"] = " ".join(["word"] * 200)  # cut
    recs[9]["instruction"] = " ".join(["can"] * 480)  # over the context
    recs[11]["duration"] = 45.0  # longer than the encoder takes
    path = write(tmp_path / "t.jsonl", recs)
    results = {}
    for upfront in (True, False):
        rows, report = load_targets(path)
        kept = bound_records(rows, tiny_model, cfg, report, upfront=upfront)
        stream = Stream.for_model(kept, tiny_model, 4, seed=3)
        drawn = [stream[k] for k in range(stream.per_epoch)]
        assert all(0 < len(b) <= 4 for b in drawn)
        results[upfront] = (sorted(r.id for b in drawn for r in b), report)
        cut = next(r for b in drawn for r in b if r.id == "r5")
        assert cut.truncated and len(tiny_model.prompt.text(cut.target)) <= 12
        again = Stream.for_model(kept, tiny_model, 4, seed=3)
        assert [r.id for r in again[2]] == [r.id for r in drawn[2]]  # a pure function of k
    (ids_up, rep_up), (ids_lazy, rep_lazy) = results[True], results[False]
    assert ids_up == ids_lazy == sorted(f"r{i}" for i in range(40) if i not in (9, 11))
    assert (rep_up.cut, rep_up.over_context, rep_up.audio_length) == (1, 1, 1)
    assert (rep_lazy.cut, rep_lazy.over_context, rep_lazy.audio_length) == (1, 1, 1)


def test_a_batch_left_empty_by_the_limits_is_replaced_by_the_next(tmp_path, tiny_model):
    from speechllm.training.trainer import Stream

    cfg = load_config(TINY_CONFIG).train
    # the four shortest clips are over the context: length sorting puts them in one batch
    recs = [target(i, str(SAMPLE), duration=1.0 if i < 4 else 2.0,
                   instruction=" ".join(["can"] * 480) if i < 4 else "Hi?") for i in range(8)]
    rows, report = load_targets(write(tmp_path / "t.jsonl", recs))
    kept = bound_records(rows, tiny_model, cfg, report, upfront=False)
    stream = Stream.for_model(kept, tiny_model, 4, seed=0)
    assert sorted(set(stream.positions(0)) | set(stream.positions(1))) == list(range(8))
    empty = next(k for k in range(2) if set(stream.positions(k)) == {0, 1, 2, 3})
    batches = [[r.id for r in stream[k]] for k in range(4)]
    assert all(batches) and set(sum(batches, [])) == {f"r{i}" for i in range(4, 8)}
    assert batches[empty] == batches[1 - empty]  # the epoch's other batch
    assert report.over_context == 4 and (kept.bounds.status[:4] == DROPPED).all()


def test_training_batches_group_examples_of_similar_llm_length_not_clip_length(tmp_path, tiny_model):
    from speechllm.training.trainer import Stream

    # the Q-Former gives every clip the same positions, so the text decides the length: the odd
    # records' long targets go together whatever their clips' seconds
    recs = [target(i, str(SAMPLE), duration=1.0 + i / 10, target=" ".join(["word"] * (40 if i % 2 else 2)))
            for i in range(16)]
    rows, report = load_targets(write(tmp_path / "t.jsonl", recs))
    stream = Stream.for_model(bound_records(rows, tiny_model, load_config(TINY_CONFIG).train, report), tiny_model,
                              4, seed=0)
    for k in range(stream.per_epoch):
        assert len({int(r.id[1:]) % 2 for r in stream[k]}) == 1
    seconds = np.array([0.5, 3.0, 29.0])
    assert stream.lengths.min() > 0
    assert tiny_model.clip_positions(seconds).tolist() == [tiny_model.audio_positions(s) for s in seconds]


def test_epoch_batches_cover_every_record_once_in_length_sorted_windows():
    rng = np.random.default_rng(0)
    seconds = rng.uniform(0.5, 30, size=1000).astype(np.float32)
    bs = 8
    order, starts = epoch_batches(seconds, bs, seed=1, epoch=0)
    batches = [batch_at(order, starts, b, bs) for b in range(len(starts))]
    assert len(batches) == batch_count(1000, bs)
    assert sorted(np.concatenate(batches).tolist()) == list(range(1000))
    assert all(1 <= len(b) <= bs for b in batches)
    window = bs * MEGABATCH
    for start in range(0, 1000, window):  # inside a window, batches follow clip length
        w = order[start: start + window]
        assert (np.diff(seconds[w]) >= 0).all()
    again, starts_again = epoch_batches(seconds, bs, seed=1, epoch=0)
    assert (again == order).all() and (starts_again == starts).all()
    other, _ = epoch_batches(seconds, bs, seed=1, epoch=1)
    assert not (other == order).all()


def test_merge_in_order_streams_shards_into_input_order(tmp_path):
    order = [f"id{i}" for i in range(10)]
    line = lambda i, tag="": json.dumps({"id": f"id{i}", "x": tag or i}, ensure_ascii=False) + "\n"  # noqa: E731
    final = tmp_path / "out.jsonl"
    final.write_text(line(0, "earlier") + line(4, "earlier"))  # an earlier merge
    parts = [tmp_path / "p0.jsonl", tmp_path / "p1.jsonl", tmp_path / "p2.jsonl"]
    parts[0].write_text(line(6) + line(3) + line(0, "dup") + '{"id": "id9", "x"')  # unsorted, a dup, a torn tail
    parts[1].write_text(line(1) + json.dumps({"id": "stray"}) + "\n" + line(7, "ü"))
    parts[2].write_text(line(2) + "not json\n" + line(5) + line(8) + json.dumps({"id": "stray"}) + "\n")
    assert merge_in_order(final, parts, order) == 10
    got = [json.loads(x) for x in final.read_text().splitlines()]
    assert [r["id"] for r in got] == [f"id{i}" for i in range(9)] + ["stray"]
    assert got[0]["x"] == "earlier" and got[4]["x"] == "earlier" and got[7]["x"] == "ü"
    assert not any(p.exists() for p in parts)
    assert line(7, "ü").encode() in final.read_bytes()  # bytes copied as written


def test_targets_carry_the_metadata_duration_into_training(tmp_path):
    from speechllm.cli import main

    meta = [{"id": f"c{i}", "audio": f"audio/c{i}.wav", "duration": 1.25 + i,
             "description": '[00:00-00:02] "hi" (Gender: Male)', "labels": {"gender": "male"}} for i in range(3)]
    write(tmp_path / "m.jsonl", meta)
    out = tmp_path / "t.jsonl"
    assert main(["targets", str(tmp_path / "m.jsonl"), "--out", str(out), "--strategy", "label",
                 "--config", str(TINY_CONFIG), "--quiet"]) == 0
    assert [json.loads(x)["duration"] for x in out.read_text().splitlines()] == [1.25, 2.25, 3.25]
    rows, _ = load_targets(out)  # the clips were never written: no header is read
    assert [r.seconds for r in rows] == [1.25, 2.25, 3.25]


def test_a_large_file_trains_with_limits_and_features_as_batches_need_them(tmp_path, monkeypatch, capsys):
    from speechllm.training import trainer as tr

    monkeypatch.setattr(tr, "UPFRONT_ROWS", 4)  # this file counts as large
    recs = [target(i, str(SAMPLE), duration=2.0) for i in range(8)]
    recs[2]["instruction"] = " ".join(["can"] * 480)  # over the context: left out when drawn
    path = write(tmp_path / "t.jsonl", recs)
    cfg = load_config(TINY_CONFIG, [f"train.data={path}", f"train.out_dir={tmp_path / 'run'}", "train.batch_size=4",
                                    "train.max_steps=3", "train.eval_fraction=0", f"train.cache_dir={tmp_path / 'cache'}"])
    trainer = tr.Trainer(cfg)
    assert not trainer.upfront and trainer.report.over_context == 0 and len(trainer.train_records) == 8
    assert not any((tmp_path / "cache").rglob("*.safetensors"))  # nothing computed before a batch needs it
    assert (trainer.train() / "adapter.safetensors").is_file()
    assert trainer.report.over_context == 1 and any((tmp_path / "cache").rglob("*.safetensors"))
    out = capsys.readouterr().out
    assert "token limits are applied as batches are drawn" in out and "records met so far: 1 records longer" in out


def test_annotation_shards_merge_in_input_order(tmp_path):
    import soundfile as sf

    from annotate.pipeline import manifest_items, run
    from speechllm.config import AnnotateConfig
    from speechllm.io.audio import SAMPLE_RATE, load_audio

    wav = load_audio(SAMPLE)
    lines = []
    for i in range(7):
        sf.write(tmp_path / f"c{i}.wav", wav[: int((0.5 + i / 4) * SAMPLE_RATE)], SAMPLE_RATE)
        lines.append(json.dumps({"id": f"c{i}", "audio": f"c{i}.wav"}))
    lines.insert(3, json.dumps({"id": "gone", "audio": "gone.wav"}))  # an error record, merged in order too
    lines.insert(5, "{not json")
    (tmp_path / "m.jsonl").write_text("\n".join(lines) + "\n")
    opts = AnnotateConfig(annotators=["duration"], workers=1, batch_size=2)
    one = tmp_path / "one.jsonl"
    run(manifest_items(tmp_path / "m.jsonl", tmp_path), one, opts, progress=False)
    three = tmp_path / "three.jsonl"
    for rank in (2, 1, 0):  # the main process (0) merges once the others are done
        summary = run(manifest_items(tmp_path / "m.jsonl", tmp_path), three, opts, progress=False, rank=rank, world=3)
        assert summary.total == 3  # positions rank, rank + 3, rank + 6 of the 9 lines
    read = lambda p: [json.loads(x) for x in p.read_text().splitlines()]  # noqa: E731
    assert [r["id"] for r in read(three)] == [f"c{i}" for i in range(7)]
    assert sorted(read(three), key=lambda r: r["id"]) == sorted(read(one), key=lambda r: r["id"])
    assert [e["id"] for e in read(tmp_path / "three.errors.jsonl")] == ["gone", "m.jsonl:line6"]
    assert not list(tmp_path.glob("three.part*"))
    again = run(manifest_items(tmp_path / "m.jsonl", tmp_path), three, opts, progress=False, rank=0, world=3)
    assert again.annotated == 0 and len(read(three)) == 7  # a rerun skips what is merged


def test_row_index_built_by_several_processes_equals_one(tmp_path, monkeypatch):
    from speechllm.io import rows

    recs = [{"n": i, "name": f"clip{i % 7}"} for i in range(3000)]
    path = write(tmp_path / "many.jsonl", recs[:1500] + ["", "  "] + recs[1500:])
    one = RowIndex.open(path, "test/1", extract, COLUMNS)
    assert one.header["build_workers"] == 1
    monkeypatch.setattr(rows, "PARALLEL_BYTES", 4096)
    monkeypatch.setattr(rows, "build_workers", lambda size: 4)
    index_folder(path).joinpath("header.json").unlink()
    four = RowIndex.open(path, "test/1", extract, COLUMNS)
    assert four.header["build_workers"] == 4 and four.digest == one.digest
    for name in ("_offsets", "_lines", "n"):
        assert (np.asarray(four.column(name)) == np.asarray(one.column(name))).all()
    assert [four.category("name", c) for c in four.column("name")[:8]] == [f"clip{i % 7}" for i in range(8)]
    assert four.read(2999) == (3002, {"n": 2999, "name": "clip3"})
    lines = path.read_text().splitlines()
    lines[2500] = "{broken"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(JsonlError, match=rf"{path}:2501: not valid JSON"):  # its line in the file, not in a range
        RowIndex.open(path, "test/1", extract, COLUMNS)
