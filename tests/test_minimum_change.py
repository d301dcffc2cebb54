"""The minimum-change strategy: fixed self-outputs in, exact expected outputs; only the words the
labels show wrong change, a right answer stays byte-identical, and the edit distance is counted
in words. End to end on the tiny model: the record keeps the original and what was fixed."""

import json

import pytest

from conftest import TINY_CONFIG

from speechllm.config import load_config
from speechllm.model.generate import TextGenerator
from speechllm.targets.edits import (better_edit, contains_transcript, fix_attributes, insert_transcript,
                                     word_edit_distance)
from speechllm.targets.run import run_targets

FEMALE = {"gender": "female", "pitch": "high", "speed": "fast", "volume": "quiet", "noise": "noisy"}
MALE = {"gender": "male", "pitch": "low", "speed": "slow", "volume": "loud", "noise": "clean"}


@pytest.mark.parametrize("answer, attrs, instruction, expected", [
    ("The speaker is male.", FEMALE, "Is the speaker male or female?", "The speaker is female."),
    ("THE SPEAKER IS FEMALE.", MALE, "Is the speaker male or female?", "THE SPEAKER IS MALE."),
    ("The old man's voice is warm. He's kind to him, and His voice is calm.", FEMALE, "Describe the speaker's voice.",
     "The old woman's voice is warm. She's kind to her, and Her voice is calm."),
    # "her" before a noun is possessive (his), before a function word or at the end an object (him)
    ("She lost her keys and we met her at noon. I saw her.", MALE, "What can you hear?",
     "He lost his keys and we met him at noon. I saw him."),
    ("The recording is loud in volume.", FEMALE, "How loud is the speaker?", "The recording is quiet in volume."),
    ("The speaker talks at a high speed.", MALE, "How fast is the speaker talking?",
     "The speaker talks at a low speed."),
    ("The speaker talks quickly.", {"speed": "normal"}, "x", "The speaker talks at a normal pace."),
    ("A deep voice, low in pitch.", FEMALE, "Describe the speaker's voice.",
     "A high-pitched voice, high in pitch."),
    ("It has a high-pitched tone.", MALE, "Describe the audio.", "It has a low-pitched tone."),
    # the right value negated: the negation goes; the wrong value negated is right as it stands
    ("The recording is not noisy.", FEMALE, "Is the recording noisy?", "The recording is noisy."),
    ("The recording isn't noisy.", FEMALE, "Is the recording noisy?", "The recording is noisy."),
    ("The recording is noisy.", MALE, "Is the recording noisy?", "The recording is clean."),
    # a description echoed back: the field name governs its value
    ("(Gender: Male, Pitch: Normal, Speaking speed: Normal, Volume: Normal, Noise: Clean)", FEMALE,
     "What can you hear?", "(Gender: Female, Pitch: High, Speaking speed: Fast, Volume: Quiet, Noise: Noisy)"),
])
def test_only_the_wrong_words_change(answer, attrs, instruction, expected):
    fixed, fixes = fix_attributes(answer, attrs, instruction)
    assert fixed == expected
    assert word_edit_distance(answer, fixed) == sum(len(f.after.split()) if f.how == "word" else 1 for f in fixes)


@pytest.mark.parametrize("answer, attrs, instruction, transcript", [
    ("The speaker is female, and she talks fast.", FEMALE, "Describe the speaker.", None),
    ("The recording is not noisy.", MALE, "Is the recording noisy?", None),  # "not noisy" is clean
    ("The speaker is male or female.", FEMALE, "Is the speaker male or female?", None),  # options echoed
    ("It shows a deep understanding and a soft shade.", FEMALE, "Describe the audio.", None),  # no attribute named
    ("The normal way to say it.", MALE, "Describe the audio.", None),  # "normal" of no attribute
    ('The use of "He" adds warmth.', FEMALE, "Describe the audio.", None),  # quoted words are the words spoken
    ("He mended his nets on the dock, I hear.", FEMALE, "What can you hear?", "He mended his nets on the dock."),
    ("A voice with a clear tone.", FEMALE, "Describe the speaker's voice.", None),  # "clear" is never edited
])
def test_a_right_or_unreadable_answer_stays_byte_identical(answer, attrs, instruction, transcript):
    fixed, fixes = fix_attributes(answer, attrs, instruction, transcript)
    assert fixed == answer and fixes == [] and word_edit_distance(answer, fixed) == 0


