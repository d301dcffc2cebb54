"""`speechllm replay` on a tiny LLM: Magpie records (instruction written by the LLM from the bare
template, its own answer, provenance), deduplication, degenerate candidates in the errors file
with their reason, resume, the user's own instructions, and settings a file cannot change.

The tiny random LLM writes byte soup and almost never closes a turn, so the tests first teach it
a few conversations (a real model trained for seconds): sampled from the bare template it then
writes those instructions, repeats them (duplicates), says "Hi" (too short) or runs past the
instruction length (no end of turn)."""

import json

import pytest

from conftest import TINY_CONFIG

from speechllm.config import load_config
from speechllm.io.jsonl import JsonlError, iter_lines
from speechllm.targets.replay import (MAGPIE, ReplayError, errors_path, instruction_problem, make_replay, normalize,
                                      read_instructions)
from speechllm.training.replay import read_replay

CHATS = [("What can you hear in the audio?", "The speaker is a woman."),
         ("Describe the speaker with a low pitch.", "The speaker is a man."),
         ("Answer in JSON.", "The recording is clean."),
         ("Is the recording noisy?", "The recording is noisy."),
         ("Answer in lowercase letters only.", "the speaker is a man."),
         ("Hi", "Hello.")]
"""What the tiny LLM is taught: its only instructions and answers."""
TEACH_STEPS = 60


