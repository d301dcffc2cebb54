"""Speech-IFEval: its released item files read, its scoring reproduced item by item on its
released outputs, its protocol run on a checkpoint (tiny here; the embedded default in the slow tier)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from speechllm.cli import main
from speechllm.eval import speech_ifeval as sif

FIXTURES = Path(__file__).parent / "fixtures" / "speech_ifeval"
DATA = FIXTURES / "data"
DESTA2 = FIXTURES / "outputs" / "DeSTA-ntu--DeSTA2-8B-beta"
LLAMA3 = FIXTURES / "outputs" / "meta-llama--Meta-Llama-3-8B-Instruct"


def _released() -> dict[tuple[str, str], list[bool]]:
    rows = [json.loads(line) for line in (FIXTURES / "released_rule_eval.jsonl").open()]
    return {(r["model"], r["id"]): r["follow_instruction_list"] for r in rows}


def test_reader_reads_the_released_format():
    items = sif.read_items(DATA, ("closed", "creative", "cot"))
    by_subset = {s: [it for it in items if it.subset == s] for s in ("closed", "creative", "cot")}
    assert {s: len(v) for s, v in by_subset.items()} == {"closed": 16, "creative": 14, "cot": 3}
    first = by_subset["closed"][0]
    assert first.id == "closed/23" and first.audio == "Automatic_speech_recognition/1188-133604-0006.flac"
    assert first.textual_audio == ("[00:00:00 - 00:00:02] Then he comes to the beak of it.(Gender: Male, "
                                   "Emotion: neutral)")
    assert first.instruction_id_list == ["change_case:english_capital"] and first.kwargs == [{}]
    assert first.label == "THEN HE COMES TO THE BEAK OF IT" and first.dataset == "Automatic_speech_recognition"
    assert all(it.label is None for it in by_subset["creative"])
    assert all(it.instruction_id_list == [] and it.id.startswith("cot/line") for it in by_subset["cot"])
    assert sif.reference_text(first) == f"Speech Input: {first.textual_audio}\n\n{first.instruction}"
    assert len(sif.read_items(DATA)) == 30  # closed and creative by default
    assert sif.sample_items(items, 2, seed=1) == sif.sample_items(items, 2, seed=1)
    assert len(sif.sample_items(items, 2, seed=1)) == 6


def test_scoring_reproduces_the_released_results_item_by_item():
    released = _released()
    differs_from_plain_ifeval = 0
    for folder in (DESTA2, LLAMA3):
        items = sif.read_items(DATA)
        answers = sif.read_response_files(folder, items)
        assert set(answers) == {it.id for it in items}
        ours = sif.score_items(items, answers)
        plain = sif.score_items(items, answers, rules="ifeval")
        for it in items:
            assert ours[it.id] == released[(folder.name, it.id)], it.id
        differs_from_plain_ifeval += sum(ours[i] != plain[i] for i in ours)
    assert differs_from_plain_ifeval > 0  # the fixture exercises Speech-IFEval's rule changes


@pytest.mark.parametrize("iid, kwargs, response, sif_rule, google", [
    ("change_case:english_capital", {}, "BONJOUR MES AMIS, COMMENT ALLEZ-VOUS AUJOURD'HUI?", True, False),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "• one\n• two", True, False),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "1. one\n2. two", True, False),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "* one\n* two", True, True),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "First.\nSecond.", True, False),
    ("combination:repeat_prompt", {"prompt_to_repeat": "Say hi."}, '"Say hi." Hi!', True, False),
    ("startend:quotation", {}, '"quoted"', True, True),  # not changed: the official checker
])
def test_rule_changes(iid, kwargs, response, sif_rule, google):
    assert sif.follows(iid, kwargs, "p", response) is sif_rule
    assert sif.follows(iid, kwargs, "p", response, rules="ifeval") is google
    assert not sif.follows(iid, kwargs, "p", "   ")


def test_command_scores_response_folders(tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["speech-ifeval", "--data", str(DATA), "--out", str(out), "--responses", str(DESTA2),
                 "--reference-responses", str(LLAMA3)]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    released = _released()
    for key, folder in (("system", DESTA2), ("reference", LLAMA3)):
        for subset in ("closed", "creative"):
            flags = [all(v) for (m, i), v in released.items() if m == folder.name and i.startswith(subset)]
            assert report[key][subset]["rate"] == pytest.approx(sum(flags) / len(flags))
    s, r = report["system"]["ifrate"], report["reference"]["ifrate"]
    assert report["delta"] == pytest.approx((s - r) / r)
    assert "| DeSTA-ntu--DeSTA2-8B-beta |" in printed and "published: DeSTA2 | 83.71 | 91.75" in printed
    rows = [json.loads(line) for line in (out / "predictions.jsonl").open()]
    assert len(rows) == 60 and {r["system"] for r in rows} == {DESTA2.name, LLAMA3.name}
    assert all(r["benchmark"] == "speech-ifeval" and r["score"]["checkers"] for r in rows)
    assert any(c.startswith("speech-ifeval:") for r in rows for c in r["score"]["checkers"])


def test_judge_prompt_and_verdicts_as_released():
    rows = [json.loads(line) for line in (FIXTURES / "released_cot_verdicts.jsonl").open()]
    assert {r["correct"] for r in rows} == {True, False}
    assert all(sif.parse_verdict(r["eval_response"]) is r["correct"] for r in rows)
    assert not sif.parse_verdict("I think so.") and sif.parse_verdict("Reasoning...\nResult: yes")
    item = next(it for it in sif.read_items(DATA, ("cot",)))
    assert sif.judge_text(item, "A.") == f"User input: {item.instruction}\nModel's Response: A."
    assert sif.COT_JUDGE_SYSTEM.startswith("You will be given a user input and a model response.")


def test_chain_of_thought_with_a_judge(tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["speech-ifeval", "--data", str(DATA), "--out", str(out), "--responses", str(DESTA2),
                 "--reference-responses", str(LLAMA3), "--judge", "tiny-random-llama", "--judge-max-new-tokens", "6",
                 "--quiet"]) == 0
    assert "CoT (%)" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert report["judge"] == "tiny-random-llama" and report["system"]["cot"]["items"] == 3
    rows = [json.loads(line) for line in (out / "predictions.jsonl").open()]
    cot = [r for r in rows if r["task"] == "cot"]
    assert len(cot) == 6 and all(r["score"]["checkers"] == ["judge:tiny-random-llama"] for r in cot)
    for r in cot:  # the verdict is what the judge said
        assert r["score"]["follow_all_instructions"] is sif.parse_verdict(r["score"]["judge_response"])
    rates = [all(r["score"]["follow_instruction_list"]) for r in cot if r["system"] == DESTA2.name]
    assert report["system"]["cot"]["rate"] == pytest.approx(sum(rates) / 3)
    assert main(["speech-ifeval", "--data", str(DATA), "--out", str(out), "--responses", str(DESTA2),
                 "--subsets", "cot"]) == 2
    assert "--subsets cot needs --judge" in capsys.readouterr().err


def test_bad_data_names_file_and_cause(tmp_path, capsys):
    with pytest.raises(sif.SpeechIFEvalError, match="no Speech-IFEval item files"):
        sif.read_items(tmp_path)
    folder = tmp_path / "eval_data"
    shutil.copytree(DATA / "eval_data", folder)
    path = folder / "creative_writing.jsonl"
    lines = path.read_text().splitlines()
    bad = json.loads(lines[2])
    bad["kwargs"] = []
    path.write_text("\n".join(lines[:2] + [json.dumps(bad)] + lines[3:]) + "\n")
    with pytest.raises(sif.SpeechIFEvalError, match=re.escape(f"{path}:3: ")):
        sif.read_items(tmp_path)
    with pytest.raises(sif.SpeechIFEvalError, match="unknown Speech-IFEval subset"):
        sif.read_items(DATA, ("nope",))
    (folder / "closed_ended_questions.jsonl").unlink()
    with pytest.raises(sif.SpeechIFEvalError, match="closed_ended_questions.jsonl: no such file"):
        sif.read_items(tmp_path)
    assert main(["speech-ifeval", "--data", str(DATA), "--out", str(tmp_path / "o"), "--responses",
                 str(tmp_path)]) == 2
    assert "closed_ended_questions.jsonl: no such file" in capsys.readouterr().err


def _audio_folder(root: Path, items, make) -> Path:
    """Write each item's clip at its `audio_filepath` (format from the extension)."""
    import soundfile as sf

    for it in items:
        path = root / it.audio
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(path, make(it), 16000)
    return root


