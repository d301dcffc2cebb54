"""The shared prompt prefix computed once (speechllm/model/prefix.py): logits, greedy answers,
losses and gradients equal the whole-sequence path, for the text generator and the speech model,
with prompts of different lengths; with LoRA the prefix carries gradients."""

import dataclasses

import pytest
import torch

from speechllm.config import GenerationConfig, LoRAConfig, load_config
from speechllm.model import Example, build_model
from speechllm.model.generate import TextGenerator
from speechllm.model.lora import apply_lora
from speechllm.model.prefix import expand_cache, prefix_cache, rest_positions, shared_prefix_length, with_prefix_mask

from conftest import TINY_CONFIG

SYSTEM = "You are a helpful assistant. Answer briefly."
"""The demo's system prompt: part of every prompt's shared prefix."""
QUESTIONS = ["Hi.", "What is the speaker's gender, and how fast do they speak?", "Describe it.",
             "Is the voice loud or quiet? Answer in one word, please, and then explain why in a sentence."]
ATOL = 1e-4
"""Float tolerance of logits between the two paths (different matrix shapes round differently)."""


@pytest.fixture(scope="module")
def cfg():
    return load_config(TINY_CONFIG, [f"model.llm.system_prompt={SYSTEM}"])


@pytest.fixture(scope="module")
def generator(cfg):
    return TextGenerator.from_config(cfg)


@pytest.fixture()
def model(cfg):
    torch.manual_seed(0)
    return build_model(cfg)


def speech_examples(wav):
    return [Example("What can you hear?", wav, "unless to be rather cold hearted", "A man reads aloud."),
            Example("Is the voice loud?", wav[: 16000 + 160 * 3], None, "No."),
            Example("Who speaks, a man or a woman? Say which.", wav[:40000], "cold", "A man."),
            Example("Say hello.", None, None, "Hello!")]


def test_shared_prefix_length_stops_at_the_first_difference_and_the_limit():
    assert shared_prefix_length([[1, 2, 3, 4], [1, 2, 5], [1, 2, 3]], limit=10) == 2
    assert shared_prefix_length([[1, 2, 3], [1, 2, 3]], limit=2) == 2
    assert shared_prefix_length([[1, 2, 3]], limit=3) == 0  # one sequence: nothing to share
    assert shared_prefix_length([[7, 2], [1, 2]], limit=2) == 0


def test_text_logits_with_the_prefix_computed_once_equal_left_padded_prompts(generator):
    llm = generator.llm
    prompts = [generator.prompt_ids(q) for q in QUESTIONS]
    n = shared_prefix_length(prompts, min(map(len, prompts)) - 1)
    assert n >= len(generator.prompt.tokenizer(SYSTEM)["input_ids"])  # the system prompt is shared
    width = max(map(len, prompts))
    pad = generator.pad_id
    whole = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    whole_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    rest = torch.tensor([[pad] * (width - len(p)) + p[n:] for p in prompts])  # middle padding
    rest_mask = torch.tensor([[0] * (width - len(p)) + [1] * (len(p) - n) for p in prompts])
    full_mask = with_prefix_mask(n, rest_mask)
    with torch.no_grad():
        ref = llm(input_ids=whole, attention_mask=whole_mask).logits
        got = llm(input_ids=rest, attention_mask=full_mask, position_ids=rest_positions(full_mask, n),
                  cache=expand_cache(llm, prefix_cache(llm, prompts[0][:n]), len(prompts))).logits
    for row, p in enumerate(prompts):
        k = len(p) - n  # the real positions after the prefix are the last k of both layouts
        torch.testing.assert_close(got[row, -k:], ref[row, -k:], atol=ATOL, rtol=0)


def test_text_generator_answers_equal_with_and_without_reuse(generator):
    prompts = [generator.prompt_ids(q) for q in QUESTIONS + QUESTIONS[:2]]
    greedy = GenerationConfig(max_new_tokens=6)
    reused = generator.generate(prompts, greedy, batch_size=4)  # two batches share one prefix cache
    whole = generator.generate(prompts, dataclasses.replace(greedy, reuse_prefix=False), batch_size=4)
    alone = [generator.generate([p], greedy, batch_size=1)[0] for p in prompts[:len(QUESTIONS)]]
    assert [g.text for g in reused] == [g.text for g in whole]
    assert [g.text for g in reused[:len(QUESTIONS)]] == [g.text for g in alone]
    assert [g.tokens for g in reused] == [g.tokens for g in whole]
    sampled = dataclasses.replace(greedy, do_sample=True, seed=3)
    assert ([g.text for g in generator.generate(prompts, sampled, batch_size=4)]
            == [g.text for g in generator.generate(prompts, dataclasses.replace(sampled, reuse_prefix=False), 4)])


