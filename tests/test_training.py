"""Training on the tiny model: loss falls, exact resume after SIGKILL, LoRA, token masking,
NaN detection, and 2-process equality."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import soundfile as sf
import torch
from safetensors.torch import load_file

from conftest import ROOT, SAMPLE, TINY_CONFIG

from speechllm.io.audio import load_audio
from speechllm.config import load_config
from speechllm.demo import DemoError, train_stage
from speechllm.training import trainer as trainer_module
from speechllm.training.trainer import SettingsChangedError, Trainer, TrainingError, train


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("train")
    (d / "audio").mkdir()
    wav = load_audio(SAMPLE)
    recs = []
    for i in range(8):
        n = 16000 * (1 + i % 3)
        sf.write(d / "audio" / f"c{i}.wav", wav[i * 4000: i * 4000 + n], 16000)
        recs.append({"id": f"c{i}", "audio": f"audio/c{i}.wav", "transcript": "cold hearted" if i % 2 else None,
                     "description": f'[00:00-00:0{1 + i % 3}] "cold hearted" (Gender: Male)',
                     "instruction": "What can you hear?", "target": ["A man reads.", "A calm voice."][i % 2],
                     "truncated": False})
    recs.append({**recs[0], "id": "long", "truncated": True})
    (d / "targets.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return d


def cfg_args(data, out, *more):
    """Overrides of a short run on the fixture's data (`train.data` not included)."""
    return [f"train.out_dir={out}", "train.batch_size=4", "train.lr=0.01", "train.warmup_steps=1",
            "train.eval_fraction=0", "train.log_every=1", "train.eval_every=1000", f"train.cache_dir={data / 'cache'}",
            *more]


def cfg(data, out, *more):
    return load_config(TINY_CONFIG, [f"train.data={data / 'targets.jsonl'}", *cfg_args(data, out, *more)])


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_loss_falls_on_a_tiny_overfit_set(data, tmp_path):
    out = train(cfg(data, tmp_path / "run", "train.max_steps=30", "train.schedule=constant",
                    "train.feature_cache=false"), progress=False)
    losses = [m["loss"] for m in metrics(out) if "loss" in m]
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.3, losses
    assert (out / "adapter.safetensors").is_file() and (out / "config.json").is_file()
    assert json.loads((out / "resolved_config.json").read_text())["train"]["max_steps"] == 30


