"""CTranslate2 reader and CTranslate2 Whisper -> transformers conversion.

Fast tier: a tiny random transformers Whisper is converted to CTranslate2 by ctranslate2's own
converter, then back by ours; every tensor must come back (bit-exact for float32).
Slow tier: the embedded whisper-tiny.en and whisper-base (multilingual), prepared through the
weights resolver, against ctranslate2's own encode/generate on the original files.
"""

from __future__ import annotations

import re
import string
import struct
from pathlib import Path

import ctranslate2
import numpy as np
import pytest
import soundfile
import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
from transformers import WhisperConfig, WhisperForConditionalGeneration, WhisperProcessor

from speechllm.hub.convert_ct2 import (
    CT2_BINARY_VERSION,
    MODEL_FILE,
    TOKENIZER_FILE,
    ct2_whisper_to_transformers,
    generation_settings,
    read_ct2_model,
)

SEED = 0
BPE_ALPHABET = ["Ġ"] + list(string.ascii_letters + string.digits)  # "Ġ" is byte-level space
SPECIAL_TOKENS = ["<|endoftext|>", "<|startoftranscript|>", "<|en|>", "<|translate|>",
                  "<|transcribe|>", "<|startoflm|>", "<|startofprev|>", "<|nocaptions|>",
                  "<|notimestamps|>"]
SPECIAL_IDS = {token: len(BPE_ALPHABET) + i for i, token in enumerate(SPECIAL_TOKENS)}
TINY_VOCAB = len(BPE_ALPHABET) + len(SPECIAL_TOKENS) + 4  # the last rows act as timestamps
TINY_MELS = 16
TINY_SOURCE_POSITIONS = 50  # 100 mel frames = exactly 1 s of audio
TINY_TARGET_POSITIONS = 24
WHISPER_SPEC_REVISION = 3
# Worst dequantization error relative to the largest |weight|: half a quantization step.
QUANT_STEP = {"int8": 1 / 127, "int16": 1 / 2**10}

AUDIO = Path(__file__).resolve().parents[1] / "samples" / "librivox_austen_0890.wav"
REFERENCE_TEXT = "unless to be rather cold hearted and rather selfish is to be ill disposed"
MAX_WORD_ERRORS = 2
MAX_ENCODER_ABS_DIFF = 1e-3


def _write_tokenizer_json(path: Path) -> None:
    """A byte-level BPE tokenizer over BPE_ALPHABET (no merges) with Whisper's special tokens."""
    tokenizer = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(BPE_ALPHABET)}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(t, normalized=False) for t in SPECIAL_TOKENS])
    tokenizer.save(str(path))


