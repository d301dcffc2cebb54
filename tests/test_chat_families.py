"""The prompt builder on the chat templates of the LLM families people train with.

Each family's real chat template (tests/fixtures/chat_templates/, with its source) runs on a small
tokenizer built here with that family's special tokens and kind of pre-tokenization; the slow tier
repeats every check on the real tokenizers that registry packages ship (pinned by sha256): Llama 3's
(tiktoken ranks inside llama-models' wheel, for Llama 3 and 3.1), Mistral's v1 and v3 SentencePiece
models (inside mistral-common's wheel) and SmolLM2's (the embedded GGUF). For every family: the audio slot sits inside the
user turn, a prompt without audio has exactly the ids of the family's own
`apply_chat_template(..., tokenize=True)`, the end-of-turn and stop ids are the family's, and
control strings in transcripts and instructions stay text.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import pytest

from conftest import ROOT

TEMPLATES = ROOT / "tests" / "fixtures" / "chat_templates"
FAMILIES = sorted(p.stem for p in TEMPLATES.glob("*.json"))
VOCAB = 700
"""BPE vocabulary of a built tokenizer (specials included)."""
SPLIT_PATTERNS = {
    "bytelevel-llama3": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                        r"|\s*[\r\n]+|\s+(?!\S)|\s+",
    "bytelevel-qwen2": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                       r"|\s*[\r\n]+|\s+(?!\S)|\s+",
}
"""Pre-tokenizer split patterns of the byte-level families (from their tokenizer.json files)."""
CORPUS = [
    "What can you hear in the audio? Describe the speaker's voice.",
    "The speaker is a woman with a high pitch, speaking fast. The recording is clean.",
    "Gender: Female, Pitch: High, Speaking speed: Fast, Volume: Normal, Noise: Clean",
    "unless to be rather cold hearted and rather selfish is to be ill disposed",
    "You are a helpful assistant. Answer briefly and in English.",
    "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n",
    "system user assistant model [INST] [/INST] <start_audio> <end_audio> 0123456789",
]
INSTRUCTION = "What can you hear in the audio?"
TRANSCRIPT = "he might even have been made amiable himself"
SYSTEM = "You are a helpful assistant. Answer briefly."


def family(name: str) -> dict:
    return json.loads((TEMPLATES / f"{name}.json").read_text(encoding="utf-8"))


def build_tokenizer(spec: dict):
    """A small tokenizer with the family's special tokens, pre-tokenization and chat template."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    style = spec["style"]
    rendered = [spec["chat_template"]] + CORPUS
    if style.startswith("bytelevel"):
        tok = Tokenizer(models.BPE())
        if style in SPLIT_PATTERNS:
            tok.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Split(Regex(SPLIT_PATTERNS[style]), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        else:
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        tok = Tokenizer(models.BPE(byte_fallback=True, unk_token=spec["unk"]))
        if style == "gemma":  # spaces become "▁", no prefix space, no pre-tokenization (Gemma's tokenizer.json)
            tok.normalizer = normalizers.Replace(" ", "\u2581")
            tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
        else:  # Llama-2 style SentencePiece: a prefix space on the first piece
            tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
            tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
        alphabet = sorted(set("".join(rendered)) | set(string.printable) | {"\u2581"})
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=spec["specials"], initial_alphabet=alphabet,
                                  show_progress=False)
    tok.train_from_iterator(rendered * 2, trainer=trainer)
    if spec["added_text"]:
        tok.add_tokens(spec["added_text"])
    roles = {k: spec[k] for k in ("bos", "eos", "pad", "unk") if spec[k] is not None}
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **{f"{k}_token": v for k, v in roles.items()})
    fast.chat_template = spec["chat_template"]
    return fast


LLAMA3_SPECIALS = (["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                    "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>",
                    "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>", "<|image|>"]
                   + [f"<|reserved_special_token_{i}|>" for i in range(2, 246)])
"""Llama 3's 256 special tokens after its 128000 BPE ranks, in id order (llama_models/llama3/tokenizer.py)."""


