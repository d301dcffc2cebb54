"""The hostile tier: what a careless or hostile user hands each command (files that are folders,
truncated or forged checkpoints, impossible settings, oversized questions, outputs over inputs,
models that do not exist) ends in exit status 2 and one message naming the file or key, never a
traceback. Then a seeded fuzz pass over the readers every stage shares: JSONL lines (truncated,
mistyped, huge, unicode, null, nested), each stage record, and audio files with valid headers and
random bodies: a clear error (a `SpeechLLMError`) or a good value, never another exception."""

from __future__ import annotations

import io
import json
import random
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile as sf

from conftest import SAMPLE, TINY_CONFIG

from speechllm.cli import main
from speechllm.errors import SpeechLLMError

FUZZ_SEED = 17
"""Seeds every fuzz pass: a failure is the same on every run."""
FUZZ_LINES = 300
"""Mutated JSONL lines per record type."""
FUZZ_CLIPS = 200
"""Mutated audio files."""
HUGE_CHARS = 200_000
"""Length of the huge strings the fuzzer puts into fields."""


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No test here touches the network: a model that is not local is reported at once."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def f(tmp_path_factory):
    """Every hostile input, built once: files, folders and checkpoints (tiny models)."""
    import torch

    from speechllm.config import load_config
    from speechllm.model import build_model
    from speechllm.io.audio import load_audio

    d = tmp_path_factory.mktemp("hostile")
    ns = SimpleNamespace(dir=d, a_file=d / "a_file.txt", folder=d / "a_folder", clip=d / "clip.wav",
                         empty=d / "empty.wav", noise=d / "noise.wav", cut=d / "cut.wav")
    ns.a_file.write_text("a file, not a folder\n")
    ns.folder.mkdir()
    sf.write(ns.clip, load_audio(SAMPLE)[:16000], 16000)
    ns.empty.write_bytes(b"")
    ns.noise.write_bytes(random.Random(FUZZ_SEED).randbytes(4096))
    ns.cut.write_bytes(ns.clip.read_bytes()[:30])
    ns.manifest = jsonl(d / "manifest.jsonl", [{"id": "c", "audio": "clip.wav"}])
    ns.metadata = jsonl(d / "meta.jsonl", [{"id": "c", "audio": "clip.wav", "description": '"hi" (Gender: Male)',
                                            "labels": {"gender": "male"}}])
    good = {"id": "c", "audio": "clip.wav", "instruction": "What can you hear?", "target": "A man."}
    ns.targets = jsonl(d / "targets.jsonl", [good])
    ns.bad_json = jsonl(d / "bad_json.targets.jsonl", [good, '{"id": "d", "audio": '])
    ns.not_utf8 = d / "not_utf8.targets.jsonl"
    ns.not_utf8.write_bytes(json.dumps(good).encode() + b"\n\xff\xfe\xfd\n")
    ns.folder_audio = jsonl(d / "folder_audio.targets.jsonl", [{**good, "audio": "a_folder"}])
    ns.typed = jsonl(d / "typed.targets.jsonl", [{**good, "target": 5}])
    torch.manual_seed(0)
    model = build_model(load_config(TINY_CONFIG))
    ns.ckpt = model.save_pretrained(d / "ckpt")
    ns.ckpt_cut = Path(shutil.copytree(ns.ckpt, d / "ckpt-cut"))
    weights = (ns.ckpt_cut / "adapter.safetensors").read_bytes()
    (ns.ckpt_cut / "adapter.safetensors").write_bytes(weights[: len(weights) // 2])
    ns.ckpt_renamed = Path(shutil.copytree(ns.ckpt, d / "ckpt-renamed"))
    meta = json.loads((ns.ckpt_renamed / "config.json").read_text())
    meta["model"]["llm"]["name"] = "smollm2-135m-instruct"
    (ns.ckpt_renamed / "config.json").write_text(json.dumps(meta))
    return ns


def train_args(data, out, *more):
    return ["train", "--quiet", "--config", str(TINY_CONFIG), f"train.data={data}", f"train.out_dir={out}",
            "train.max_steps=1", "train.feature_cache=false", *more]


def chat_args(*more, audio=None):
    return ["chat", "--untrained", "--config", str(TINY_CONFIG), "--no-transcript", "--audio", str(audio or SAMPLE),
            *more]


CASES = {
    "models: unknown name": (lambda f: ["models", "prepare", "no-such-model"], r"unknown model\(s\) no-such-model"),
    "synth: --out is a file": (lambda f: ["synth", "--out", f.a_file, "--n", "2"], r"--out: .*a_file.txt is a file"),
    "synth: --n 0": (lambda f: ["synth", "--out", f.dir / "synth", "--n", "0"], r"--n must be at least 1"),
    "synth: --workers 0": (lambda f: ["synth", "--out", f.dir / "synth", "--n", "2", "--workers", "0"],
                           r"--workers must be at least 1"),
    "annotate: no such input": (lambda f: ["annotate", f.dir / "nope.jsonl", "--out", f.dir / "m.jsonl"],
                                r"nope.jsonl: no such manifest or folder"),
    "annotate: --out is the input": (lambda f: ["annotate", f.manifest, "--out", f.manifest],
                                     r"--out .*manifest.jsonl is the input file"),
    "annotate: --out is a folder": (lambda f: ["annotate", f.manifest, "--out", f.folder],
                                    r"--out .*a_folder is a folder"),
    "annotate: --workers 0": (lambda f: ["annotate", f.manifest, "--out", f.dir / "m.jsonl", "--workers", "0"],
                              r"annotate.workers: must be at least 1, got 0"),
    "targets: no such metadata": (lambda f: ["targets", f.dir / "nope.jsonl", "--out", f.dir / "t.jsonl"],
                                  r"nope.jsonl: no such metadata file"),
    "targets: metadata is a folder": (lambda f: ["targets", f.folder, "--out", f.dir / "t.jsonl"],
                                      r"a_folder: is a folder, not metadata file"),
    "targets: --out is the input": (lambda f: ["targets", f.metadata, "--out", f.metadata],
                                    r"--out .*meta.jsonl is the input file"),
    "targets: max_target_tokens=0": (lambda f: ["targets", f.metadata, "--out", f.dir / "t.jsonl",
                                                "train.max_target_tokens=0"],
                                     r"train.max_target_tokens: must be at least 1, got 0"),
    "targets: unknown LLM": (lambda f: ["targets", f.metadata, "--out", f.dir / "t.jsonl", "--config",
                                        str(TINY_CONFIG), "model.llm.name=no-such-llm"],
                             r"'no-such-llm' is not an embedded model .*not in the local cache"),
    "replay: --out is a folder": (lambda f: ["replay", "--out", f.folder, "--n", "1"], r"--out .*a_folder is a folder"),
    "replay: --out is the input": (lambda f: ["replay", "--out", f.metadata, "--instructions", f.metadata],
                                   r"--out .*meta.jsonl is the input file"),
    "replay: --n -1": (lambda f: ["replay", "--out", f.dir / "r.jsonl", "--n", "-1"], r"--n -1: .*cannot be negative"),
    "replay: --batch-size 0": (lambda f: ["replay", "--out", f.dir / "r.jsonl", "--n", "1", "--batch-size", "0"],
                               r"replay.batch_size: must be at least 1, got 0"),
    "replay: instructions not UTF-8": (lambda f: ["replay", "--out", f.dir / "r.jsonl", "--config", str(TINY_CONFIG),
                                                  "--instructions", f.not_utf8], r"not_utf8.targets.jsonl:2: not UTF-8"),
    "train: replay without LoRA": (lambda f: train_args(f.targets, f.dir / "run", f"train.replay.data={f.targets}",
                                                        "train.replay.ratio=0.1"),
                                   r"train.lora.enabled=false: replay examples are text only"),
    "train: malformed replay line": (lambda f: train_args(f.targets, f.dir / "run", f"train.replay.data={f.bad_json}",
                                                          "train.replay.ratio=0.1", "train.lora.enabled=true"),
                                     r"bad_json.targets.jsonl:1: missing field\(s\) answer"),
    "train: no such data": (lambda f: train_args(f.dir / "nope.jsonl", f.dir / "run"), r"nope.jsonl: no such targets"),
    "train: data is a folder": (lambda f: train_args(f.folder, f.dir / "run"), r"a_folder: is a folder"),
    "train: grad_accum=0": (lambda f: train_args(f.targets, f.dir / "run", "train.grad_accum=0"),
                            r"train.grad_accum: must be at least 1, got 0"),
    "train: max_steps=0": (lambda f: train_args(f.targets, f.dir / "run", "train.max_steps=0"),
                           r"train.max_steps: must be at least 1, got 0"),
    "train: max_steps=-5": (lambda f: train_args(f.targets, f.dir / "run", "train.max_steps=-5"),
                            r"train.max_steps: must be at least 1, got -5"),
    "train: batch_size=0": (lambda f: train_args(f.targets, f.dir / "run", "train.batch_size=0"),
                            r"train.batch_size: must be at least 1, got 0"),
    "train: lr=nan": (lambda f: train_args(f.targets, f.dir / "run", "train.lr=nan"),
                      r"train.lr: must be a finite number, got nan"),
    "train: out_dir is a file": (lambda f: train_args(f.targets, f.a_file), r"train.out_dir: .*a_file.txt is a file"),
    "train: malformed line": (lambda f: train_args(f.bad_json, f.dir / "run"),
                              r"bad_json.targets.jsonl:2: not valid JSON"),
    "train: not UTF-8": (lambda f: train_args(f.not_utf8, f.dir / "run"), r"not_utf8.targets.jsonl:2: not UTF-8"),
    "train: audio is a folder": (lambda f: train_args(f.folder_audio, f.dir / "run"),
                                 r"folder_audio.targets.jsonl:1: .*a_folder: is a folder, not an audio file"),
    "train: wrong type": (lambda f: train_args(f.typed, f.dir / "run"), r"typed.targets.jsonl:1: 'target' must be str"),
    "eval: --out is a file": (lambda f: ["eval", "--checkpoint", f.ckpt, "--data", f.metadata, "--out", f.a_file],
                              r"--out: .*a_file.txt is a file"),
    "eval: truncated adapter": (lambda f: ["eval", "--checkpoint", f.ckpt_cut, "--data", f.metadata, "--out",
                                           f.dir / "ev"], r"ckpt-cut/adapter.safetensors: cannot be read"),
    "eval: not a checkpoint": (lambda f: ["eval", "--checkpoint", f.folder, "--data", f.metadata, "--out",
                                          f.dir / "ev"], r"a_folder: not a speechllm checkpoint"),
    "eval: --batch-size 0": (lambda f: ["eval", "--checkpoint", f.ckpt, "--data", f.metadata, "--out", f.dir / "ev",
                                        "--batch-size", "0"], r"eval.batch_size: must be at least 1"),
    "eval: --safety-file is a folder": (lambda f: ["eval", "--checkpoint", f.ckpt, "--data", f.metadata, "--out",
                                                   f.dir / "ev", "--safety-file", f.folder],
                                        r"a_folder: cannot read the safety requests"),
    "ifeval: no such responses": (lambda f: ["ifeval", "--responses", f.dir / "nope.jsonl", "--out", f.dir / "if"],
                                  r"--responses .*nope.jsonl: no such file"),
    "ifeval: --out is a file": (lambda f: ["ifeval", "--responses", f.a_file, "--out", f.a_file],
                                r"--out: .*a_file.txt is a file"),
    "ifeval: input data not UTF-8": (lambda f: ["ifeval", "--responses", f.a_file, "--input-data", f.not_utf8,
                                                "--out", f.dir / "if"], r"not_utf8.targets.jsonl:\d"),
    "speech-ifeval: no such data": (lambda f: ["speech-ifeval", "--data", f.dir / "nope", "--out", f.dir / "s",
                                               "--responses", f.folder], r"--data .*nope: no such folder"),
    "speech-ifeval: no item files": (lambda f: ["speech-ifeval", "--data", f.folder, "--out", f.dir / "s",
                                                "--responses", f.folder], r"a_folder: no Speech-IFEval item files"),
    "speech-ifeval: --per-subset 0": (lambda f: ["speech-ifeval", "--data", f.folder, "--out", f.dir / "s",
                                                 "--checkpoint", f.ckpt, "--per-subset", "0"],
                                      r"--per-subset must be at least 1"),
    "speech-ifeval: not a checkpoint": (lambda f: ["speech-ifeval", "--data", f.folder, "--out", f.dir / "s",
                                                   "--checkpoint", f.folder], r"a_folder: not a speechllm checkpoint"),
    "chat: 50,000-character question": (lambda f: chat_args("can " * 12_499 + "can?"),
                                        r"50000 characters; at most 2000"),
    "chat: empty question": (lambda f: chat_args("   "), r"the question is empty"),
    "chat: question past the context": (lambda f: chat_args(" ".join(["can"] * 480)),
                                        r"positions \+ 8 answer tokens .* exceed the LLM's context of 1024"),
    "chat: audio is a folder": (lambda f: chat_args("Hi?", audio=f.folder), r"a_folder: is a folder, not an audio"),
    "chat: empty audio": (lambda f: chat_args("Hi?", audio=f.empty), r"empty.wav: empty file"),
    "chat: noise as audio": (lambda f: chat_args("Hi?", audio=f.noise), r"noise.wav: cannot decode audio"),
    "chat: truncated wav": (lambda f: chat_args("Hi?", audio=f.cut), r"cut.wav: cannot decode audio"),
    "chat: max_new_tokens=0": (lambda f: chat_args("Hi?", "generation.max_new_tokens=0"),
                               r"generation.max_new_tokens: must be at least 1"),
    "chat: unknown LLM": (lambda f: chat_args("Hi?", "model.llm.name=tiny-random-lama"),
                          r"did you mean 'tiny-random-llama'.*HF_HUB_OFFLINE"),
    "chat: truncated adapter": (lambda f: ["chat", "--checkpoint", f.ckpt_cut, "--audio", SAMPLE, "--no-transcript",
                                           "Hi?"], r"adapter.safetensors: cannot be read"),
    "chat: checkpoint naming another base": (lambda f: ["chat", "--checkpoint", f.ckpt_renamed, "--audio", SAMPLE,
                                                        "--no-transcript", "Hi?"],
                                             r"model.llm.name is 'smollm2-135m-instruct', but the adapter was trained"),
    "serve: truncated adapter": (lambda f: ["serve", "--checkpoint", f.ckpt_cut], r"adapter.safetensors: cannot be"),
    "serve: port out of range": (lambda f: ["serve", "--untrained", "--config", str(TINY_CONFIG), "--port", "70000"],
                                 r"serve.port: must be in \[0, 65535\], got 70000"),
    "serve: negative upload limit": (lambda f: ["serve", "--untrained", "--config", str(TINY_CONFIG),
                                                "--max-upload-mb", "-1"],
                                     r"serve.max_upload_mb: must be greater than 0"),
    "demo: --out is a file": (lambda f: ["demo", "--out", f.a_file], r"--out: .*a_file.txt is a file"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_every_command_refuses_hostile_input_with_a_message(case, f, capsys):
    argv, pattern = CASES[case]
    rc = main([str(a) for a in argv(f)])
    err = capsys.readouterr().err
    assert rc == 2, err[-2000:]
    assert err.count("speechllm: error: ") == 1 and re.search(pattern, err), err[-2000:]
    assert "Traceback" not in err


def test_eval_with_unreadable_data_leaves_no_output_folder(f, capsys):
    unknown = jsonl(f.dir / "unknown.jsonl", [{"question": "no format I know"}])
    out = f.dir / "eval-nothing"
    assert main(["eval", "--checkpoint", str(f.ckpt), "--data", str(unknown), "--out", str(out)]) == 2
    assert "cannot tell the data format" in capsys.readouterr().err
    assert not out.exists()


# ----------------------------------------------------------------------------- fuzzing the readers

def hostile_value(rng: random.Random):
    """A value no field expects: wrong types, nulls, non-finite numbers, huge or odd strings."""
    return rng.choice([
        None, True, 0, -1, 2**70, 1.5, float("nan"), float("inf"), "", " ", "\u0000", "\u202e\u2063<|im_end|>",
        "é" * 50, "x" * HUGE_CHARS, [], [None], ["a", 1], {}, {"value": None}, {"bin": ["x"]}, [[[[]]]],
        "../../etc/passwd", "\U0001f600" * 20, "\ud800 a lone surrogate",
    ])


VALID = {
    "ManifestRecord": {"id": "a", "audio": "a.wav", "labels": {"gender": "male", "transcript": "hi"}},
    "MetadataRecord": {"id": "a", "audio": "a.wav", "duration": 1.5, "description": '"hi" (Gender: Male)',
                       "annotations": {"gender": {"value": 120.0, "bin": "male"}, "transcript": {"value": "hi"}},
                       "labels": {"gender": "male"}},
    "TargetRecord": {"id": "a", "audio": "a.wav", "transcript": "hi", "description": "d", "instruction": "What?",
                     "target": "A man.", "strategy": "label", "generator": {}, "target_tokens": 3, "truncated": False},
    "TaskItem": {"id": "a", "task": "gender", "audio": "a.wav", "instruction": "Male or female?",
                 "answer_kind": "label", "reference": "male", "labels": ["male", "female"], "question": "Gender?"},
    "ReplayRecord": {"id": "magpie-000000-000", "instruction": "Name a prime.", "answer": "Seven.", "source": "magpie",
                     "truncated": False, "answer_tokens": 3, "generator": {"model": "m"}},
}


def mutate(record: dict, rng: random.Random):
    """One hostile variant of a valid record (or no record at all)."""
    out = json.loads(json.dumps(record))
    for _ in range(rng.randint(1, 3)):
        key = rng.choice(list(out) + ["extra", "labels"])
        action = rng.random()
        if action < 0.2:
            out.pop(key, None)
        else:
            out[key] = hostile_value(rng)
    return out if rng.random() > 0.05 else hostile_value(rng)


def use(record) -> None:
    """What the stages do with a record once read (every property and its JSON form)."""
    json.dumps(record.to_json())
    if hasattr(record, "attributes"):
        record.attributes()
        _ = record.transcript, record.asr_transcript


@pytest.mark.parametrize("kind", list(VALID))
def test_fuzzed_records_are_read_or_refused_clearly(kind):
    import speechllm.records as records

    cls = getattr(records, kind)
    rng = random.Random(f"{FUZZ_SEED}:{kind}")
    outcomes = {"read": 0, "refused": 0}
    for i in range(FUZZ_LINES):
        obj = mutate(VALID[kind], rng)
        try:
            use(cls.from_json(obj, f"fuzz:{i}"))
            outcomes["read"] += 1
        except SpeechLLMError as err:
            assert f"fuzz:{i}" in str(err)
            outcomes["refused"] += 1
    assert outcomes["read"] and outcomes["refused"]  # the pass reached both sides


def fuzzed_jsonl(rng: random.Random, lines: list[str]) -> bytes:
    """JSONL bytes from `lines`, each maybe truncated, byte-flipped, made invalid UTF-8 or nested deep."""
    out = []
    for line in lines:
        raw = line.encode()
        roll = rng.random()
        if roll < 0.2:
            raw = raw[: rng.randint(0, len(raw))]
        elif roll < 0.35:
            raw = bytes(b if rng.random() > 0.05 else rng.getrandbits(8) for b in raw)
        elif roll < 0.4:
            raw = b"\xff\xfe" + raw
        elif roll < 0.45:
            raw = b"[" * 50_000 + b"]" * 50_000
        elif roll < 0.5:
            raw = b'{"id": ' + b"9" * 5000 + b"}"
        elif roll < 0.55:
            raw = b'{"id": "a", "duration": NaN, "audio": "a.wav", "description": "d"}'
        out.append(raw)
    return b"\n".join(out) + (b"\n" if rng.random() < 0.5 else b"")


def test_fuzzed_jsonl_files_are_read_line_by_line_or_refused_clearly(tmp_path):
    import speechllm.records as records
    from speechllm.io.jsonl import ResumableJsonl, iter_lines

    rng = random.Random(FUZZ_SEED)
    path = tmp_path / "fuzz.jsonl"
    for kind, valid in VALID.items():
        cls = getattr(records, kind)
        for round_ in range(10):
            lines = [json.dumps(mutate(valid, rng) if rng.random() < 0.5 else valid) for _ in range(20)]
            path.write_bytes(fuzzed_jsonl(rng, lines))
            for line in iter_lines(path):
                assert (line.record is None) == (line.error is not None)
                if line.record is not None:
                    try:
                        use(cls.from_json(line.record, f"{path}:{line.number}"))
                    except SpeechLLMError:
                        pass
            with ResumableJsonl(path) as out:  # an output left torn or garbled by a crash is appended to
                out.write({"id": f"new-{round_}"})
            assert any(line.record == {"id": f"new-{round_}"} for line in iter_lines(path))


def test_gzipped_jsonl_reads_like_the_plain_file_and_a_damaged_archive_is_named(tmp_path):
    import gzip

    from speechllm.io.jsonl import JsonlError, iter_lines

    raw = b'{"prompt": "a", "response": "b"}\n\nnot json\n{"prompt": "c", "response": "d"}\n'
    plain, packed = tmp_path / "r.jsonl", tmp_path / "r.jsonl.gz"
    plain.write_bytes(raw)
    packed.write_bytes(gzip.compress(raw))
    strip = lambda lines: [(x.number, x.record, x.error and x.error.split(":", 2)[-1]) for x in lines]  # noqa: E731
    assert strip(iter_lines(packed)) == strip(iter_lines(plain))
    assert [x.number for x in iter_lines(packed) if x.error] == [3]
    for damaged in (raw, gzip.compress(raw)[:-12]):  # not gzip at all; cut short
        packed.write_bytes(damaged)
        with pytest.raises(JsonlError, match=r"r\.jsonl\.gz: not a readable gzip file"):
            list(iter_lines(packed))


def test_fuzzed_stage_files_end_in_a_clear_error_or_records(tmp_path):
    """The readers of whole stage files (training targets, eval tasks and metadata) over fuzzed files."""
    from speechllm.eval.items import read_metadata, read_task_file
    from speechllm.training.data import load_targets

    sf.write(tmp_path / "a.wav", np.zeros(8000, dtype=np.float32), 16000)
    rng = random.Random(FUZZ_SEED + 1)
    readers = {"TargetRecord": lambda p: load_targets(p, skip_truncated=False), "TaskItem": read_task_file,
               "MetadataRecord": read_metadata}
    for kind, read in readers.items():
        for round_ in range(15):
            path = tmp_path / f"{kind}-{round_}.jsonl"
            lines = [json.dumps(mutate(VALID[kind], rng) if rng.random() < 0.3 else VALID[kind]) for _ in range(10)]
            path.write_bytes(fuzzed_jsonl(rng, lines))
            try:
                read(path)
            except SpeechLLMError as err:
                assert str(path) in str(err)


def encoded(fmt: str, subtype: str, rate: int, channels: int) -> tuple[bytes, int]:
    """A short valid file of `fmt` and the length of its header."""
    t = np.arange(rate // 2)
    wave = (0.3 * np.sin(2 * np.pi * 220 * t / rate)).astype(np.float32)
    buf = io.BytesIO()
    sf.write(buf, np.stack([wave] * channels, axis=1), rate, format=fmt, subtype=subtype)
    return buf.getvalue(), {"WAV": 44, "FLAC": 42}[fmt]


def test_fuzzed_audio_files_load_or_fail_clearly(tmp_path):
    from speechllm.io.audio import load_audio

    rng = random.Random(FUZZ_SEED)
    sources = [encoded("WAV", "PCM_16", 16000, 1), encoded("WAV", "FLOAT", 22050, 2),
               encoded("FLAC", "PCM_16", 16000, 1), encoded("FLAC", "PCM_24", 44100, 2)]
    path = tmp_path / "fuzz.audio"
    outcomes = {"loaded": 0, "refused": 0}
    for i in range(FUZZ_CLIPS):
        data, header = rng.choice(sources)
        body = bytearray(data)
        roll = rng.random()
        if roll < 0.4:  # a valid header, random bytes behind it
            body = body[:header] + rng.randbytes(rng.randint(0, 8000))
        elif roll < 0.6:
            body = body[: rng.randint(0, len(body))]
        elif roll < 0.8:  # damaged header fields (rates, channels, sizes)
            for _ in range(rng.randint(1, 4)):
                body[rng.randrange(header)] = rng.getrandbits(8)
        else:
            for _ in range(rng.randint(1, 40)):
                body[rng.randrange(len(body))] = rng.getrandbits(8)
        path.write_bytes(bytes(body))
        try:
            wav = load_audio(path, max_seconds=rng.choice([None, 30.0]))
        except SpeechLLMError as err:
            assert str(path) in str(err)
            outcomes["refused"] += 1
            continue
        assert wav.dtype == np.float32 and wav.ndim == 1 and wav.size > 0 and np.isfinite(wav).all()
        outcomes["loaded"] += 1
    assert outcomes["loaded"] and outcomes["refused"]


# ----------------------------------------------------------------------------- lengths in eval and serve

def task(id_: str, instruction: str) -> dict:
    return {"id": id_, "task": "gender", "audio": "clip.wav", "instruction": instruction, "answer_kind": "label",
            "reference": "male", "labels": ["male", "female"], "description": '"hi" (Gender: Male)',
            "transcript": "hi"}


EVAL_FLAGS = ["--text-prompts", "0", "--safety-items", "0", "--max-new-tokens", "2", "--if-max-new-tokens", "2",
              "--bootstrap", "10", "--quiet"]
"""The smallest evaluation: one short answer per item, no text prompts, no safety requests."""


def test_eval_leaves_out_overlong_instructions_and_refuses_prompts_past_the_context(f, capsys):
    wordy = jsonl(f.dir / "wordy.tasks.jsonl", [task("ok", "Is the voice male or female?"),
                                                task("wordy", "Hm? " * 700)])
    out = f.dir / "eval-wordy"
    assert main(["eval", "--checkpoint", str(f.ckpt), "--data", str(wordy), "--out", str(out), *EVAL_FLAGS]) == 0
    errors = {e["id"]: e for e in map(json.loads, (out / "tasks.errors.jsonl").read_text().splitlines())}
    assert "at most 2000" in errors["wordy"]["error"]
    capsys.readouterr()
    crowded = jsonl(f.dir / "crowded.tasks.jsonl", [task("crowded", " ".join(["can"] * 480))])
    rc = main(["eval", "--checkpoint", str(f.ckpt), "--data", str(crowded), "--out", str(f.dir / "eval-crowded"),
               *EVAL_FLAGS])
    assert rc == 2 and re.search(r"task:crowded: \d+ positions \+ 2 answer tokens .* context of 1024",
                                 capsys.readouterr().err)


def test_serve_refuses_a_request_past_the_context(f):
    from http import HTTPStatus

    from speechllm.config import load_config
    from speechllm.model import SpeechLLM
    from speechllm.serve.app import Answerer, ServeError

    answerer = Answerer(SpeechLLM.from_pretrained(f.ckpt), load_config(TINY_CONFIG).generation, max_seconds=30,
                        asr_model=None)
    with pytest.raises(ServeError) as refused:
        answerer.answer(f.clip.read_bytes(), "clip.wav", " ".join(["can"] * 480))
    assert refused.value.status == HTTPStatus.BAD_REQUEST and "exceed the LLM's context" in refused.value.message


def test_a_saved_result_is_reused_only_when_made_the_same_way(tmp_path):
    """`read_saved_json`: this run's own file first, then the first file beside it with the same
    identity (copied here); a damaged, foreign or differently made file is no match, and the
    caller makes the result anew."""
    from speechllm.io.jsonl import read_saved_json, write_json_atomic

    own, a, b = tmp_path / "own.json", tmp_path / "a.json", tmp_path / "b.json"
    assert read_saved_json(own, "identity", 1, [a, b]) is None  # nothing saved yet
    own.write_text("{not json")
    a.write_text("[1, 2]")  # JSON, but not a saved result
    write_json_atomic(b, {"identity": 1, "value": "b"})
    assert read_saved_json(own, "identity", 2, [a, b]) is None  # made otherwise
    assert read_saved_json(own, "identity", 1, [a, b]) == {"identity": 1, "value": "b"}
    assert json.loads(own.read_text()) == {"identity": 1, "value": "b"}  # copied: the next read needs no other
    write_json_atomic(a, {"identity": 1, "value": "a"})
    assert read_saved_json(own, "identity", 1, [a, b])["value"] == "b"  # its own file comes first
