"""Target perplexity on the tiny model: the batched, padded NLL equals a direct per-record
computation; the sidecar makes a finished file free and a killed run resume; a changed file is
scored again; a minimum-change file takes the values of the self-output records it kept; the
model's own greedy answers are more probable to it than label sentences."""

import json

import pytest
import torch

from conftest import TINY_CONFIG

from speechllm.config import GenerationConfig, load_config
from speechllm.model.generate import TextGenerator
from speechllm.model.prompt import description_prompt
from speechllm.model.prefix import prompt_prefix_length
from speechllm.targets import nll as nll_module
from speechllm.targets.nll import NLLError, nll_path, target_nll

DESCRIPTIONS = ['[00:00-00:03] "the bus was full" (Gender: Male, Pitch: Low)',
                '[00:00-00:05] "we walked home in the rain instead" (Gender: Female, Pitch: High)',
                '[00:00-00:02] "yes" (Gender: Female, Pitch: Normal, Volume: Loud)']
TARGETS = ["The speaker is male.", "A woman says that they walked home in the rain instead of taking the bus.",
           "Yes.", "The recording contains a woman speaking with a high-pitched voice.", "It was cut off here and"]


def cfg(*more):
    return load_config(TINY_CONFIG, ["targets.batch_size=2", *more])


@pytest.fixture(scope="module")
def generator():
    return TextGenerator.from_config(cfg())


def target_records(targets=TARGETS):
    return [{"id": f"r{i}", "audio": "a.wav", "description": DESCRIPTIONS[i % 3], "instruction": "What can you hear?",
             "target": t, "truncated": i == len(targets) - 1} for i, t in enumerate(targets)]


def write_targets(path, targets=TARGETS):
    recs = target_records(targets)
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return recs


def direct(generator, recs):
    """(summed NLL, tokens) of each record, one record at a time, unpadded."""
    out = []
    for r in recs:
        prompt = generator.prompt_ids(description_prompt(r["description"], r["instruction"]))
        target = generator.prompt.target(r["target"], complete=not r["truncated"])
        with torch.no_grad():
            logits = generator.llm(input_ids=torch.tensor([prompt + target])).logits[0]
        logp = logits[len(prompt) - 1: -1].float().log_softmax(-1)
        out.append((-float(logp.gather(-1, torch.tensor(target)[:, None]).sum()), len(target)))
    return out


def test_batched_nll_equals_the_direct_computation(tmp_path, generator):
    recs = write_targets(tmp_path / "t.jsonl")
    result = target_nll(tmp_path / "t.jsonl", cfg(), progress=False, generator=generator)
    per = direct(generator, recs)
    assert result["records"] == 5 and result["tokens"] == sum(n for _, n in per)
    assert result["nll"] == pytest.approx(sum(s for s, _ in per) / result["tokens"], rel=1e-4)
    # the truncated target is scored without its end-of-turn, the others with it
    assert per[-1][1] == len(generator.prompt.text(TARGETS[-1]))
    saved = json.loads(nll_path(tmp_path / "t.jsonl").read_text())
    assert saved["complete"] and saved["nll"] == result["nll"]
    assert saved["record_nll"] == pytest.approx([s for s, _ in per], rel=1e-4)
    # the prompts share their first ids (template, system prompt): the shared-prefix path was taken
    prompts = [generator.prompt_ids(description_prompt(r["description"], r["instruction"])) for r in recs]
    assert prompt_prefix_length(prompts) > 0


def test_token_nll_runs_a_given_prefix_itself_and_rejects_one_that_does_not_start_every_prompt(generator):
    recs = target_records()
    pairs = [nll_module.scored_pair(generator.prompt, r["description"], r["instruction"], r["target"],
                                    not r["truncated"]) for r in recs]
    per = direct(generator, recs)
    shared = nll_module.pairs_prefix(pairs)
    assert len(shared) > 3
    for prefix in (None, shared, shared[:3], []):  # found, given without its KV (whole or part), none
        sums = [float(t.sum()) for t in nll_module.token_nll(generator.llm, generator.pad_id, pairs, 2, prefix)]
        assert sums == pytest.approx([s for s, _ in per], rel=1e-4)
    with pytest.raises(ValueError, match="must start every prompt"):
        nll_module.token_nll(generator.llm, generator.pad_id, pairs, 2, [shared[0] + 1] + shared[1:])
    with pytest.raises(ValueError, match="at least one id of its own"):
        nll_module.token_nll(generator.llm, generator.pad_id, pairs[:1], 2, pairs[0][0])