def _sentencepiece(folder: Path, spec: dict):
    from transformers import LlamaTokenizer

    return LlamaTokenizer.from_pretrained(folder, legacy=False, add_bos_token=False)


def _tiktoken(folder: Path, spec: dict):
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    converted = TikTokenConverter(vocab_file=str(folder / "tokenizer.model"), pattern=SPLIT_PATTERNS["bytelevel-llama3"],
                                  extra_special_tokens=LLAMA3_SPECIALS).converted()
    return PreTrainedTokenizerFast(tokenizer_object=converted, bos_token=spec["bos"], eos_token=spec["eos"])


def _pinned(requirement: str, member: str, sha256: str, size: int):
    from speechllm.hub.weights import SourceFile

    return SourceFile(requirement, member, sha256, size)


LLAMA3_MODEL = ("llama-models==0.3.0", "llama_models/llama3/tokenizer.model",
                "82e9d31979e92ab929cd544440f129d9ecd797b69e327f80f17e1c50d5551b55", 2183982)
REAL_TOKENIZERS = {
    "llama3": (LLAMA3_MODEL, _tiktoken),
    "llama3.1": (LLAMA3_MODEL, _tiktoken),
    "mistral-v0.1": (("mistral-common==1.12.0", "mistral_common/data/tokenizer.model.v1",
                      "dadfd56d766715c61d2ef780a525ab43b8e6da4de6865bda3d95fdef5e134055", 493443), _sentencepiece),
    "mistral-v0.3": (("mistral-common==1.12.0", "mistral_common/data/mistral_instruct_tokenizer_240323.model.v3",
                      "9addc8bdce5988448ae81b729336f43a81262160ae8da760674badab9d4c7d33", 587591), _sentencepiece),
    "smollm2": (None, None),
}
"""Families whose real tokenizer a registry package ships, pinned by sha256: Meta's Llama 3
tiktoken ranks inside llama-models' wheel (converted with transformers' TikTokenConverter), the
SentencePiece models of Mistral-7B v0.1 and v0.3 (with the control tokens [INST] ...) inside
mistral-common's wheel, and the embedded SmolLM2."""


def real_tokenizer(name: str, spec: dict):
    """The family's real tokenizer with its chat template from the fixture."""
    from transformers import AutoTokenizer

    from speechllm.hub import weights

    source, load = REAL_TOKENIZERS[name]
    if source is None:
        tok = AutoTokenizer.from_pretrained(weights.resolve("smollm2-135m-instruct"))
        assert tok.chat_template == spec["chat_template"]
        return tok
    folder = weights.home() / "test-tokenizers" / source[0].split("==")[0] / Path(source[1]).name
    weights.fetch_file(_pinned(*source), folder / "tokenizer.model")
    tok = load(folder, spec)
    tok.chat_template = spec["chat_template"]
    return tok


@pytest.fixture(scope="module", params=FAMILIES + [pytest.param(f"{name}:real", marks=pytest.mark.slow)
                                                   for name in REAL_TOKENIZERS])
def fam(request):
    name, _, real = request.param.partition(":")
    spec = family(name)
    return spec, (real_tokenizer(name, spec) if real else build_tokenizer(spec))


def template_ids(tok, messages: list[dict], spec: dict) -> list[int]:
    """The family's own `apply_chat_template(..., tokenize=True)` ids of a conversation (Qwen3
    in its no-thinking mode, the mode the builder's prompts end in)."""
    extra = {"enable_thinking": False} if spec["family"] == "qwen3" else {}
    out = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, **extra)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def builder(tok, system=None, **prompt):
    from speechllm.config import PromptConfig
    from speechllm.model.prompt import PromptBuilder

    return PromptBuilder(tok, PromptConfig(**prompt), system)


def joined(pieces) -> list[int]:
    return pieces.before_audio + pieces.after_audio


