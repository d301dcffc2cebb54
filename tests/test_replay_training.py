"""Text replay in training (`train.replay`) on the tiny model: the share of replay examples, a
stream that is a function of the seed and the micro-batch (also after SIGKILL and resume), the
refusal without LoRA, LoRA learning from text-only examples, and clear errors for bad files."""

import json
import shutil

import pytest
import soundfile as sf
import torch
from safetensors.torch import load_file

from conftest import SAMPLE, TINY_CONFIG

from speechllm.config import ConfigError, load_config
from speechllm.io.audio import load_audio
from speechllm.io.jsonl import JsonlError
from speechllm.training.replay import ReplayDataError, ReplayStream, read_replay
from speechllm.training.trainer import SettingsChangedError, Trainer, train

REPLAY = [{"id": f"r{i}", "instruction": q, "answer": a} for i, (q, a) in enumerate([
    ("Answer in JSON.", "The recording is clean."),
    ("What can you hear in the audio?", "A woman with a high pitch."),
    ("Answer in lowercase letters only.", "the speaker is a man."),
    ("Wrap your answer in double quotes.", '"The recording is noisy."'),
    ("Describe the speaker.", "A man with a low pitch, speaking slowly."),
])]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("replay-train")
    (d / "audio").mkdir()
    wav = load_audio(SAMPLE)
    recs = []
    for i in range(8):
        sf.write(d / "audio" / f"c{i}.wav", wav[i * 4000: i * 4000 + 16000 * (1 + i % 2)], 16000)
        recs.append({"id": f"c{i}", "audio": f"audio/c{i}.wav", "description": '"cold hearted" (Gender: Male)',
                     "instruction": "What can you hear?", "target": ["A man reads.", "A calm voice."][i % 2]})
    (d / "targets.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    (d / "replay.jsonl").write_text("".join(json.dumps(r) + "\n" for r in REPLAY))
    return d


def overrides(data, out, *more):
    return [f"train.data={data / 'targets.jsonl'}", f"train.out_dir={out}", "train.batch_size=4", "train.lr=0.01",
            "train.warmup_steps=1", "train.eval_fraction=0", "train.log_every=1", "train.eval_every=1000",
            f"train.cache_dir={data / 'cache'}", f"train.replay.data={data / 'replay.jsonl'}", *more]


def cfg(data, out, *more):
    return load_config(TINY_CONFIG, overrides(data, out, *more))


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_the_replay_stream_keeps_the_ratio_and_is_a_function_of_seed_and_micro_batch():
    batch, ratio, k = 8, 0.05, 5000
    stream = ReplayStream(37, batch, ratio, seed=0)
    counts = [stream.count(i) for i in range(k)]
    replay = sum(counts)
    assert abs(replay - k * batch * ratio / (1 - ratio)) < 1  # K*x within one example
    assert replay / (replay + k * batch) == pytest.approx(ratio, abs=1 / (k * batch))
    assert set(counts) == {0, 1}  # spread evenly: 0.42 per micro-batch, never a burst
    drawn = [p for i in range(k) for p in stream.positions(i)]
    assert sorted(drawn[:37]) == list(range(37))  # each pass through the examples takes every one once
    again = ReplayStream(37, batch, ratio, seed=0)
    assert [again.positions(i) for i in reversed(range(k))][::-1] == [stream.positions(i) for i in range(k)]
    other = ReplayStream(37, batch, ratio, seed=1)
    assert [other.positions(i) for i in range(k)] != [stream.positions(i) for i in range(k)]
    half = ReplayStream(37, 4, 0.5, seed=3)  # x = 4: exactly as many replay examples as records
    assert all(half.count(i) == 4 for i in range(100))


def test_replay_without_lora_is_refused_naming_why(data, tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"train.replay.ratio=0.2 with train.lora.enabled=false: .*text only.*"
                                          r"change no weight.*train.lora.enabled=true"):
        Trainer(cfg(data, tmp_path / "run", "train.replay.ratio=0.2"), progress=False)
    assert not (tmp_path / "run").exists()
    with pytest.raises(ConfigError, match=r"train.replay.ratio=0.2: no replay file given"):
        Trainer(cfg(data, tmp_path / "run", "train.replay.ratio=0.2", "train.replay.data=",
                    "train.lora.enabled=true"), progress=False)
    with pytest.raises(ReplayDataError, match=r"nope.jsonl: no such replay file"):
        Trainer(cfg(data, tmp_path / "run", "train.replay.ratio=0.2", f"train.replay.data={tmp_path / 'nope.jsonl'}",
                    "train.lora.enabled=true"), progress=False)
    from speechllm.cli import main

    code = main(["train", "--quiet", "--config", str(TINY_CONFIG), *overrides(data, tmp_path / "cli",
                                                                                "train.replay.ratio=0.2")])
    assert code == 2 and "train.lora.enabled=false" in capsys.readouterr().err


def test_malformed_replay_lines_are_errors_naming_file_and_line(tmp_path):
    good = json.dumps(REPLAY[0])
    for line, message in [("{not json", r"bad.jsonl:2: not valid JSON"),
                          ('{"instruction": "Hi there?"}', r"bad.jsonl:2: missing field\(s\) answer"),
                          ('{"instruction": "Hi there?", "answer": "  "}', r"bad.jsonl:2: empty answer"),
                          ('{"instruction": 3, "answer": "x"}', r"bad.jsonl:2: 'instruction' must be str"),
                          ('["instruction", "answer"]', r"bad.jsonl:2: expected a JSON object")]:
        path = tmp_path / "bad.jsonl"
        path.write_text(f"{good}\n{line}\n")
        with pytest.raises(JsonlError, match=message):
            read_replay(path)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ReplayDataError, match="empty.jsonl: holds no replay examples"):
        read_replay(tmp_path / "empty.jsonl")


