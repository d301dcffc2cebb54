"""Verifiable format constraints (Speech-IFEval / IFEval style): every kind's checker on positive,
negative and tricky responses; deterministic sampling; instruction texts naming their parameters."""

import random
import sys

import pytest

from speechllm.eval.constraints import (
    CONSTRAINTS,
    LANGUAGE_NAMES,
    Constraint,
    count_words,
    sample_constraint,
)

END = "Is there anything else I can help with?"

# kind, params, responses that follow it, responses that do not
CASES = [
    ("json_format", {},
     ['{"emotion": "sad", "gender": "female"}',
      '```json\n{"emotion": "sad"}\n```',
      '```\n[1, 2, 3]\n```',
      '  \n[{"a": 1}]\n '],
     ['The answer: {"emotion": "sad"}',
      '```json\n{"emotion": "sad"}\n```\nHope this helps.',
      '42', '"sad"', 'null',
      '{"emotion": "sad",}',
      '```json\n{"emotion": "sad"}']),
    ("lowercase", {},
     ["the speaker sounds calm, about 30 years old!", "ok: 1, 2, 3 -- done.", "ünïcode lower ß"],
     ["the speaker sounds Calm.", "I think so", "ÄRGER"]),
    ("uppercase", {},
     ["THE SPEAKER IS 30 YEARS OLD!", "HELLO 123, WORLD."],
     ["THE SPEAKER IS 30 YEARs OLD", "hello"]),
    ("double_quotes", {},
     ['"The speaker is happy."', '  \n"The speaker is happy."\n ', '"a"'],
     ['"The speaker is happy.', 'The speaker is happy."', '""', '"   "', '"', "\u201cHappy.\u201d",
      'Answer: "happy"']),
    ("end_phrase", {"phrase": END},
     [f"The speaker is sad. {END}", f"The speaker is sad. {END}  \n\n", f"sad.\n{END.lower()}"],
     [f"The speaker is sad. {END}.", f"{END} Bye.", "The speaker is sad.", f"x{END}"]),
    ("start_phrase", {"phrase": "My answer is"},
     ["My answer is yes.", "  \nmy answer is: sad", "My answer is"],
     ["Well, my answer is yes.", "My answer isn't clear.", "Sure."]),
    ("max_words", {"n": 5},
     ["one two three four", "one - two ... three, four!", "single"],
     ["one two three four five", "one two three four five six seven"]),
    ("min_words", {"n": 5},
     ["one two three four five", "one two three four five six"],
     ["one two three four", "one two three four - ... !!"]),
    ("no_commas", {},
     ["The speaker is sad. She sounds tired.", "Yes; no: maybe."],
     ["Yes, she is sad.", "是的\uff0c她很难过"]),
    ("bullet_points", {"n": 3},
     ["* one\n- two\n* three", "Intro:\n  * one\n  - two\n* three\nThat is all.", "- a\n- b\n- c"],
     ["* one\n* two", "* one\n- two\n* three\n- four", "**bold** line\n* one\n* two\n---\n***",
      "*one\n-two\n*three", "*\n-\n*"]),
    ("keyword", {"keyword": "cat"},
     ["I heard a cat meowing.", "CAT sounds everywhere", "the cat's bowl", "(cat)"],
     ["I read the catalog.", "Concatenate it.", "A dog barks.", "cats"]),
    ("title", {},
     ["<<poem of joy>>\nThe sun rises.", "Here: << Sad Song >> and more"],
     ["<<>>\nThe sun rises.", "<<   >> text", "<poem of joy>", "No title here."]),
    ("language", {"language": "de"},
     ["Der Sprecher klingt traurig und spricht sehr langsam über das Wetter in Berlin.",
      "Ich habe heute morgen einen Hund bellen gehört, und die Frau lachte laut."],
     ["The speaker sounds sad and talks very slowly about the weather in Berlin.",
      "I heard a dog barking this morning, and the woman laughed loudly.", "12345 !!!"]),
    ("language", {"language": "en"},
     ["The speaker sounds sad and talks very slowly about the weather in Berlin.",
      "I heard a dog barking this morning, and the woman laughed loudly."],
     ["Der Sprecher klingt traurig und spricht sehr langsam über das Wetter in Berlin.",
      "Le locuteur semble triste et parle très lentement de la météo à Paris."]),
]