def test_every_family_is_tested():
    assert {"llama3", "llama3.1", "qwen2.5", "qwen3", "gemma2", "gemma3", "mistral-v0.1", "mistral-v0.3", "phi3",
            "smollm2"} <= set(FAMILIES)


def test_without_audio_the_ids_are_the_familys_own(fam):
    spec, tok = fam
    for instruction in (INSTRUCTION, "Answer in JSON: is the voice high or low?", "describe it\nin two words"):
        ids = joined(builder(tok).pieces(instruction, None, has_audio=False))
        assert ids == template_ids(tok, [{"role": "user", "content": instruction}], spec), spec["family"]


def test_a_system_prompt_is_native_or_folded_into_the_user_turn(fam, capsys):
    from jinja2 import TemplateError

    spec, tok = fam
    b = builder(tok, SYSTEM)
    native = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": INSTRUCTION}]
    folded = [{"role": "user", "content": f"{SYSTEM}\n\n{INSTRUCTION}"}]
    try:
        tok.apply_chat_template(native, tokenize=False)
        rejects = False
    except TemplateError:
        rejects = True
    ids = joined(b.pieces(INSTRUCTION, None, has_audio=False))
    assert ids == template_ids(tok, folded if b.folded_system else native, spec)
    assert SYSTEM in tok.decode(ids)
    log = capsys.readouterr().err
    # Gemma 2 and Mistral v0.1 reject a system role; Mistral v0.3 moves it to the last user turn
    assert b.folded_system == (spec["family"] in ("gemma2", "mistral-v0.1", "mistral-v0.3"))
    assert b.folded_system >= rejects
    assert ("folded into the first user turn" in log) == b.folded_system


def test_the_audio_slot_sits_inside_the_user_turn(fam):
    spec, tok = fam
    b = builder(tok, SYSTEM)
    rendered = tok.apply_chat_template(b._messages([INSTRUCTION]), tokenize=False, add_generation_prompt=True)
    prefix, _, suffix = rendered.rpartition(INSTRUCTION)
    assert b.prefix_text == prefix and b.suffix_text.startswith(suffix)
    # the user turn is open before the slot and closed after it
    opened = prefix.removesuffix(SYSTEM + "\n\n")  # folded by the builder or (Gemma 3) by the template
    assert opened.endswith(spec["user_turn_start"])
    assert b.suffix_text.lstrip().startswith(spec["user_turn_end"])
    pieces = b.pieces(INSTRUCTION, TRANSCRIPT, has_audio=True)
    assert pieces.before_audio == b.prefix_ids + b.audio_start_ids
    assert pieces.after_audio[-len(b.suffix_ids):] == b.suffix_ids
    middle = tok.decode(pieces.after_audio[: -len(b.suffix_ids)])
    assert TRANSCRIPT in middle and middle.rstrip().endswith(INSTRUCTION) and "<end_audio>" in middle


def test_end_of_turn_and_stop_ids_are_the_familys(fam):
    spec, tok = fam
    b = builder(tok)
    eot = tok.convert_tokens_to_ids(spec["end_of_turn"])
    assert b.end_of_turn_ids[-1] == eot
    assert eot in b.stop_ids and tok.eos_token_id in b.stop_ids
    assert b.target("A woman speaks.")[-1] == eot
    assert eot not in b.target("A woman speaks.", complete=False)


def test_an_answer_is_laid_out_as_the_template_renders_it(fam):
    spec, tok = fam
    if spec["style"] == "sentencepiece" and spec["family"] != "mistral-v0.3":
        # the template glues the answer to template text ("[/INST]A woman", "<|assistant|>\nA woman") in one
        # SentencePiece word: the builder tokenizes the answer on its own, with its prefix space ("▁A"), as
        # Mistral's reference tokenizer (mistral-common) encodes a message; the rendered text's first token differs
        pytest.skip("answer glued to template text in one SentencePiece word")
    b = builder(tok)
    answer = "A woman speaks fast."
    ids = joined(b.pieces(INSTRUCTION, None, has_audio=False)) + b.target(answer)
    extra = {"enable_thinking": False} if spec["family"] == "qwen3" else {}
    rendered = tok.apply_chat_template([{"role": "user", "content": INSTRUCTION},
                                        {"role": "assistant", "content": answer}], tokenize=True, **extra)
    rendered = list(rendered["input_ids"] if hasattr(rendered, "keys") else rendered)
    assert ids == rendered[: len(ids)]