def test_lora_learns_from_text_only_replay_examples(data, tmp_path):
    trainer = Trainer(cfg(data, tmp_path / "run", "train.replay.ratio=0.2", "train.lora.enabled=true",
                          "train.max_steps=3"), progress=False)
    model = trainer.model
    k = next(i for i in range(10) if trainer.replay.stream.count(i))
    examples = trainer.replay.examples(k)
    assert examples and not any(e.has_audio for e in examples)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer._train_mode()
    model(examples).backward()  # text-only examples alone: LoRA gets gradients, the adapter none
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is None for n, g in grads.items() if n.startswith("adapter."))
    assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if "lora_" in n)
    trainer.optimizer.step()
    changed = {n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])}
    assert changed and all("lora_" in n for n in changed)
    # a whole run: replay rides in the same steps, logged apart, and the settings record the file
    trainer.optimizer.zero_grad(set_to_none=True)
    out = trainer.train()
    rows = [m for m in metrics(out) if "loss" in m]
    assert [m["replay_examples"] for m in rows] == [trainer.replay.stream.count(i) for i in range(3)] == [1, 1, 1]
    assert all(m["replay_share"] == pytest.approx(0.2) and m["replay_loss"] > 0 for m in rows)
    assert trainer.settings["train.replay.data"].startswith("sha256:")


def test_replay_settings_are_training_settings(data, tmp_path):
    out = tmp_path / "run"
    on = ("train.replay.ratio=0.2", "train.lora.enabled=true", "train.max_steps=1")
    train(cfg(data, out, *on), progress=False)
    with pytest.raises(SettingsChangedError, match=r"train.replay.ratio: 0.2 -> 0.5"):
        Trainer(cfg(data, out, "train.replay.ratio=0.5", "train.lora.enabled=true", "train.max_steps=1"),
                progress=False)
    other = tmp_path / "replay.jsonl"  # another file: its digest differs, whatever its name
    other.write_text("".join(json.dumps(r) + "\n" for r in REPLAY[:3]))
    with pytest.raises(SettingsChangedError, match=r"train.replay.data: \"sha256:"):
        Trainer(cfg(data, out, *on, f"train.replay.data={other}"), progress=False)
    # with replay off, the file named is not a setting: runs without replay keep their settings
    plain = Trainer(cfg(data, tmp_path / "plain", "train.max_steps=1"), progress=False)
    assert not any("replay" in key for key in plain.settings)


def test_a_run_killed_after_a_checkpoint_resumes_the_same_stream(data, tmp_path):
    """A run killed after its step-4 checkpoint leaves that checkpoint and the metrics logged past
    it; resumed from there, it replays the same replay examples and ends with the same weights."""
    settings = ("train.replay.ratio=0.3", "train.lora.enabled=true", "train.batch_size=2", "train.max_steps=8",
                "train.save_every=2", "train.keep_checkpoints=4")
    full = train(cfg(data, tmp_path / "full", *settings), progress=False)
    killed = tmp_path / "killed"
    shutil.copytree(full / "checkpoints" / "step-00000004", killed / "checkpoints" / "step-00000004")
    shutil.copy(full / "metrics.jsonl", killed / "metrics.jsonl")  # rows past step 4 were written too
    trainer = Trainer(cfg(data, killed, *settings), progress=False)
    assert trainer.resume_from.name == "step-00000004"
    trainer.train()
    a, b = load_file(str(full / "adapter.safetensors")), load_file(str(killed / "adapter.safetensors"))
    assert a.keys() == b.keys() and any("lora_" in k for k in a)
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0)
    rows, reference = [m for m in metrics(killed) if "loss" in m], [m for m in metrics(full) if "loss" in m]
    assert [m["step"] for m in rows] == list(range(1, 9))
    assert [m["replay_examples"] for m in rows] == [m["replay_examples"] for m in reference]
    assert [m.get("replay_loss") for m in rows] == pytest.approx([m.get("replay_loss") for m in reference], abs=1e-4)
    replayed = sum(m["replay_examples"] for m in rows)
    assert replayed / (replayed + 2 * 8) == pytest.approx(0.3, abs=1 / (replayed + 2 * 8))