def test_speech_batch_takes_the_template_head_as_prefix_and_pads_after_it(model, sample_wav):
    exs = speech_examples(sample_wav)
    batch = model.build_batch(exs[:3], for_generation=True, reuse_prefix=True)
    assert batch.prefix_ids == model.prompt.prefix_ids + model.prompt.audio_start_ids
    whole = model.build_batch(exs[:3], for_generation=True)
    assert whole.prefix_ids == []
    assert torch.equal(batch.full_attention_mask.sum(1), whole.attention_mask.sum(1))
    assert batch.full_attention_mask[:, : len(batch.prefix_ids)].all()
    short = int(whole.attention_mask.sum(1).argmin())
    assert batch.full_attention_mask[short, len(batch.prefix_ids)] == 0  # padding sits after the prefix


def test_speech_generation_logits_and_answers_equal_with_and_without_reuse(model, sample_wav):
    exs = speech_examples(sample_wav)
    reuse = model.build_batch(exs, for_generation=True, reuse_prefix=True)
    whole = model.build_batch(exs, for_generation=True)
    n = len(reuse.prefix_ids)
    assert n > 0
    mask = reuse.full_attention_mask
    with torch.no_grad():
        ref = model.llm(inputs_embeds=whole.inputs_embeds, attention_mask=whole.attention_mask).logits
        got = model.llm(inputs_embeds=reuse.inputs_embeds, attention_mask=mask, cache=model._prefix_cache(reuse),
                        position_ids=rest_positions(mask, n)).logits
    for row in range(len(exs)):
        k = int(reuse.attention_mask[row].sum())
        torch.testing.assert_close(got[row, -k:], ref[row, -k:], atol=ATOL, rtol=0)
    greedy = GenerationConfig(max_new_tokens=8)
    answers = model.generate(exs, greedy)
    assert answers == model.generate(exs, dataclasses.replace(greedy, reuse_prefix=False))
    assert answers == [model.generate([ex], greedy)[0] for ex in exs]


def test_training_loss_and_gradients_equal_with_and_without_reuse(model, sample_wav):
    exs = speech_examples(sample_wav)
    assert model.build_batch(exs, reuse_prefix=True).prefix_ids  # the prefix path is taken

    def loss_and_grads(reuse: bool):
        model.zero_grad()
        loss = model(exs, reuse_prefix=reuse)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    loss, grads = loss_and_grads(True)
    ref_loss, ref_grads = loss_and_grads(False)
    torch.testing.assert_close(loss, ref_loss, atol=ATOL, rtol=0)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, atol=ATOL, rtol=1e-4)


def test_a_frozen_llms_prefix_runs_once_across_steps_until_its_weights_change(model, sample_wav):
    exs = speech_examples(sample_wav)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(3):  # training steps: the adapter changes, the frozen LLM does not
        opt.zero_grad()
        model(exs, reuse_prefix=True).backward()
        opt.step()
    assert model.prefixes.computed == 1
    with torch.no_grad():
        torch.testing.assert_close(model(exs, reuse_prefix=True), model(exs), atol=ATOL, rtol=0)
        model.llm.get_decoder().layers[0].self_attn.k_proj.weight.mul_(1.5)  # an in-place edit
        changed = model(exs, reuse_prefix=True)
    assert model.prefixes.computed == 2
    with torch.no_grad():
        torch.testing.assert_close(changed, model(exs), atol=ATOL, rtol=0)  # the edit is seen, not stale
    apply_lora(model, LoRAConfig(enabled=True, dropout=0.0))  # trainable weights: every call runs it
    with torch.no_grad():
        model(exs, reuse_prefix=True), model(exs, reuse_prefix=True)
    assert model.prefixes.computed == 4


def test_with_lora_the_prefix_carries_gradients_into_lora(model, sample_wav):
    apply_lora(model, LoRAConfig(enabled=True, dropout=0.0))
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # peft starts B at zero; make the prefix's values depend on LoRA
            torch.nn.init.normal_(p, std=0.5)
    model.llm.train()
    exs = speech_examples(sample_wav)
    assert model.build_batch(exs, reuse_prefix=True).prefix_ids

    def lora_grads(reuse: bool):
        model.zero_grad()
        model(exs, reuse_prefix=reuse).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if "lora_" in n}

    reused, ref = lora_grads(True), lora_grads(False)
    assert any(float(g.abs().max()) > 1e-3 for g in ref.values())
    for name, grad in ref.items():
        torch.testing.assert_close(reused[name], grad, atol=ATOL, rtol=1e-4)


def test_with_lora_dropout_training_each_sequence_runs_its_own_prefix(model, sample_wav):
    apply_lora(model, LoRAConfig(enabled=True, dropout=0.1))
    exs = speech_examples(sample_wav)
    model.llm.train()
    assert model.build_batch(exs, reuse_prefix=True).prefix_ids == []
    model.llm.eval()
    assert model.build_batch(exs, reuse_prefix=True).prefix_ids


