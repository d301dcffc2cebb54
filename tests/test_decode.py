"""Greedy decoding that drops finished sequences (speechllm/model/decode.py): the same answers as
transformers' `generate` for the text generator and the speech model, while later steps run fewer
rows; sampling still goes through `generate`."""

import dataclasses

import pytest
import torch

from speechllm.config import GenerationConfig, load_config
from speechllm.model import Example, build_model
from speechllm.model.generate import TextGenerator
from speechllm.model.prompt import PromptBuilder

from conftest import TINY_CONFIG

QUESTIONS = ["Hi.", "What is the speaker's gender, and how fast do they speak?", "Describe it.",
             "Is the voice loud or quiet? Answer in one word."]
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def generator():
    return TextGenerator.from_config(load_config(TINY_CONFIG, ["model.llm.system_prompt=Answer briefly."]))


def rows_per_forward(llm, monkeypatch) -> list[int]:
    """Records the batch rows of every forward pass of `llm`."""
    seen = []
    forward = llm.forward
    monkeypatch.setattr(llm, "forward", lambda *a, **k: seen.append(k["inputs_embeds"].shape[0]
                                                                       if k.get("inputs_embeds") is not None
                                                                       else k["input_ids"].shape[0])
                        or forward(*a, **k))
    return seen


def stops_at_different_steps(answers: list[list[int]]) -> list[int]:
    """Stop ids that end the answers at different steps: the third id of the first answer and
    the sixth of the second (ids that occur earlier in them are left out)."""
    first, second = answers[0], answers[1]
    return sorted({first[2], second[5]} - set(first[:2]) - set(second[:5]))


def test_text_answers_equal_generates_while_finished_sequences_leave_the_batch(generator, monkeypatch):
    prompts = [generator.prompt_ids(q) for q in QUESTIONS]
    old = GenerationConfig(max_new_tokens=NEW_TOKENS, drop_finished=False)
    free = generator.generate(prompts, old, batch_size=4, stop_ids=[-1])  # nothing stops: full answers
    answers = [generator.tokenizer(g.text, add_special_tokens=False)["input_ids"] for g in free]
    assert all(len(a) >= 6 for a in answers[:2])
    stop = stops_at_different_steps(answers)
    assert stop
    ref = generator.generate(prompts, old, batch_size=4, stop_ids=stop)
    seen = rows_per_forward(generator.llm, monkeypatch)
    got = generator.generate(prompts, dataclasses.replace(old, drop_finished=True), batch_size=4, stop_ids=stop)
    assert got == ref  # text, tokens before the stop and whether it stopped, per prompt
    assert any(g.finished for g in got) and sorted({g.tokens for g in got if g.finished}) != [0]
    assert seen[0] == len(prompts) and seen[-1] < seen[0]  # the finished ones left
    assert seen == sorted(seen, reverse=True)


def test_speech_answers_equal_generates_while_finished_sequences_leave_the_batch(sample_wav, monkeypatch):
    cfg = load_config(TINY_CONFIG)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    exs = [Example(q, sample_wav[: 16000 * (1 + i)], "unless to be rather cold hearted") for i, q in enumerate(QUESTIONS)]
    old = GenerationConfig(max_new_tokens=NEW_TOKENS, drop_finished=False)
    monkeypatch.setattr(PromptBuilder, "stop_ids", property(lambda self: [-1]))
    free = model.generate(exs, old)
    answers = [model.tokenizer(a, add_special_tokens=False)["input_ids"] for a in free]
    stop = stops_at_different_steps(answers)
    assert stop
    monkeypatch.setattr(PromptBuilder, "stop_ids", property(lambda self: stop))
    ref = model.generate(exs, old)
    seen = rows_per_forward(model.llm, monkeypatch)
    got = model.generate(exs, dataclasses.replace(old, drop_finished=True))
    assert got == ref
    assert len(seen) > 1 and seen[-1] < seen[0] == len(exs)
    assert got != free  # some answers were cut by the stop ids


def test_sampling_and_repetition_penalty_decode_with_generate():
    assert GenerationConfig().drops_finished
    assert not GenerationConfig(do_sample=True).drops_finished
    assert not GenerationConfig(repetition_penalty=1.2).drops_finished
    assert not GenerationConfig(drop_finished=False).drops_finished