def test_protocol_on_a_tiny_checkpoint(tmp_path, tiny_model, sample_wav):
    ckpt = tiny_model.save_pretrained(tmp_path / "tiny-ckpt")
    items = sif.sample_items(sif.read_items(DATA), 2, seed=0)
    audio = _audio_folder(tmp_path / "audio", items, lambda it: sample_wav[:16000 * 3])
    out = tmp_path / "run"
    report = sif.run_speech_ifeval(ckpt, DATA, out, str(audio), per_subset=2, max_new_tokens=8, batch_size=2,
                                   progress=False)
    assert report["items"] == 4 and report["subsets"] == ["closed", "creative"]
    for key in ("system", "reference"):
        assert set(report[key]) == {"closed", "creative", "ifrate"}
    rows = [json.loads(line) for line in (out / "predictions.jsonl").open()]
    assert len(rows) == 8
    ref_rows = [r for r in rows if r["system"] == report["reference_name"]]
    assert all(r["instruction"].startswith("Speech Input: [00:") for r in ref_rows)
    # the scores are the answers' scores
    for r in rows:
        iid = r["score"]["instruction_id_list"]
        it = next(i for i in items if sif.KEY_PREFIX + i.id == r["key"])
        assert r["score"]["follow_instruction_list"] == [sif.follows(i, kw, it.instruction, r["prediction"])
                                                         for i, kw in zip(iid, it.kwargs)]
    # resumable: a rerun generates nothing again and gives the same report
    again = sif.run_speech_ifeval(ckpt, DATA, out, str(audio), per_subset=2, max_new_tokens=8, batch_size=2,
                                  progress=False)
    assert again == report
    with pytest.raises(sif.SpeechIFEvalError, match="exceed the LLM's context.*--max-new-tokens"):
        sif.run_speech_ifeval(ckpt, DATA, out, str(audio), per_subset=2, max_new_tokens=100_000, progress=False)
    with pytest.raises(sif.SpeechIFEvalError, match="no usable audio"):
        sif.run_speech_ifeval(ckpt, DATA, tmp_path / "run2", str(tmp_path), per_subset=2, progress=False)
    # with a judge, chain-of-thought items are answered and judged too
    cot = sif.sample_items(sif.read_items(DATA, ("closed", "cot")), 1, seed=0)
    _audio_folder(audio, cot, lambda it: sample_wav[:16000 * 2])
    judged = sif.run_speech_ifeval(ckpt, DATA, tmp_path / "run3", str(audio), ("closed", "cot"), per_subset=1,
                                   max_new_tokens=8, progress=False, judge_model="tiny-random-llama",
                                   judge_max_new_tokens=4)
    assert set(judged["system"]) == {"closed", "cot", "ifrate"} and judged["judge"] == "tiny-random-llama"
    assert list((tmp_path / "run3" / "generations").glob("judge-*.jsonl"))