def test_default_lora_training_shares_the_prefix(model, sample_wav):
    apply_lora(model, LoRAConfig(enabled=True))  # dropout 0 by default: no per-sequence mask
    model.llm.train()
    assert model.build_batch(speech_examples(sample_wav), reuse_prefix=True).prefix_ids


def test_speech_answers_batch_examples_of_similar_llm_length(model, sample_wav, monkeypatch):
    from speechllm.eval.answer import speech_answers

    # the Q-Former gives every clip the same audio positions: the text decides the length, not the clip
    exs = [Example("Hi?", sample_wav), Example(" ".join(["Describe the voice in detail."] * 6), sample_wav[:20000]),
           Example("Who?", sample_wav[:24000]), Example(" ".join(["Is it loud or quiet?"] * 6), sample_wav)]
    batches = []
    real = type(model).build_batch
    monkeypatch.setattr(type(model), "build_batch", lambda self, b, *a, **k: batches.append(b) or real(self, b, *a, **k))
    answers = speech_answers(model, exs, GenerationConfig(max_new_tokens=2), batch_size=2)
    assert [{ex.instruction for ex in b} for b in batches] == [{"Hi?", "Who?"},
                                                              {exs[1].instruction, exs[3].instruction}]
    assert answers == [model.generate([ex], GenerationConfig(max_new_tokens=2))[0] for ex in exs]


def test_a_prefix_reaching_into_shared_text_equals_the_whole_path(model):
    # text-only examples with one transcript: the shared ids run past the template head
    exs = [Example("What is said?", None, "unless to be rather cold hearted", "Cold."),
           Example("Repeat it, word for word.", None, "unless to be rather cold hearted", "Unless to be.")]
    batch = model.build_batch(exs, reuse_prefix=True)
    assert len(batch.prefix_ids) > len(model.prompt.prefix_ids)
    with torch.no_grad():
        torch.testing.assert_close(model(batch), model(model.build_batch(exs)), atol=ATOL, rtol=0)
    greedy = GenerationConfig(max_new_tokens=6)
    assert model.generate(exs, greedy) == model.generate(exs, dataclasses.replace(greedy, reuse_prefix=False))


def test_the_cache_keyword_follows_the_models_forward():
    """transformers 5.2x takes the KV cache as `cache`, earlier 5.x releases as `past_key_values`
    (the first GPU run, on 5.17, failed on it): the name comes from the decoder's signature."""
    from torch import nn

    from speechllm.model.prefix import cache_kwarg

    class OldDecoder(nn.Module):
        def forward(self, input_ids=None, past_key_values=None, use_cache=None):
            return input_ids

    class OldLLM(nn.Module):
        def get_decoder(self):
            return OldDecoder()

    assert cache_kwarg(OldLLM()) == "past_key_values"


def test_merged_lora_answers_as_the_lora_model_and_cannot_be_saved(model, sample_wav, tmp_path):
    """Evaluation, chat and serve fold LoRA into the LLM (`merge_lora`): the same logits within
    float tolerance and the same greedy answers, and no checkpoint can be written from it."""
    apply_lora(model, LoRAConfig(r=4, alpha=8, dropout=0.0))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.llm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)  # B starts at 0 (identity): make LoRA change the answers
    model.eval()
    examples = [Example(e.instruction, e.audio, e.transcript) for e in speech_examples(sample_wav)]
    gen = GenerationConfig(max_new_tokens=6)
    batch = model.build_batch(examples, for_generation=True)
    before = model.llm(inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask).logits
    answers = model.generate(examples, gen)
    assert model.merge_lora() is model and model.lora_merged and model.lora is not None
    assert not any("lora" in n for n, _ in model.llm.named_parameters())
    after = model.llm(inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask).logits
    torch.testing.assert_close(after, before, atol=ATOL, rtol=0)
    assert model.generate(examples, gen) == answers
    with pytest.raises(ValueError, match="merged"):
        model.save_pretrained(tmp_path / "ckpt")


def test_merging_is_seen_by_what_was_kept_from_the_weights_before_it(model, sample_wav):
    """peft's merge writes W + BA through `.data`, which moves neither a weight's storage nor its
    version counter; `merge_lora` bumps the counters, so what was kept while the LLM was frozen (the
    prefix's KV, packed weights) is made again rather than reused."""
    examples = [Example(e.instruction, e.audio, e.transcript) for e in speech_examples(sample_wav)]
    gen = GenerationConfig(max_new_tokens=6)
    base = model.eval().generate(examples, gen)  # the frozen LLM's prefix (and packed weights) kept
    apply_lora(model, LoRAConfig(r=4, alpha=8, dropout=0.0))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.llm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    lora = model.generate(examples, gen)
    assert lora != base
    model.merge_lora()
    assert model.generate(examples, gen) == lora
    unpacked = dataclasses.replace(gen, packed_weights=False)
    assert model.generate(examples, unpacked) == lora