def _tiny_whisper() -> WhisperForConditionalGeneration:
    """Random Whisper (d_model 64, 2+2 layers, 4 heads) with every parameter ~N(0, 1), so
    biases and norms are not the zeros/ones of the default init and any mix-up shows."""
    config = WhisperConfig(
        vocab_size=TINY_VOCAB, num_mel_bins=TINY_MELS, d_model=64, encoder_layers=2,
        decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
        encoder_ffn_dim=128, decoder_ffn_dim=96, max_source_positions=TINY_SOURCE_POSITIONS,
        max_target_positions=TINY_TARGET_POSITIONS,
        pad_token_id=SPECIAL_IDS["<|endoftext|>"], bos_token_id=SPECIAL_IDS["<|endoftext|>"],
        eos_token_id=SPECIAL_IDS["<|endoftext|>"],
        decoder_start_token_id=SPECIAL_IDS["<|startoftranscript|>"],
        suppress_tokens=[3, 4], begin_suppress_tokens=[0, SPECIAL_IDS["<|endoftext|>"]],
    )
    torch.manual_seed(SEED)
    model = WhisperForConditionalGeneration(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_()
    model.generation_config.suppress_tokens = config.suppress_tokens
    model.generation_config.begin_suppress_tokens = config.begin_suppress_tokens
    return model


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> tuple[WhisperForConditionalGeneration, Path]:
    """The random model and its saved transformers folder."""
    model = _tiny_whisper()
    folder = tmp_path_factory.mktemp("tiny_hf")
    model.save_pretrained(folder)
    return model, folder


def _to_ct2(hf_dir: Path, out: Path, quantization: str) -> Path:
    """ctranslate2's own converter, plus the tokenizer.json a real CT2 Whisper folder has."""
    converter = ctranslate2.converters.TransformersConverter(str(hf_dir), load_as_float16=False)
    converter.convert(str(out), quantization=quantization)
    _write_tokenizer_json(out / TOKENIZER_FILE)
    return out


@pytest.fixture(scope="module")
def tiny_ct2(tiny_model, tmp_path_factory) -> Path:
    return _to_ct2(tiny_model[1], tmp_path_factory.mktemp("tiny_ct2") / "ct2", "float32")


def _expected(weight: torch.Tensor, quantization: str, largest: float) -> tuple[torch.Tensor, float]:
    """What a weight should read back as after ``quantization``, and the allowed error.

    Integer scales cover a row (int8) or a whole fused tensor (int16, e.g. q,k,v together), so
    half a step of the model's largest |weight| bounds the error of every weight.
    """
    if quantization in QUANT_STEP:
        return weight, 0.5 * QUANT_STEP[quantization] * largest
    stored = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    return weight.to(stored[quantization]).float(), 0.0


@pytest.mark.parametrize("quantization", ["float32", "float16", "bfloat16", "int8", "int16"])
def test_round_trip_through_ctranslate2(tiny_model, tmp_path, quantization):
    model, hf_dir = tiny_model
    ct2_dir = _to_ct2(hf_dir, tmp_path / "ct2", quantization)
    out = tmp_path / "hf"
    out.mkdir()
    ct2_whisper_to_transformers(ct2_dir, out)

    converted, info = WhisperForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info
    for field in ("vocab_size", "num_mel_bins", "d_model", "encoder_layers", "decoder_layers",
                  "encoder_attention_heads", "decoder_attention_heads", "encoder_ffn_dim",
                  "decoder_ffn_dim", "max_source_positions", "max_target_positions",
                  "decoder_start_token_id", "eos_token_id", "suppress_tokens",
                  "begin_suppress_tokens"):
        assert getattr(converted.config, field) == getattr(model.config, field), field
    original = model.state_dict()
    restored = converted.state_dict()
    assert restored.keys() == original.keys()
    largest = max(float(weight.abs().max()) for weight in original.values())
    for key, weight in original.items():
        assert restored[key].dtype == torch.float32, key
        expected, tolerance = _expected(weight, quantization, largest)
        if tolerance == 0.0:
            assert torch.equal(restored[key], expected), key
        else:
            assert (restored[key] - expected).abs().max() <= tolerance * (1 + 1e-5), key
    assert restored["proj_out.weight"].data_ptr() == \
        restored["model.decoder.embed_tokens.weight"].data_ptr()


def test_processor_and_generate_on_tiny(tiny_ct2, tmp_path):
    ct2_whisper_to_transformers(tiny_ct2, tmp_path)
    processor = WhisperProcessor.from_pretrained(tmp_path)
    extractor, tokenizer = processor.feature_extractor, processor.tokenizer
    assert extractor.feature_size == TINY_MELS
    assert extractor.nb_max_frames == 2 * TINY_SOURCE_POSITIONS
    for token, token_id in SPECIAL_IDS.items():
        assert tokenizer.convert_tokens_to_ids(token) == token_id
    assert tokenizer.eos_token_id == tokenizer.pad_token_id == SPECIAL_IDS["<|endoftext|>"]
    assert tokenizer.decode(tokenizer("hello world").input_ids, skip_special_tokens=True) \
        == "hello world"

    model = WhisperForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert model.generation_config.is_multilingual is False
    assert not hasattr(model.generation_config, "lang_to_id")
    assert model.generation_config.no_timestamps_token_id == SPECIAL_IDS["<|notimestamps|>"]
    audio = np.random.default_rng(SEED).standard_normal(8_000).astype(np.float32)
    features = extractor(audio, sampling_rate=extractor.sampling_rate, return_tensors="pt")
    with torch.no_grad():
        tokens = model.generate(features.input_features, max_new_tokens=4)
    assert tokens.shape[0] == 1 and tokens.shape[1] >= 1


def _write_ct2_model(path: Path, variables: dict[str, np.ndarray], aliases: dict[str, str],
                     spec_name: str, version: int = CT2_BINARY_VERSION) -> None:
    """Independent writer of the CTranslate2 layout (float32/float16/int8/int16/int32 only)."""
    type_ids = {np.dtype("float32"): 0, np.dtype("int8"): 1, np.dtype("int16"): 2,
                np.dtype("int32"): 3, np.dtype("float16"): 4}

    def text(value: str) -> bytes:
        raw = value.encode("utf-8") + b"\0"
        return struct.pack("<H", len(raw)) + raw

    chunks = [struct.pack("<I", version), text(spec_name),
              struct.pack("<II", WHISPER_SPEC_REVISION, len(variables))]
    for name, values in variables.items():
        chunks += [text(name), struct.pack(f"<B{values.ndim}I", values.ndim, *values.shape),
                   struct.pack("<BI", type_ids[values.dtype], values.nbytes),
                   np.ascontiguousarray(values).astype(values.dtype.newbyteorder("<")).tobytes()]
    chunks.append(struct.pack("<I", len(aliases)))
    chunks += [text(alias) + text(target) for alias, target in aliases.items()]
    path.write_bytes(b"".join(chunks))


def test_reader_reproduces_file_bytes(tiny_ct2, tmp_path):
    variables, aliases, spec_name = read_ct2_model(tiny_ct2 / MODEL_FILE)
    assert spec_name == "WhisperSpec"
    assert aliases == {"decoder/projection/weight": "decoder/embeddings/weight"}
    assert variables["encoder/conv1/weight"].shape == (64, TINY_MELS, 3)
    assert int(variables["encoder/num_heads"]) == 4
    copy = tmp_path / MODEL_FILE
    _write_ct2_model(copy, variables, aliases, spec_name)
    assert copy.read_bytes() == (tiny_ct2 / MODEL_FILE).read_bytes()


def _damaged_copy(tiny_ct2: Path, tmp_path: Path, edit, spec_name: str = "WhisperSpec") -> Path:
    """A copy of the tiny CT2 folder whose variables went through ``edit`` (in place)."""
    variables, aliases, _ = read_ct2_model(tiny_ct2 / MODEL_FILE)
    variables = {name: np.array(values) for name, values in variables.items()}
    edit(variables)
    folder = tmp_path / "damaged"
    folder.mkdir()
    for name in ("config.json", TOKENIZER_FILE):
        (folder / name).write_bytes((tiny_ct2 / name).read_bytes())
    _write_ct2_model(folder / MODEL_FILE, variables, aliases, spec_name)
    return folder


def _nonzero_key_bias(variables):
    bias = variables["decoder/layer_1/attention/linear_1/bias"]
    bias[: bias.shape[0] // 2] = 0.5  # the k half of the fused k,v bias


def _extra_weight(variables):
    variables["encoder/extra/weight"] = np.ones(3, np.float32)


def _missing_bias(variables):
    del variables["encoder/layer_1/ffn/linear_0/bias"]


def _relu_decoder(variables):
    variables["decoder/activation"] = np.array(0, np.int8)


@pytest.mark.parametrize("edit, message", [
    (_nonzero_key_bias, "key part of the fused bias is not zero"),
    (_extra_weight, "no transformers counterpart: ['encoder/extra/weight']"),
    (_missing_bias, "missing variable 'encoder/layer_1/ffn/linear_0/bias'"),
    (_relu_decoder, "decoder/activation is 0"),
])
def test_conversion_refuses_non_whisper_weights(tiny_ct2, tmp_path, edit, message):
    folder = _damaged_copy(tiny_ct2, tmp_path, edit)
    with pytest.raises(ValueError, match=re.escape(message)) as error:
        ct2_whisper_to_transformers(folder, tmp_path / "out")
    assert str(folder / MODEL_FILE) in str(error.value)


def test_conversion_refuses_other_spec(tiny_ct2, tmp_path):
    folder = _damaged_copy(tiny_ct2, tmp_path, lambda variables: None, "TransformerSpec")
    with pytest.raises(ValueError, match="spec is 'TransformerSpec', expected 'WhisperSpec'"):
        ct2_whisper_to_transformers(folder, tmp_path / "out")


def _cut(fraction: float):
    return lambda data: data[: int(len(data) * fraction)]


@pytest.mark.parametrize("damage, message", [
    (lambda data: b"", "empty file"),
    (lambda data: data[:3], "truncated at header"),
    (_cut(0.5), "truncated at variable '"),
    (lambda data: data[:-3], "truncated at the alias table"),
    (lambda data: struct.pack("<I", 5) + data[4:], "unsupported CTranslate2 binary version 5"),
    (lambda data: data + b"\0", "1 unexpected trailing bytes"),
])
def test_corrupt_file_names_file_and_problem(tiny_ct2, tmp_path, damage, message):
    path = tmp_path / MODEL_FILE
    path.write_bytes(damage((tiny_ct2 / MODEL_FILE).read_bytes()))
    with pytest.raises(ValueError, match=re.escape(message)) as error:
        read_ct2_model(path)
    assert str(path) in str(error.value)


def test_unknown_dtype_id(tmp_path):
    path = tmp_path / MODEL_FILE
    _write_ct2_model(path, {"x": np.zeros(2, "f4")}, {}, "WhisperSpec")
    data = bytearray(path.read_bytes())
    data[data.index(b"x\0") + 2 + 1 + 4] = 9  # after name, ndim (u8) and one dim (u32)
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="unknown dtype id 9 .*variable 'x'"):
        read_ct2_model(path)


ENGLISH_ONLY_IDS = {"<|endoftext|>": 50256, "<|startoftranscript|>": 50257, "<|en|>": 50258,
                    "<|fr|>": 50259, "<|translate|>": 50357, "<|transcribe|>": 50358,
                    "<|startofprev|>": 50360, "<|notimestamps|>": 50362}
MULTILINGUAL_IDS = {token: token_id + 1 for token, token_id in ENGLISH_ONLY_IDS.items()}


def test_generation_settings_english_only():
    # tiny.en's CTranslate2 config lists multilingual-layout lang_ids; they must be ignored.
    settings = generation_settings({"suppress_ids": [1, 50257], "suppress_ids_begin": [220],
                                    "lang_ids": [50259, 50260]}, ENGLISH_ONLY_IDS, 51864, 448)
    assert settings["is_multilingual"] is False
    assert "lang_to_id" not in settings and "task_to_id" not in settings
    assert settings["decoder_start_token_id"] == 50257
    assert settings["eos_token_id"] == settings["pad_token_id"] == 50256
    assert settings["no_timestamps_token_id"] == 50362
    assert settings["prev_sot_token_id"] == 50360
    assert settings["suppress_tokens"] == [1, 50257]
    assert settings["begin_suppress_tokens"] == [220]
    assert settings["max_length"] == 448


def test_generation_settings_multilingual():
    settings = generation_settings({"lang_ids": [50259, 50260]}, MULTILINGUAL_IDS, 51865, 448)
    assert settings["is_multilingual"] is True
    assert settings["lang_to_id"] == {"<|en|>": 50259, "<|fr|>": 50260}
    assert settings["task_to_id"] == {"transcribe": 50359, "translate": 50358}
    assert settings["task"] == "transcribe"
    with pytest.raises(ValueError, match="do not match the CTranslate2 lang_ids"):
        generation_settings({"lang_ids": [50259]}, MULTILINGUAL_IDS, 51865, 448)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        generation_settings({"suppress_ids": [51865]}, MULTILINGUAL_IDS, 51865, 448)
    with pytest.raises(ValueError, match="lacks the special tokens"):
        generation_settings({}, {"<|endoftext|>": 0}, 51865, 448)


# ---------------------------------------------------------------- slow: real CT2 Whisper folders


def _word_errors(hypothesis: str, reference: str) -> int:
    """Word-level edit distance after lowercasing and dropping hyphens and punctuation."""
    def words(text: str) -> list[str]:
        return re.sub(r"[^a-z' ]", " ", text.lower().replace("-", " ")).split()

    hyp, ref = words(hypothesis), words(reference)
    row = list(range(len(hyp) + 1))
    for i, ref_word in enumerate(ref, 1):
        diagonal, row[0] = row[0], i
        for j, hyp_word in enumerate(hyp, 1):
            diagonal, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1,
                                           diagonal + (ref_word != hyp_word))
    return row[-1]