@pytest.fixture(scope="module")
def taught(tmp_path_factory):
    """A folder with the tiny LLM after TEACH_STEPS of Adam on CHATS (whole conversations)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from speechllm.hub import weights

    src = weights.resolve("tiny-random-llama")
    tok, model = AutoTokenizer.from_pretrained(src), AutoModelForCausalLM.from_pretrained(src)
    texts = [tok.apply_chat_template([{"role": "user", "content": q}, {"role": "assistant", "content": a}],
                                     tokenize=False) for q, a in CHATS]
    batch = tok(texts, add_special_tokens=False, padding=True, return_tensors="pt")
    labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 64-wide model gains nothing from threads, and on a busy machine loses much
    try:
        for _ in range(TEACH_STEPS):
            model(**batch, labels=labels).loss.backward()
            opt.step()
            opt.zero_grad()
    finally:
        torch.set_num_threads(threads)
    out = tmp_path_factory.mktemp("taught") / "llm"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def cfg(taught, *more):
    return load_config(TINY_CONFIG, [f"model.llm.name={taught}", "replay.batch_size=8", "replay.max_instruction_tokens=16",
                                     "train.max_target_tokens=16", *more])


def lines(path):
    return [line.record for line in iter_lines(path)]


def test_degenerate_instruction_rules_and_what_counts_as_a_duplicate():
    ok = "Write a short poem about the sea."
    assert instruction_problem(ok, True, 3) is None
    assert instruction_problem("", True, 3) == "empty"
    assert instruction_problem("?!", True, 3) == "empty"
    assert instruction_problem(ok, False, 3) == "no end of turn"
    assert instruction_problem("Hi there", True, 3) == "too short: 2 word(s)"
    assert instruction_problem("Compute 1234 * 5678 = ??? + 99", True, 3).startswith("not text: ")
    assert instruction_problem("What is \ufffd\ufffd this thing?", True, 3).startswith("not text: control")
    assert instruction_problem("Tell me about " + "x" * 60, True, 3).startswith("not text: a 60-character word")
    assert instruction_problem("Tell me tell me tell me tell me tell me tell me", True, 3).startswith("loop")
    assert normalize("What is  AI?") == normalize("what is ai") != normalize("What is a AI?")


def test_magpie_writes_instructions_answers_and_provenance(taught, tmp_path):
    out = tmp_path / "replay.jsonl"
    summary = make_replay(cfg(taught), out, n=3, progress=False)
    records, errors = lines(out), lines(errors_path(out))
    assert summary.magpie == summary.written == len(records) == 3 and not summary.short
    taught_texts = {q: a for q, a in CHATS}
    for rec in records:
        assert rec["source"] == MAGPIE and rec["instruction"] in taught_texts
        assert rec["answer"] == taught_texts[rec["instruction"]]  # greedy: the taught answer
        gen = rec["generator"]
        assert gen["model"] == str(taught) and gen["fingerprint"].startswith("sha256:")
        assert gen["instruction"]["temperature"] == 1.0 and gen["instruction"]["seed"] == 0
        assert gen["answer"]["do_sample"] is False and isinstance(gen["batch_seed"], int)
    assert len({normalize(r["instruction"]) for r in records}) == 3  # deduplicated
    reasons = {e["error"].split(":")[0] for e in errors}
    assert {"duplicate", "too short"} <= reasons <= {"duplicate", "too short", "no end of turn", "not text", "empty",
                                                    "loop", "repeats"}
    assert all(e["instruction"] is not None and e["kind"] == "instruction" for e in errors)
    # the two files together hold the first candidates of the stream, each once
    ids = sorted(r["id"] for r in records + errors)
    assert len(ids) == len(set(ids)) == summary.candidates
    assert ids == sorted(f"magpie-{i // 8:06d}-{i % 8:03d}" for i in range(len(ids)))
    assert [r.answer for _, r in read_replay(out)] == [r["answer"] for r in records]  # usable as train.replay.data


def test_a_rerun_continues_the_same_stream_without_redoing_records(taught, tmp_path):
    whole = tmp_path / "whole.jsonl"
    assert make_replay(cfg(taught), whole, n=3, progress=False).magpie == 3
    part = tmp_path / "part.jsonl"
    first = make_replay(cfg(taught), part, n=2, progress=False)
    assert first.magpie == 2 and len(lines(part)) + len(lines(errors_path(part))) < 8  # stopped inside batch 0
    with open(part, "a") as f:  # a kill mid-write leaves a torn line
        f.write('{"id": "magpie-0000')
    more = make_replay(cfg(taught), part, n=3, progress=False)
    assert (more.done_before, more.written, more.magpie) == (2, 1, 3)
    assert lines(part) == lines(whole) and lines(errors_path(part)) == lines(errors_path(whole))
    again = make_replay(cfg(taught), part, n=3, progress=False)
    assert (again.written, again.candidates, again.new_tokens) == (0, 0, 0)  # nothing generated again
    with pytest.raises(ReplayError, match=r"part.jsonl:1: a magpie record made with other settings \(instruction "
                                          r"differ.*write to another --out"):
        make_replay(cfg(taught, "replay.temperature=0.7"), part, n=4, progress=False)


def test_the_users_own_instructions_get_the_base_llms_answers(taught, tmp_path, capsys):
    given = tmp_path / "mine.txt"
    given.write_text("Is the recording noisy?\n\nAnswer in JSON.\nanswer in json\n")
    out = tmp_path / "replay.jsonl"
    summary = make_replay(cfg(taught), out, instructions=given, progress=False)
    assert (summary.given, summary.written, summary.magpie) == (3, 2, 0)
    assert [(r["id"], r["instruction"], r["answer"], r["source"]) for r in lines(out)] == [
        ("given-000001", "Is the recording noisy?", "The recording is noisy.", "given"),
        ("given-000003", "Answer in JSON.", "The recording is clean.", "given")]
    assert [(e["id"], e["error"]) for e in lines(errors_path(out))] == [("given-000004", "duplicate: of given-000003")]
    # the same from the command line, JSONL with ids, then Magpie records after them in the same file
    from speechllm.cli import main

    jsonl = tmp_path / "mine.jsonl"
    jsonl.write_text(json.dumps({"id": "safety-1", "instruction": "Describe the speaker with a low pitch."}) + "\n")
    out2 = tmp_path / "cli.jsonl"
    args = ["replay", "--quiet", "--config", str(TINY_CONFIG), "--out", str(out2), "--instructions", str(jsonl),
            "--n", "1", "--batch-size", "8", f"model.llm.name={taught}", "replay.max_instruction_tokens=16",
            "train.max_target_tokens=16"]
    assert main(args) == 0
    assert "replay: 2 written" in capsys.readouterr().out
    assert [(r["id"], r["source"]) for r in lines(out2)][0] == ("safety-1", "given")
    assert [r["source"] for r in lines(out2)] == ["given", MAGPIE]


def test_bad_instruction_lists_and_arguments_are_clear_errors(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "fine"}\n{"instruction": ""}\n')
    with pytest.raises(JsonlError, match=r"bad.jsonl:2: 'instruction' must be non-empty text"):
        read_instructions(bad)
    bad.write_text('{"instruction": "fine"}\n{"text": "x"}\n')
    with pytest.raises(JsonlError, match=r"bad.jsonl:2: missing field\(s\) instruction"):
        read_instructions(bad)
    bad.write_text('{"id": 1, "instruction": "a"}\n{"id": "1", "instruction": "b"}\n')
    with pytest.raises(ReplayError, match=r"id '1' is given twice"):
        read_instructions(bad)
    from speechllm.cli import main

    assert main(["replay", "--out", str(tmp_path / "o.jsonl")]) == 2
    assert "give --n N" in capsys.readouterr().err
    assert main(["replay", "--out", str(tmp_path / "o.jsonl"), "--instructions", str(tmp_path / "none.txt"),
                 "--config", str(TINY_CONFIG)]) == 2
    assert "none.txt: no such instruction file" in capsys.readouterr().err