def test_edit_distance_counts_words():
    assert word_edit_distance("the speaker is male", "the speaker is male") == 0
    assert word_edit_distance("the speaker is male", "the speaker is female") == 1
    assert word_edit_distance("a b c", "a x c d") == 2  # one changed, one added
    assert word_edit_distance("he talks quickly.", "he talks at a normal pace.") == 4
    assert word_edit_distance("is not noisy", "is noisy") == 1
    assert word_edit_distance("male.", "Male.") == 1  # case counts: the target is compared as trained


def test_a_missed_transcript_is_put_in_by_code():
    fixed, fix = insert_transcript('The speaker says: "the bus was late."', "The bus was full.")
    assert fixed == 'The speaker says: "The bus was full."' and fix.before == "the bus was late."
    assert word_edit_distance('The speaker says: "the bus was late."', fixed) == 2
    fixed, _ = insert_transcript("A man talks about a bus.", "The bus was full.")
    assert fixed == 'A man talks about a bus. The speaker says: "The bus was full."'
    fixed, _ = insert_transcript("A man talks about a bus, and", "The bus was full.", finished=False)
    assert fixed == 'The speaker says: "The bus was full." A man talks about a bus, and'
    assert contains_transcript('He said "the BUS was full"', "The bus was full.")
    assert not contains_transcript("the bus was", "The bus was full.")
    # the LLM's edit is taken only when it holds the transcript and changes no more words than the code's
    original, coded = 'It says: "bus late."', 'It says: "The bus was full."'
    assert better_edit(original, 'It says: "The bus was full."', coded, "The bus was full.")
    assert not better_edit(original, 'The audio says "The bus was full." Yes.', coded, "The bus was full.")
    assert not better_edit(original, 'It says: "bus full."', coded, "The bus was full.")


TRANSCRIPT = "he might even have been made amiable himself"


def _metadata(path, n=4):
    lines = []
    for i in range(n):
        gender = "female" if i % 2 else "male"
        desc = f'[00:00-00:03] "{TRANSCRIPT}" (Gender: {gender.title()}, Pitch: Low)'
        lines.append({"id": f"clip{i}", "audio": f"audio/clip{i}.wav", "duration": 3.0, "description": desc,
                      "labels": {"gender": gender, "pitch": "low", "transcript": TRANSCRIPT}})
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    return path


@pytest.mark.parametrize("fix", ["code", "prompt"])
def test_the_strategy_keeps_the_self_output_and_records_the_edits(tmp_path, fix):
    cfg = load_config(TINY_CONFIG, ["targets.strategy=minimum-change", "train.max_target_tokens=10",
                                    "targets.batch_size=4", "targets.instruction=What did the speaker say?",
                                    f"targets.transcript_fix={fix}", "targets.fidelity_probe=0",
                                    "targets.target_nll=false"])
    out = tmp_path / "t.jsonl"
    summary = run_targets(_metadata(tmp_path / "m.jsonl"), out, cfg, progress=False,
                          generator=TextGenerator.from_config(cfg))
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(recs) + summary.dropped == 4 and recs
    for rec in recs:
        assert rec["strategy"] == "minimum-change" and rec["generator"]["editor"] == "minimum-change/1"
        so, target = rec["self_output"], rec["target"]
        # a random-init model never says the words: the transcript is put in, the rest of its answer kept
        assert contains_transcript(target, TRANSCRIPT)
        assert rec["edit_distance"] == word_edit_distance(so, target) > 0
        assert rec["fixes"][-1]["attribute"] == "transcript" and rec["kept"] == "minimum-change"
        # the tiny model's edit never holds the transcript either: the code's edit is kept
        assert rec["fixes"][-1]["how"] == "code"
        if '"' not in so:
            assert target in (f'{so} The speaker says: "{TRANSCRIPT}"', f'The speaker says: "{TRANSCRIPT}" {so}')
    assert summary.kept == {"minimum-change": len(recs)}
    assert summary.edited_words == sum(r["edit_distance"] for r in recs)