def forwards(llm, monkeypatch) -> list[tuple[int, int]]:
    """Records (rows, positions) of every forward pass of `llm`."""
    seen = []
    forward = llm.forward
    monkeypatch.setattr(llm, "forward", lambda *a, **k: seen.append(tuple(
        (k["inputs_embeds"] if k.get("inputs_embeds") is not None else k["input_ids"]).shape[:2])) or forward(*a, **k))
    return seen


def joined_rows(seen: list[tuple[int, int]]) -> bool:
    """True when prompts were run (more than one position) after the first batch and then decoded
    beside rows already answering."""
    return any(n > 1 and seen[j + 1][0] > rows for j, (rows, n) in enumerate(seen[1:-1], start=1))


MORE_QUESTIONS = QUESTIONS + ["Say something about the weather today, please.", "Name a colour.",
                              "What is two plus two?", "Tell me about the recording in three words."]


def test_text_answers_with_freed_rows_refilled_equal_whole_batches(generator, monkeypatch):
    prompts = [generator.prompt_ids(q) for q in MORE_QUESTIONS]
    greedy = GenerationConfig(max_new_tokens=NEW_TOKENS)
    free = generator.generate(prompts, greedy, batch_size=len(prompts), stop_ids=[-1])
    order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), i))
    answers = [generator.tokenizer(free[i].text, add_special_tokens=False)["input_ids"] for i in order]
    stop = stops_at_different_steps(answers)  # the first two in length order stop at steps 3 and 6
    whole = generator.generate(prompts, greedy, batch_size=len(prompts), stop_ids=stop)
    kept = generator.generate(prompts, dataclasses.replace(greedy, drop_finished=False), batch_size=len(prompts),
                              stop_ids=stop)
    seen = forwards(generator.llm, monkeypatch)
    got = generator.generate(prompts, greedy, batch_size=2, stop_ids=stop)
    assert got == whole == kept
    assert any(g.finished for g in got) and any(not g.finished for g in got)
    assert joined_rows(seen), seen  # a freed row was filled while the other answered
    assert max(rows for rows, _ in seen) <= 2


def test_speech_answers_with_freed_rows_refilled_equal_whole_batches(sample_wav, monkeypatch):
    from speechllm.eval.answer import speech_answers
    from speechllm.model.decode import greedy_decode

    cfg = load_config(TINY_CONFIG)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    exs = [Example(q, sample_wav[: 8000 * (1 + i % 4)], "unless to be rather cold hearted")
           for i, q in enumerate(MORE_QUESTIONS)]
    greedy = GenerationConfig(max_new_tokens=NEW_TOKENS)
    with torch.no_grad():  # the generated ids themselves (decoded text need not tokenize back to them)
        batch = model.build_batch(exs, for_generation=True)
        free = greedy_decode(model.llm, batch.inputs_embeds, batch.full_attention_mask, NEW_TOKENS, [-1])
    stop = stops_at_different_steps([d.tokens for d in free])
    assert stop
    monkeypatch.setattr(PromptBuilder, "stop_ids", property(lambda self: stop))
    whole = model.generate(exs, greedy)
    seen = forwards(model.llm, monkeypatch)
    got = model.generate(exs, greedy, batch_size=2)
    assert got == whole
    assert joined_rows(seen), str(seen)
    assert max(rows for rows, _ in seen) <= 2
    with pytest.raises(ValueError, match="at least 1"):
        model.generate(exs, greedy, batch_size=0)
    assert model.generate([], greedy) == [] and speech_answers(model, [], greedy, 2) == []


def test_sampling_decodes_at_most_batch_size_at_once(generator, monkeypatch):
    prompts = [generator.prompt_ids(q) for q in MORE_QUESTIONS]
    seen = forwards(generator.llm, monkeypatch)
    out = generator.generate(prompts, GenerationConfig(max_new_tokens=3, do_sample=True), batch_size=3)
    assert len(out) == len(prompts) and {rows for rows, _ in seen} <= {3, 2}


def test_no_new_tokens_is_an_error(generator):
    from speechllm.model.decode import greedy_decode

    embeds = generator.llm.get_input_embeddings()(torch.tensor([generator.prompt_ids("Hi.")]))
    with pytest.raises(ValueError, match="max_new_tokens"):
        greedy_decode(generator.llm, embeds, torch.ones(embeds.shape[:2], dtype=torch.long), 0, [0])