@pytest.fixture(scope="module", params=["whisper-tiny.en", "whisper-base"])
def real_model(request):
    """(ct2 folder, converted model, processor, log-mel features [1, n_mels, 3000]) of an embedded
    Whisper, prepared through the weights resolver (fetch, sha256 check, conversion)."""
    from speechllm.hub import weights

    folder = Path(weights.prepare(request.param))
    model = WhisperForConditionalGeneration.from_pretrained(folder).eval()
    processor = WhisperProcessor.from_pretrained(folder)
    audio, rate = soundfile.read(AUDIO, dtype="float32")
    features = processor.feature_extractor(audio, sampling_rate=rate, return_tensors="np")
    return weights.ct2_path(request.param), model, processor, features.input_features


@pytest.mark.slow
def test_encoder_matches_ctranslate2(real_model):
    ct2_dir, model, _, features = real_model
    with torch.no_grad():
        ours = model.model.encoder(torch.from_numpy(features)).last_hidden_state.numpy()
    whisper = ctranslate2.models.Whisper(str(ct2_dir), device="cpu", compute_type="float32")
    theirs = np.asarray(whisper.encode(ctranslate2.StorageView.from_array(features)))
    assert ours.shape == theirs.shape == (1, model.config.max_source_positions, model.config.d_model)
    assert np.abs(ours - theirs).max() < MAX_ENCODER_ABS_DIFF


@pytest.mark.slow
def test_generate_transcribes_like_ctranslate2(real_model):
    ct2_dir, model, processor, features = real_model
    config = model.generation_config
    language = {"language": "en"} if config.is_multilingual else {}
    with torch.no_grad():
        ours = model.generate(torch.from_numpy(features), **language)[0].tolist()
    text = processor.tokenizer.decode(ours, skip_special_tokens=True)
    assert _word_errors(text, REFERENCE_TEXT) <= MAX_WORD_ERRORS, text

    prompt = [config.decoder_start_token_id]
    if config.is_multilingual:
        prompt += [config.lang_to_id["<|en|>"], config.task_to_id["transcribe"]]
    prompt.append(config.no_timestamps_token_id)
    whisper = ctranslate2.models.Whisper(str(ct2_dir), device="cpu", compute_type="float32")
    result = whisper.generate(ctranslate2.StorageView.from_array(features), [prompt], beam_size=1)
    special = set(processor.tokenizer.all_special_ids)
    assert [t for t in ours if t not in special] == result[0].sequences_ids[0]