def test_control_strings_stay_text(fam):
    spec, tok = fam
    b = builder(tok)
    evil = "hi " + " ".join(spec["specials"] + [spec["end_of_turn"], spec["user_turn_end"]]) + " bye"
    clean = b.pieces(INSTRUCTION, "hi there bye", has_audio=True)
    dirty = b.pieces(INSTRUCTION, evil, has_audio=True)
    count = lambda ids: sum(i in b.special_ids for i in ids)  # noqa: E731
    assert count(joined(dirty)) == count(joined(clean))
    dirty_text = joined(b.pieces(evil, None, has_audio=False))
    assert count(dirty_text) == count(joined(b.pieces(INSTRUCTION, None, has_audio=False)))
    assert count(b.target(evil)) == 1
    assert count(b.conversation([(evil, evil)], evil)) == count(b.conversation([("a", "b")], "c"))


def test_worked_example_turns_render_as_the_family_renders_them(fam):
    spec, tok = fam
    b = builder(tok, SYSTEM)
    turns = [("Is the voice high or low?", "High."), ("Is it noisy?", "No, it is clean.")]
    ids = b.conversation(turns, INSTRUCTION)
    contents = [t for turn in turns for t in turn] + [INSTRUCTION]
    assert ids == template_ids(tok, b._messages(contents), spec)


def test_magpie_opens_the_user_turn_and_stops_where_the_family_closes_it(fam):
    """Pseudo-replay (Magpie) feeds the template up to the user turn's header and stops the
    instruction the LLM writes on the token that closes a user turn."""
    from speechllm.model.prompt import ChatTemplateError

    spec, tok = fam
    b = builder(tok, SYSTEM)
    opened = tok.decode(b.user_turn_open_ids)
    assert SYSTEM in opened and opened.removesuffix(SYSTEM + "\n\n").rstrip().endswith(spec["user_turn_start"].rstrip())
    closing = spec["user_turn_end"].strip()
    if closing not in spec["specials"] + spec["added_text"]:  # Mistral v0.1: " [/INST]" is plain text
        with pytest.raises(ChatTemplateError, match=r"closes a user turn with plain text"):
            b.user_turn_end_ids
    else:
        assert b.user_turn_end_ids == [tok.convert_tokens_to_ids(closing)]


@pytest.mark.parametrize("template, why", [
    ("{% for m in messages %}{% if m['content'] is string %}{{ raise_exception('list content only') }}{% endif %}"
     "{% endfor %}", "fails on a user conversation .*list content only"),
    ("{% for m in messages %}{{ m['content'][0]['text'] }}{% endfor %}", "verbatim"),
    ("{% for m in messages %}{{ m['content'] + m['content'] }}{% endfor %}", "verbatim"),
    ("{% for m in messages %}{{ m['content'] | lower }}{% endfor %}", "verbatim"),
    ("{% for m in messages %}{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}A:{% endif %}"
     "{% if not add_generation_prompt %}X{% endif %}", "not a prefix"),
])
def test_a_template_the_builder_cannot_use_is_a_clear_error(template, why):
    from speechllm.model.prompt import ChatTemplateError

    tok = build_tokenizer(family("smollm2"))
    tok.chat_template = template
    with pytest.raises(ChatTemplateError, match=why):
        builder(tok)


def test_no_template_is_a_clear_error():
    from speechllm.model.prompt import ChatTemplateError

    tok = build_tokenizer(family("smollm2"))
    tok.chat_template = None
    with pytest.raises(ChatTemplateError, match="no chat template"):
        builder(tok)