def test_a_fresh_run_fits_the_input_standardization_on_training_clips(data, tmp_path):
    from speechllm.model import build_model
    from speechllm.model.adapters import InputStandardizer

    config = cfg(data, tmp_path / "run", "train.max_steps=1", "train.feature_cache=false",
                 "train.standardize_clips=3")
    out = train(config, progress=False)
    saved = load_file(str(out / "adapter.safetensors"))
    model = build_model(config)
    audio = [data / r["audio"] for r in map(json.loads, (data / "targets.jsonl").read_text().splitlines())]
    rows = np.sort(np.random.default_rng(0).choice(len(audio), 3, replace=False))  # train.seed 0's sample of rows
    clips = sorted({audio[i] for i in rows})
    expected = InputStandardizer(len(config.model.encoder.layers), model.encoder.width)
    states = []
    for clip in clips:
        enc = model.encoder.encode([load_audio(clip)])
        states.append([s[0, : int(enc.lengths[0])] for s in enc.states])
    expected.fit(states)
    torch.testing.assert_close(saved["standardizer.mean"], expected.mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(saved["standardizer.std"], expected.std, atol=1e-5, rtol=1e-5)
    assert not torch.equal(saved["standardizer.std"], torch.ones_like(expected.std))


def run_cli(args, env=None):
    return subprocess.Popen([sys.executable, "-m", "speechllm.cli", "train", "--quiet", "--config", str(TINY_CONFIG),
                             *args], env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def cli_args(data, out, *more):
    return [f"train.data={data / 'targets.jsonl'}", f"train.out_dir={out}", "train.batch_size=2", "train.lr=0.01",
            "train.warmup_steps=2", "train.eval_fraction=0", "train.max_steps=10", "train.save_every=2",
            f"train.cache_dir={data / 'cache'}", *more]


def test_cached_and_uncached_training_agree(data, tmp_path):
    cached = train(cfg(data, tmp_path / "cached", "train.max_steps=2"), progress=False)
    direct = train(cfg(data, tmp_path / "direct", "train.max_steps=2", "train.feature_cache=false"), progress=False)
    # the cache stores fp16 states: the first step's loss agrees up to that rounding (Adam then
    # amplifies rounding in near-zero gradients, so later weights are compared elsewhere)
    first = [next(m["loss"] for m in metrics(out) if m["step"] == 1) for out in (cached, direct)]
    assert first[0] == pytest.approx(first[1], abs=1e-3)
    assert len(list((data / "cache").rglob("*.safetensors"))) == 8  # one entry per clip, reused by later tests


def test_training_with_and_without_prefix_reuse_agree(data, tmp_path, monkeypatch):
    from speechllm.model import SpeechLLM

    prefixes = []
    real = SpeechLLM._prefix_cache
    monkeypatch.setattr(SpeechLLM, "_prefix_cache", lambda self, batch: prefixes.append(
        (len(batch.inputs_embeds), batch.prefix_ids)) or real(self, batch))
    reused = train(cfg(data, tmp_path / "reused", "train.max_steps=2"), progress=False)
    assert len(prefixes) == 2 and any(n > 1 for n, _ in prefixes)
    assert all(ids for n, ids in prefixes if n > 1)  # every step of several examples ran its prefix once
    whole = train(cfg(data, tmp_path / "whole", "train.max_steps=2", "train.reuse_prefix=false"), progress=False)
    assert len(prefixes) == 4 and not any(ids for _, ids in prefixes[2:])
    losses = [[m["loss"] for m in metrics(out) if "loss" in m] for out in (reused, whole)]
    assert losses[0] == pytest.approx(losses[1], abs=1e-4)


def test_token_weighting_equals_batch_means_when_every_target_has_the_same_length(data, tmp_path):
    # every target the same tokens: a batch's summed token loss / (examples x mean tokens) is its
    # mean token loss, so the two weightings train the same adapter
    same = write_targets(tmp_path / "same.targets.jsonl", [{**r, "target": "A man reads.", "truncated": False}
                                                            for r in base_records(data, 8)])
    runs = [train(load_config(TINY_CONFIG, [f"train.data={same}", *cfg_args(data, tmp_path / w, "train.max_steps=2",
                                                                          f"train.loss_weighting={w}")]),
                  progress=False) for w in ("token", "batch")]
    a, b = (load_file(str(out / "adapter.safetensors")) for out in runs)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)


def test_token_weighting_gives_a_batch_of_short_answers_a_smaller_step(data, tmp_path):
    # one batch of one-word answers, one of long answers: `batch` gives both batches the same weight,
    # `token` weighs the short batch by its few tokens; the logged loss is the batch's mean token loss either way
    recs = base_records(data, 8)
    for i, r in enumerate(recs):
        r.update(target="Yes." if i < 4 else "A calm man reads the words aloud slowly and clearly to us. " * 3,
                 truncated=False)
    path = write_targets(tmp_path / "mixed.targets.jsonl", recs)
    runs = {w: train(load_config(TINY_CONFIG, [f"train.data={path}",
                                               *cfg_args(data, tmp_path / w, "train.max_steps=1", "train.lr=1e-3",
                                                         "train.warmup_steps=0", "train.schedule=constant",
                                                         "train.grad_clip=1e9", f"train.loss_weighting={w}")]),
                     progress=False) for w in ("token", "batch")}
    logged = {w: [m["loss"] for m in metrics(out) if "loss" in m] for w, out in runs.items()}
    assert logged["token"] == pytest.approx(logged["batch"], abs=1e-5)  # the same first batch, the same mean
    grad_norms = {w: [m["grad_norm"] for m in metrics(out) if "grad_norm" in m][0] for w, out in runs.items()}
    first = Trainer(load_config(TINY_CONFIG, [f"train.data={path}", *cfg_args(data, tmp_path / "peek")]))
    short_first = all(r.target == "Yes." for r in first.stream[0])
    # tokens per example lie between the short and the long answers': a short batch's gradient
    # shrinks, a long batch's grows
    assert (grad_norms["token"] < grad_norms["batch"]) == short_first, (grad_norms, short_first)


def test_sigkill_then_resume_ends_with_the_same_weights(data, tmp_path):
    full = run_cli(cli_args(data, tmp_path / "full"))
    assert full.wait(timeout=300) == 0, full.stderr.read().decode()[-2000:]
    proc = run_cli(cli_args(data, tmp_path / "killed"))
    ckpts = tmp_path / "killed" / "checkpoints"
    deadline = time.time() + 300
    while not (ckpts / "step-00000006").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "adapter.safetensors").exists()  # it really died mid-run
    resumed = run_cli(cli_args(data, tmp_path / "killed"))
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read().decode()[-2000:]
    a = load_file(str(tmp_path / "full" / "adapter.safetensors"))
    b = load_file(str(tmp_path / "killed" / "adapter.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)
    steps = [m["step"] for m in metrics(tmp_path / "killed") if "loss" in m]
    assert steps == sorted(set(steps)) and steps[-1] == 10  # no step logged twice
    assert len(list(ckpts.glob("step-*"))) == 2  # keep_checkpoints


def test_lora_trains_only_lora_and_adapter(data, tmp_path):
    from speechllm.model import SpeechLLM

    trainer = Trainer(cfg(data, tmp_path / "lora", "train.max_steps=2", "train.lora.enabled=true"), progress=False)
    model = trainer.acc.unwrap_model(trainer.ddp)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    out = trainer.train()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.startswith("adapter.") or "lora_" in n for n in changed)
    assert any("lora_" in n for n in changed) and any(n.startswith("adapter.") for n in changed)
    reloaded = SpeechLLM.from_pretrained(out)
    assert set(reloaded.trainable_state_dict()) == set(model.trainable_state_dict())


def test_lora_dropout_tells_that_each_sequence_runs_its_own_prefix(data, tmp_path, capsys):
    Trainer(cfg(data, tmp_path / "a", "train.max_steps=1", "train.lora.enabled=true"), progress=False)
    assert "draws a mask per sequence" not in capsys.readouterr().out  # dropout 0, the default
    Trainer(cfg(data, tmp_path / "b", "train.max_steps=1", "train.lora.enabled=true", "train.lora.dropout=0.05"),
            progress=False)
    assert "train.lora.dropout=0.05 draws a mask per sequence" in capsys.readouterr().out


def test_token_masking_masks_the_least_probable_fraction(data, tmp_path, monkeypatch):
    trainer = Trainer(cfg(data, tmp_path / "mask", "train.max_steps=1", "train.token_masking=0.5"), progress=False)
    monkeypatch.setattr(trainer_module, "MASKING_CHUNK", 2)  # scored two records at a time: the same masks
    assert trainer._token_masks() == trainer.masks
    model = trainer.model
    for rec in trainer.train_records:
        mask = trainer.masks[rec.id]
        target = model.prompt.text(rec.target)
        assert len(mask) == len(target) and mask.count(False) == round(0.5 * len(target))
    # the dropped tokens are the ones the base LLM, reading the description, finds least probable
    # (scored here one record at a time with full logits; the trainer scores them in batches)
    for rec in trainer.train_records:
        pieces = model.prompt.pieces(f"{rec.description}\n\n{rec.instruction}", None, has_audio=False)
        prompt, target = pieces.before_audio + pieces.after_audio, model.prompt.text(rec.target)
        with torch.no_grad():
            logits = model.llm(input_ids=torch.tensor([prompt + target])).logits
        tok = logits[0, len(prompt) - 1: -1].log_softmax(-1).gather(-1, torch.tensor(target)[:, None])[:, 0]
        kept = [float(tok[j]) for j, k in enumerate(trainer.masks[rec.id]) if k]
        dropped = [float(tok[j]) for j, k in enumerate(trainer.masks[rec.id]) if not k]
        assert min(kept) >= max(dropped) - 1e-5
    rec = trainer.train_records[0]
    kept = trainer.masks[rec.id].count(True)
    # and they leave the loss: only kept target tokens and the end-of-turn are labelled
    batch = model.build_batch(trainer.examples([rec]))
    assert int((batch.labels[0] != -100).sum()) == kept + len(model.prompt.end_of_turn_ids)


def test_truncated_targets_are_skipped_or_learned_without_end_of_turn(data, tmp_path):
    skipping = Trainer(cfg(data, tmp_path / "skip", "train.max_steps=1", "train.skip_truncated=true"),
                       progress=False)
    assert "long" not in {r.id for r in skipping.train_records}
    keeping = Trainer(cfg(data, tmp_path / "keep", "train.max_steps=1"), progress=False)
    cut = next(r for r in keeping.train_records if r.id == "long")
    whole = next(r for r in keeping.train_records if r.id == "c0")
    model = keeping.model
    batch = model.build_batch(keeping.examples([cut, whole]))
    labelled = [row[row != -100].tolist() for row in batch.labels]
    text = model.prompt.text(cut.target)
    # the same words; only the complete answer is taught to stop
    assert labelled[0] == text
    assert labelled[1] == text + model.prompt.end_of_turn_ids


def test_non_finite_loss_stops_naming_step_and_ids(data, tmp_path):
    with pytest.raises(TrainingError, match=r"step \d+: loss is (nan|inf) on the batch with ids c"):
        train(cfg(data, tmp_path / "nan", "train.max_steps=5", "train.lr=1e30", "train.grad_clip=1e30"),
              progress=False)


def test_two_processes_equal_one_process_with_matching_accumulation(data, tmp_path):
    # torchrun runs each process with one thread; the same here, so that matmuls sum in the same order
    one = run_cli(cli_args(data, tmp_path / "one", "train.grad_accum=2", "train.max_steps=4"),
                  env={"OMP_NUM_THREADS": "1"})
    assert one.wait(timeout=300) == 0, one.stderr.read().decode()[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "-m", "speechllm.cli", "train", "--quiet", "--config", str(TINY_CONFIG),
                          *cli_args(data, tmp_path / "two", "train.grad_accum=1", "train.max_steps=4")],
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, timeout=300)
    assert two.returncode == 0, two.stderr.decode()[-3000:]
    a = load_file(str(tmp_path / "one" / "adapter.safetensors"))
    b = load_file(str(tmp_path / "two" / "adapter.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)


def test_weight_decay_falls_on_matrices_only(tiny_model):
    from speechllm.training.trainer import param_groups

    decay, no_decay = param_groups(tiny_model, 0.01)
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in tiny_model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    kept = {names[id(p)] for p in no_decay["params"]}
    assert "adapter.layer_logits" in kept and "adapter.queries" in decayed and "adapter.proj.weight" in decayed
    assert all(n.endswith("bias") or ".norm" in n or n.endswith("layer_logits") for n in kept), kept
    assert not any(n.endswith("bias") or ".norm" in n for n in decayed), decayed
    assert decayed | kept == {n for n, p in tiny_model.named_parameters() if p.requires_grad}


# ----------------------------------------------------------------------------- bounds and hostile data

def write_targets(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def base_records(data, n=4):
    """The fixture's first `n` records, with absolute audio paths (usable from any folder)."""
    recs = [json.loads(line) for line in (data / "targets.jsonl").read_text().splitlines()][:n]
    return [{**r, "audio": str(data / r["audio"])} for r in recs]


def test_a_huge_target_is_cut_and_every_batch_stays_bounded(data, tmp_path):
    limit = 16
    recs = base_records(data)
    recs[0]["target"] = " ".join(["word"] * 10_000)
    path = write_targets(tmp_path / "huge.targets.jsonl", recs)
    trainer = Trainer(load_config(TINY_CONFIG, [f"train.data={path}", f"train.out_dir={tmp_path / 'run'}",
                                                f"train.max_target_tokens={limit}", "train.batch_size=4",
                                                "train.max_steps=2", "train.eval_fraction=0",
                                                f"train.cache_dir={data / 'cache'}"]), progress=False)
    assert trainer.report.cut == 1 and trainer.report.kept == 4
    model = trainer.model
    cut = next(r for r in trainer.train_records if r.id == "c0")
    assert cut.truncated and 0 < len(model.prompt.text(cut.target)) <= limit
    bound = max(model.prompt_length(r.instruction, r.transcript, True, r.seconds) for r in trainer.train_records)
    for k in range(trainer.stream.per_epoch):
        batch = model.build_batch(trainer.examples(trainer.stream[k]))
        assert batch.inputs_embeds.shape[1] <= bound + limit
    assert (trainer.train() / "adapter.safetensors").is_file()


def test_unusable_records_are_left_out_and_counted(data, tmp_path):
    long_clip = tmp_path / "long.wav"
    sf.write(long_clip, np.zeros(31 * 16000, dtype=np.float32), 16000)
    good = base_records(data)
    bad = [{**good[0], "id": "empty", "target": "  "},
           {**good[0], "id": "wordy", "instruction": "Say " * 600},
           {**good[0], "id": "crowded", "instruction": " ".join(["can"] * 480)},
           {**good[0], "id": "long-clip", "audio": str(long_clip)}]
    path = write_targets(tmp_path / "mixed.targets.jsonl", good + bad)
    trainer = Trainer(load_config(TINY_CONFIG, [f"train.data={path}", f"train.out_dir={tmp_path / 'run'}",
                                                "train.eval_fraction=0", "train.feature_cache=false"]), progress=False)
    report = trainer.report
    assert (report.empty_target, report.long_instruction, report.over_context, report.audio_length) == (1, 1, 1, 1)
    assert sorted(r.id for r in trainer.train_records) == sorted(r["id"] for r in good)
    line = report.line()
    assert "1 empty targets left out" in line and "longer than the LLM's context" in line


def test_targets_written_in_another_folder_train_on_the_same_clips(tmp_path, capsys):
    from speechllm.cli import main

    source, elsewhere = tmp_path / "corpus", tmp_path / "elsewhere"
    for folder, seconds in ((source, 1.5), (elsewhere, 3.0)):  # same names, other clips: decoys
        (folder / "audio").mkdir(parents=True)
        for i in range(3):
            sf.write(folder / "audio" / f"clip{i}.wav", load_audio(SAMPLE)[: int(seconds * 16000)], 16000)
    meta = [{"id": f"clip{i}", "audio": f"audio/clip{i}.wav", "description": '[00:00-00:01] "hi" (Gender: Male)',
             "labels": {"gender": "male"}} for i in range(3)]
    write_targets(source / "train.metadata.jsonl", meta)
    out = elsewhere / "train.targets.jsonl"  # beside the decoys: a copied relative path would name them
    assert main(["targets", str(source / "train.metadata.jsonl"), "--out", str(out), "--strategy", "label",
                 "--config", str(TINY_CONFIG), "--quiet"]) == 0
    trainer = Trainer(load_config(TINY_CONFIG, [f"train.data={out}", f"train.out_dir={tmp_path / 'run'}",
                                                "train.eval_fraction=0", "train.feature_cache=false"]), progress=False)
    assert {r.audio.resolve() for r in trainer.train_records} == {(source / "audio" / f"clip{i}.wav").resolve()
                                                                  for i in range(3)}
    assert all(r.seconds == pytest.approx(1.5) for r in trainer.train_records)


def test_resume_only_with_the_settings_the_run_was_trained_with(data, tmp_path):
    out = tmp_path / "run"
    train(cfg(data, out, "train.max_steps=2"), progress=False)
    with pytest.raises(TrainingError, match=r"other settings \(train.lr: 0.01 -> 0.02\).*train.resume=must.*"
                                            r"train.resume=never") as err:
        Trainer(cfg(data, out, "train.max_steps=2", "train.lr=0.02"), progress=False)
    assert isinstance(err.value, SettingsChangedError) and err.value.changes == ["train.lr: 0.01 -> 0.02"]
    # the demo takes no train.resume override: it names the folder to delete, and keeps the run
    with pytest.raises(DemoError, match=rf"{re.escape(str(out))} holds an adapter trained with other settings "
                                        r"\(train.lr: 0.01 -> 0.02\).*delete"):
        train_stage(cfg(data, out, "train.max_steps=2", "train.lr=0.02"), progress=False)
    assert (out / "checkpoints").exists()
    fewer = data / "fewer.targets.jsonl"  # beside the clips it names
    fewer.write_text("".join(line + "\n" for line in (data / "targets.jsonl").read_text().splitlines()[1:]))
    with pytest.raises(TrainingError, match=r"train.data: \"sha256:"):
        Trainer(load_config(TINY_CONFIG, [f"train.data={fewer}", *cfg_args(data, out, "train.max_steps=2")]),
                progress=False)
    # told to, it goes on from the checkpoint with the new settings
    resumed = Trainer(cfg(data, out, "train.max_steps=4", "train.lr=0.02", "train.resume=must"), progress=False)
    assert resumed.resume() and resumed.step == 2
    assert resumed.scheduler.base_lrs == [0.02, 0.02]
    assert resumed.optimizer.param_groups[0]["lr"] == pytest.approx(0.02 * resumed.scheduler.lr_lambdas[0](2))
    # or starts afresh in the same folder
    fresh = Trainer(cfg(data, out, "train.max_steps=2", "train.lr=0.02", "train.resume=never"), progress=False)
    assert fresh.resume_from is None and not (out / "checkpoints").exists() and not (out / "metrics.jsonl").exists()
    with pytest.raises(TrainingError, match="train.resume=must: .* holds no checkpoint"):
        Trainer(cfg(data, tmp_path / "empty", "train.resume=must"), progress=False)
