"""The forgetting curve on the tiny model: IFrate and delta logged at every N-th and the last step,
the reference answered once per run folder (a resume reads it), training's weights untouched by
the scoring, `keep_best=forgetting` ending with the best step's adapter, and clear errors."""

import json
import shutil
from pathlib import Path

import pytest
import soundfile as sf
import torch
from safetensors.torch import load_file

from conftest import SAMPLE, TINY_CONFIG

from speechllm.config import load_config
from speechllm.eval.answer import Reference
from speechllm.eval.scoring import forgetting_curve
from speechllm.io.audio import load_audio
from speechllm.training.curve import BEST_DIR, REFERENCE_FILE, CurveError
from speechllm.training.trainer import TrainingError, train

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Training targets on four clips, and a held-out metadata file on the repository's samples."""
    d = tmp_path_factory.mktemp("curve")
    (d / "audio").mkdir()
    wav = load_audio(SAMPLE)
    recs = []
    for i in range(4):
        sf.write(d / "audio" / f"c{i}.wav", wav[i * 4000: i * 4000 + 16000], 16000)
        recs.append({"id": f"c{i}", "audio": f"audio/c{i}.wav", "transcript": "cold hearted",
                     "description": '[00:00-00:01] "cold hearted" (Gender: Male)', "instruction": "What can you hear?",
                     "target": ["A man reads.", "A calm voice."][i % 2], "truncated": False})
    (d / "targets.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    meta = []
    for i, wav_path in enumerate(sorted((ROOT / "samples").glob("*.wav"))[:3]):
        shutil.copy(wav_path, d / "audio" / f"held{i}.wav")
        gender = ("male", "female")[i % 2]
        meta.append({"id": f"h{i}", "audio": f"audio/held{i}.wav", "duration": 3.0,
                     "description": f'[00:00-00:03] "some words" (Gender: {gender.title()})',
                     "labels": {"gender": gender, "transcript": "some words"}})
    (d / "held.metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in meta))
    return d


def cfg(data, out, *more):
    return load_config(TINY_CONFIG, [f"train.data={data / 'targets.jsonl'}", f"train.out_dir={out}",
                                     "train.batch_size=2", "train.lr=0.01", "train.warmup_steps=1",
                                     "train.eval_fraction=0", "train.log_every=1", "train.save_every=2",
                                     f"train.cache_dir={data / 'cache'}",
                                     f"train.forgetting_data={data / 'held.metadata.jsonl'}",
                                     "train.forgetting_items=4", "eval.if_max_new_tokens=6", "eval.batch_size=4", *more])


def curve_rows(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "ifrate" in r]


@pytest.fixture()
def reference_calls(monkeypatch):
    """How often the reference is asked (the real method, counted)."""
    calls = []
    real = Reference.answer

    def counted(self, *args, **kwargs):
        calls.append(len(args[0]))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Reference, "answer", counted)
    return calls


def test_the_curve_is_logged_at_every_nth_and_the_last_step_and_the_reference_is_reused(
        data, tmp_path, reference_calls):
    out = tmp_path / "run"
    train(cfg(data, out, "train.max_steps=5", "train.forgetting_every=2"), progress=False)
    rows = curve_rows(out)
    assert [r["step"] for r in rows] == [2, 4, 5]  # every 2nd step, and the last
    for r in rows:
        assert set(r) == {"step", "ifrate", "ifrate_ref", "delta"} and 0 <= r["ifrate"] <= 1
        expected = None if r["ifrate_ref"] == 0 else (r["ifrate"] - r["ifrate_ref"]) / r["ifrate_ref"]
        assert r["delta"] == (expected if expected is None else pytest.approx(expected, abs=1e-4))
    assert reference_calls == [4]  # the reference answered its 4 items once, before training
    saved = json.loads((out / REFERENCE_FILE).read_text())
    assert len(saved["answers"]) == len(saved["passes"]) == 4
    assert {r["ifrate_ref"] for r in rows} == {round(sum(saved["passes"]) / 4, 5)}
    assert forgetting_curve(out) == [{k: r[k] for k in ("step", "ifrate", "delta")} for r in rows]

    # resumed with more steps: the reference is read from the run folder, the curve goes on
    train(cfg(data, out, "train.max_steps=6", "train.forgetting_every=2", "train.resume=must"), progress=False)
    assert reference_calls == [4]
    assert [r["step"] for r in curve_rows(out)] == [2, 4, 5, 6]
    best = json.loads((out / BEST_DIR / "config.json").read_text())
    top = max(r["ifrate"] for r in curve_rows(out))
    assert best["trained_steps"] == max(r["step"] for r in curve_rows(out) if r["ifrate"] == top)

    # a run beside it on the same items and LLM reads the reference from there; another dtype answers anew
    train(cfg(data, tmp_path / "beside", "train.max_steps=2", "train.forgetting_every=2"), progress=False)
    assert reference_calls == [4]
    assert json.loads((tmp_path / "beside" / REFERENCE_FILE).read_text())["passes"] == saved["passes"]
    train(cfg(data, tmp_path / "bf16", "train.max_steps=2", "train.forgetting_every=2", "model.llm.dtype=bfloat16"),
          progress=False)
    assert reference_calls == [4, 4]


def test_scoring_changes_no_weights_and_keep_best_ends_with_the_best_step(data, tmp_path):
    plain = train(cfg(data, tmp_path / "plain", "train.max_steps=3"), progress=False)
    curved = train(cfg(data, tmp_path / "curved", "train.max_steps=3", "train.forgetting_every=1",
                       "train.keep_best=forgetting"), progress=False)
    last = load_file(str(curved / "checkpoints" / "step-00000003" / "adapter.safetensors"))
    for key, value in load_file(str(plain / "adapter.safetensors")).items():
        torch.testing.assert_close(last[key], value, atol=0, rtol=0)
    rows = curve_rows(curved)
    assert [r["step"] for r in rows] == [1, 2, 3]
    top = max(r["ifrate"] for r in rows)
    best_step = max(r["step"] for r in rows if r["ifrate"] == top)  # the later step on a tie
    meta = json.loads((curved / "config.json").read_text())
    assert meta["trained_steps"] == best_step and meta["forgetting_curve"]["step"] == best_step
    assert (curved / "adapter.safetensors").read_bytes() == (curved / BEST_DIR / "adapter.safetensors").read_bytes()
    # every checkpoint carries the best adapter as it was then, so a resume restores it
    assert (curved / "checkpoints" / "step-00000003" / BEST_DIR / "adapter.safetensors").is_file()


def test_curve_settings_that_cannot_work_are_errors(data, tmp_path):
    with pytest.raises(TrainingError, match="train.forgetting_data"):
        train(cfg(data, tmp_path / "a", "train.max_steps=1", "train.forgetting_every=1", "train.forgetting_data=null"),
              progress=False)
    with pytest.raises(TrainingError, match="train.keep_best=forgetting"):
        train(cfg(data, tmp_path / "b", "train.max_steps=1", "train.keep_best=forgetting"), progress=False)
    with pytest.raises(CurveError, match="no such metadata file"):
        train(cfg(data, tmp_path / "c", "train.max_steps=1", "train.forgetting_every=1",
                  f"train.forgetting_data={tmp_path / 'missing.jsonl'}"), progress=False)