def test_self_outputs_are_taken_from_an_earlier_self_output_file(tmp_path):
    """targets.self_output_file: the same records as generating the self-outputs again, without
    generating them; a record made otherwise (here: another instruction) is generated as usual."""
    from speechllm.config import ConfigError
    from speechllm.errors import SpeechLLMError
    from speechllm.io.jsonl import JsonlError

    common = ["train.max_target_tokens=10", "targets.batch_size=4", "targets.instruction=What did the speaker say?",
              "targets.fidelity_probe=0", "targets.target_nll=false"]
    meta = _metadata(tmp_path / "m.jsonl")
    so_cfg = load_config(TINY_CONFIG, common)
    gen = TextGenerator.from_config(so_cfg)
    so_summary = run_targets(meta, tmp_path / "so.jsonl", so_cfg, progress=False, generator=gen)
    mc_cfg = load_config(TINY_CONFIG, common + ["targets.strategy=minimum-change"])
    run_targets(meta, tmp_path / "fresh.jsonl", mc_cfg, progress=False, generator=gen)

    so = [json.loads(line) for line in (tmp_path / "so.jsonl").read_text().splitlines()]
    # made for another question: not this run's answer (a prompt asked twice is one answer: every record of it)
    twins = [r for r in so if r["description"] == so[0]["description"]]
    for r in twins:
        r["instruction"] = "Describe the audio."
    (tmp_path / "so.jsonl").write_text("".join(json.dumps(r) + "\n" for r in so))
    reuse_cfg = load_config(TINY_CONFIG, common + ["targets.strategy=minimum-change",
                                                   f"targets.self_output_file={tmp_path / 'so.jsonl'}"])
    summary = run_targets(meta, tmp_path / "reused.jsonl", reuse_cfg, progress=False, generator=gen)
    assert (tmp_path / "reused.jsonl").read_text() == (tmp_path / "fresh.jsonl").read_text()
    sampled = sum(r["generator"]["do_sample"] for r in so)  # regenerated answers: other decoding settings
    assert summary.reused == len(so) - len(twins) - sampled >= 1
    assert so_summary.written == len(so)

    with pytest.raises(ConfigError, match="not by label"):  # refused when the config is loaded
        load_config(TINY_CONFIG, common + ["targets.strategy=label",
                                           f"targets.self_output_file={tmp_path / 'so.jsonl'}"])
    with pytest.raises(JsonlError, match="no such file"):
        run_targets(meta, tmp_path / "x.jsonl", load_config(TINY_CONFIG, common + [
            "targets.strategy=minimum-change", f"targets.self_output_file={tmp_path / 'none.jsonl'}"]),
            progress=False, generator=gen)
    (tmp_path / "bad.jsonl").write_text('{"id": "clip0", "audio": "a.wav", "instruction": "x", "target": 3}\n')
    with pytest.raises(SpeechLLMError, match="bad.jsonl:1"):  # the CLI's exit 2 with this message
        run_targets(meta, tmp_path / "y.jsonl", load_config(TINY_CONFIG, common + [
            "targets.strategy=minimum-change", f"targets.self_output_file={tmp_path / 'bad.jsonl'}"]),
            progress=False, generator=gen)


def test_the_fidelity_probe_is_read_from_the_self_output_run_when_it_asked_the_same(tmp_path):
    """minimum-change probes the same teacher on the same descriptions as the self-output run
    beside it: it reads that run's fidelity file (no probe question asked) and writes the same
    counts; with anything asked differently (here: more probe questions) it asks again."""
    common = ["train.max_target_tokens=10", "targets.batch_size=4", "targets.target_nll=false",
              "targets.fidelity_probe=2"]
    meta = _metadata(tmp_path / "m.jsonl")
    so_cfg = load_config(TINY_CONFIG, common)
    gen = TextGenerator.from_config(so_cfg)
    run_targets(meta, tmp_path / "so.jsonl", so_cfg, progress=False, generator=gen)
    so_fidelity = json.loads((tmp_path / "so.fidelity.json").read_text())
    assert so_fidelity["attributes"]["gender"]["asked"] == 2 and len(so_fidelity["probe_digest"]) == 64

    asked = []
    real_generate = gen.generate

    def counting(prompts, *args, **kwargs):
        asked.extend(prompts)
        return real_generate(prompts, *args, **kwargs)

    gen.generate = counting
    reuse = common + ["targets.strategy=minimum-change", f"targets.self_output_file={tmp_path / 'so.jsonl'}"]
    summary = run_targets(meta, tmp_path / "mc.jsonl", load_config(TINY_CONFIG, reuse), progress=False, generator=gen)
    assert json.loads((tmp_path / "mc.fidelity.json").read_text()) == so_fidelity
    assert summary.fidelity.to_json()["attributes"] == so_fidelity["attributes"]
    # the records' own self-outputs come from the file too: only regenerated answers would be asked
    assert len(asked) == sum(json.loads(line)["generator"]["do_sample"]
                             for line in (tmp_path / "so.jsonl").read_text().splitlines())

    more = reuse[:-2] + ["targets.fidelity_probe=3", reuse[-2], reuse[-1]]
    asked.clear()
    summary = run_targets(meta, tmp_path / "mc3.jsonl", load_config(TINY_CONFIG, more), progress=False, generator=gen)
    assert summary.fidelity.asked["gender"] == 3 and len(asked) >= 3