def _espeak(text: str) -> np.ndarray:
    import soundfile as sf

    wav = subprocess.run(["espeak-ng", "--stdout", "-v", "en-us", text], capture_output=True, check=True).stdout
    import io

    import librosa

    x, sr = sf.read(io.BytesIO(wav), dtype="float32")
    return librosa.resample(x, orig_sr=sr, target_sr=16000)


@pytest.mark.slow
def test_protocol_end_to_end_on_the_embedded_default(tmp_path):
    """Speech-IFEval's protocol on an untrained adapter over the embedded default (SmolLM2-135M +
    Whisper tiny.en), audio synthesized locally from each item's transcript."""
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed")
    import torch

    from speechllm.config import load_config
    from speechllm.model import build_model

    torch.manual_seed(0)
    ckpt = build_model(load_config(None)).save_pretrained(tmp_path / "untrained")
    items = sif.sample_items(sif.read_items(DATA), 3, seed=0)
    spoken = lambda it: re.sub(r"^\[[^\]]*\]\s*|\(Gender:.*$", "", it.textual_audio).strip() or "hello"
    audio = _audio_folder(tmp_path / "audio", items, lambda it: _espeak(spoken(it)))
    out = tmp_path / "run"
    assert main(["speech-ifeval", "--data", str(DATA), "--checkpoint", str(ckpt), "--out", str(out),
                 "--audio", str(audio), "--per-subset", "3", "--max-new-tokens", "64", "--quiet"]) == 0
    report = json.loads((out / "report.json").read_text())
    print(json.dumps({k: report[k] for k in ("system", "reference", "delta")}, indent=1))
    assert report["items"] == 6 and 0.0 <= report["system"]["ifrate"] <= 1.0
    assert report["reference"]["ifrate"] is not None
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 12