def _ids(cases):
    return [f"{kind}-{'-'.join(map(str, p.values()))}" if p else kind for kind, p, *_ in cases]


def test_every_kind_has_cases():
    assert {k for k, *_ in CASES} == set(CONSTRAINTS)
    for kind, _, pos, neg in CASES:
        assert len(pos) >= 2 and len(neg) >= 2, kind


@pytest.mark.parametrize("kind,params,pos,neg", CASES, ids=_ids(CASES))
def test_checker(kind, params, pos, neg):
    c = Constraint(kind, params)
    for r in pos:
        assert c.check(r), f"{kind} should pass: {r!r}"
    for r in neg:
        assert not c.check(r), f"{kind} should fail: {r!r}"


@pytest.mark.parametrize("kind", sorted(CONSTRAINTS))
def test_blank_response_follows_nothing(kind):
    c = sample_constraint(kind, random.Random(0))
    assert not c.check("")
    assert not c.check("  \n\t ")


def test_count_words_drops_punctuation_only_tokens():
    assert count_words("well - it's 3 o'clock...") == 4
    assert count_words(" ... -- !! ") == 0
    assert count_words("a\tb\nc  d") == 4


@pytest.mark.parametrize("kind", sorted(CONSTRAINTS))
def test_sample_is_deterministic(kind):
    a = [sample_constraint(kind, random.Random(seed)) for seed in range(20)]
    b = [sample_constraint(kind, random.Random(seed)) for seed in range(20)]
    assert a == b
    assert [c.instruction() for c in a] == [c.instruction() for c in b]
    if CONSTRAINTS[kind].param_names:  # parameters actually vary with the seed
        assert len({repr(c.params) for c in a}) > 1


@pytest.mark.parametrize("kind", sorted(CONSTRAINTS))
def test_instruction_mentions_parameters(kind):
    for seed in range(10):
        c = sample_constraint(kind, random.Random(seed))
        text = c.instruction()
        assert text.strip() and text[0].isupper()
        for name, value in c.params.items():
            shown = LANGUAGE_NAMES[value] if name == "language" else str(value)
            assert shown in text, (kind, c.params, text)


def test_instruction_texts():
    assert Constraint("max_words", {"n": 40}).instruction() == "Answer with fewer than 40 words."
    assert Constraint("keyword", {"keyword": "tone"}).instruction() == 'Include the keyword "tone" in your response.'
    assert Constraint("language", {"language": "de"}).instruction() == (
        "Your ENTIRE response should be in German language, no other language is allowed.")
    assert Constraint("end_phrase", {"phrase": END}).instruction() == (
        f"Finish your response with this exact phrase: {END} No other words should follow this phrase.")
    assert "* This is a point." in Constraint("bullet_points", {"n": 3}).instruction()


def test_sampled_constraint_can_be_followed():
    """The instruction's own example satisfies a sampled constraint of each simple kind."""
    rng = random.Random(1)
    c = sample_constraint("end_phrase", rng)
    assert c.check("Done. " + c.params["phrase"])
    c = sample_constraint("bullet_points", rng)
    assert c.check("\n".join(["* This is a point."] * c.params["n"]))


def test_bad_constraints_are_rejected():
    with pytest.raises(ValueError, match="unknown constraint kind"):
        Constraint("rhyme", {})
    with pytest.raises(ValueError, match="takes parameters"):
        Constraint("max_words", {})
    with pytest.raises(ValueError, match="takes parameters"):
        Constraint("lowercase", {"n": 3})
    with pytest.raises(ValueError, match="unknown constraint kind"):
        sample_constraint("rhyme", random.Random(0))


def test_round_trip_dict():
    c = sample_constraint("keyword", random.Random(3))
    assert Constraint.from_dict(c.to_dict()) == c


def test_language_without_langdetect_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "langdetect", None)
    with pytest.raises(ImportError, match="pip install langdetect"):
        Constraint("language", {"language": "en"}).check("Hello there, how are you today?")