def test_records_kept_from_the_self_output_file_take_its_values(tmp_path, generator, monkeypatch):
    """Minimum-change targets are mostly the self-outputs unchanged: those records are not scored
    again; the file's NLL equals scoring it from scratch. A self-output file edited after its
    scoring (stale sidecar) lends nothing."""
    write_targets(tmp_path / "so.jsonl")
    target_nll(tmp_path / "so.jsonl", cfg(), progress=False, generator=generator)
    edited = TARGETS[:2] + ["The speaker is female.", *TARGETS[3:]]
    write_targets(tmp_path / "mc.jsonl", edited)
    write_targets(tmp_path / "alone.jsonl", edited)
    scratch = target_nll(tmp_path / "alone.jsonl", cfg(), progress=False, generator=generator)
    scored = []
    real = nll_module._batch_token_nll
    monkeypatch.setattr(nll_module, "_batch_token_nll", lambda llm, pad, pairs, *a: scored.extend(pairs) or real(llm, pad, pairs, *a))
    minimum_change = cfg("targets.strategy=minimum-change", f"targets.self_output_file={tmp_path / 'so.jsonl'}")
    result = target_nll(tmp_path / "mc.jsonl", minimum_change, progress=False, generator=generator)
    assert len(scored) == 1 and result["tokens"] == scratch["tokens"]
    assert result["nll"] == pytest.approx(scratch["nll"], rel=1e-5)
    write_targets(tmp_path / "so.jsonl", TARGETS[:4])  # edited after scoring: its sidecar is stale
    scored.clear()
    nll_path(tmp_path / "mc.jsonl").unlink()
    assert target_nll(tmp_path / "mc.jsonl", minimum_change, progress=False, generator=generator) == pytest.approx(result)
    assert len(scored) == 5


def test_the_sidecar_resumes_and_a_changed_file_is_scored_again(tmp_path, generator, monkeypatch):
    recs = write_targets(tmp_path / "t.jsonl")
    full = target_nll(tmp_path / "t.jsonl", cfg(), progress=False, generator=generator)

    def no_llm(*a, **k):
        raise AssertionError("a finished file loaded the LLM")

    monkeypatch.setattr(TextGenerator, "from_config", no_llm)
    assert target_nll(tmp_path / "t.jsonl", cfg(), progress=False) == full
    # killed after two records: the rest is scored, the first two are not again
    path = nll_path(tmp_path / "t.jsonl")
    saved = json.loads(path.read_text())
    first = direct(generator, recs[:2])
    saved.update(tokens=sum(n for _, n in first), complete=False, record_nll=[s for s, _ in first])
    for key in ("nll", "records"):
        saved.pop(key)
    path.write_text(json.dumps(saved))
    scored, real = [], nll_module._batch_token_nll
    monkeypatch.setattr(nll_module, "_batch_token_nll", lambda llm, pad, pairs, *a: scored.extend(pairs) or real(llm, pad, pairs, *a))
    resumed = target_nll(tmp_path / "t.jsonl", cfg(), progress=False, generator=generator)
    assert len(scored) == 3
    assert resumed["tokens"] == full["tokens"] and resumed["nll"] == pytest.approx(full["nll"], rel=1e-5)
    assert json.loads(path.read_text())["record_nll"] == pytest.approx([s for s, _ in direct(generator, recs)], rel=1e-4)
    # a damaged sidecar (a sum that is not a number) is scored afresh, not a traceback
    damaged = json.loads(path.read_text())
    damaged["record_nll"][0] = "x"
    path.write_text(json.dumps(damaged))
    assert target_nll(tmp_path / "t.jsonl", cfg(), progress=False, generator=generator) == pytest.approx(resumed)
    assert len(scored) == 3 + 5
    write_targets(tmp_path / "t.jsonl", TARGETS[:3])  # other content: scored afresh
    again = target_nll(tmp_path / "t.jsonl", cfg(), progress=False, generator=generator)
    assert again["records"] == 3


def test_a_record_without_description_is_an_error_naming_the_line(tmp_path, generator):
    write_targets(tmp_path / "t.jsonl")
    lines = (tmp_path / "t.jsonl").read_text().splitlines()
    rec = json.loads(lines[1])
    rec["description"] = ""
    lines[1] = json.dumps(rec)
    (tmp_path / "t.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(NLLError, match=r"t\.jsonl:2: no description"):
        target_nll(tmp_path / "t.jsonl", cfg(), progress=False, generator=generator)


def test_own_greedy_answers_are_more_probable_than_label_sentences(tmp_path, generator):
    """The self-output effect at tiny size: greedy answers take the most probable token at every
    step, so the model finds them more probable than label sentences of the same token length."""
    gens = generator.generate([generator.prompt_ids(description_prompt(d, "What can you hear?")) for d in DESCRIPTIONS],
                              GenerationConfig(max_new_tokens=12), batch_size=3)
    labels = ["The recording contains a man speaking with a low-pitched voice. The speaker says: \"the bus was full\"",
              "The recording contains a woman speaking with a high-pitched voice. The speaker says: \"we walked\"",
              "The recording contains a woman speaking loudly, in a normal-pitched voice. The speaker says: \"yes\""]
    own = [{"id": f"o{i}", "audio": "a.wav", "description": d, "instruction": "What can you hear?", "target": g.text,
            "truncated": True} for i, (d, g) in enumerate(zip(DESCRIPTIONS, gens))]
    lengths = [len(generator.prompt.target(r["target"], complete=False)) for r in own]
    label_ids = [generator.prompt.text(t)[:n] for t, n in zip(labels, lengths)]
    assert [len(ids) for ids in label_ids] == lengths  # the same number of tokens scored
    other = [{**r, "id": f"l{i}", "target": generator.tokenizer.decode(ids)}
             for i, (r, ids) in enumerate(zip(own, label_ids))]
    for name, recs in (("own", own), ("label", other)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    ours = target_nll(tmp_path / "own.jsonl", cfg(), progress=False, generator=generator)
    theirs = target_nll(tmp_path / "label.jsonl", cfg(), progress=False, generator=generator)
    assert ours["nll"] < theirs["nll"]
