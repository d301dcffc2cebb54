"""Read CTranslate2 model files and turn a CTranslate2 Whisper folder into a transformers one.

A CTranslate2 model folder (as written by ``ct2-transformers-converter``) holds ``model.bin``
(named arrays in CTranslate2's own binary layout), ``config.json`` (suppressed token ids,
language ids, alignment heads) and ``tokenizer.json``. :func:`read_ct2_model` reads
``model.bin`` without ctranslate2; :func:`ct2_whisper_to_transformers` maps a Whisper model onto
``WhisperForConditionalGeneration`` and writes a folder that ``from_pretrained`` loads, together
with a ``WhisperProcessor`` and a generation config.

``model.bin`` layout (binary version 6, all integers little-endian), mirroring
``ctranslate2.specs.model_spec.ModelSpec._serialize``::

    u32 binary_version
    str spec_name                    str = u16 length (including NUL) + utf-8 bytes + NUL
    u32 spec_revision
    u32 variable_count
    variable_count x (str name, u8 ndim, ndim x u32 dim, u8 dtype_id, u32 nbytes, raw bytes)
    u32 alias_count
    alias_count x (str alias, str target)
"""

from __future__ import annotations

import json
import mmap
import re
import struct
from pathlib import Path

import numpy as np

from ..io.audio import SAMPLE_RATE

CT2_BINARY_VERSION = 6
MODEL_FILE = "model.bin"
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
WHISPER_SPEC_NAME = "WhisperSpec"

# CTranslate2 DataType ids (include/ctranslate2/types.h). bfloat16 is read as raw uint16.
BFLOAT16_TYPE_ID = 5
_CT2_DTYPES = {
    0: np.dtype("<f4"),
    1: np.dtype("i1"),
    2: np.dtype("<i2"),
    3: np.dtype("<i4"),
    4: np.dtype("<f2"),
    BFLOAT16_TYPE_ID: np.dtype("<u2"),
}
BFLOAT16_SHIFT = 16  # a bfloat16 is the upper half of a float32
QUANTIZATION_SCALE_SUFFIX = "_scale"  # CTranslate2 stores int8/int16 weights as value * scale

# Whisper audio front end (fixed by the model family, not stored in model.bin).
HOP_LENGTH = 160
N_FFT = 400
ENCODER_CONV_STRIDE = 2  # conv2 halves the mel frames: encoder positions = frames / 2
TIMESTAMP_SECONDS = 0.02  # one timestamp token step
MAX_INITIAL_TIMESTAMP_SECONDS = 1.0  # openai/whisper's default max_initial_timestamp

# Multilingual Whisper checkpoints have 51865 (51866 for large-v3) tokens, English-only 51864.
MULTILINGUAL_MIN_VOCAB_SIZE = 51_865
KEY_BIAS_ATOL = 1e-6  # Whisper's k_proj has no bias; CTranslate2 fuses zeros in its place

END_OF_TEXT = "<|endoftext|>"
START_OF_TRANSCRIPT = "<|startoftranscript|>"
NO_TIMESTAMPS = "<|notimestamps|>"
START_OF_PREV = "<|startofprev|>"
TRANSCRIBE = "<|transcribe|>"
TRANSLATE = "<|translate|>"
DEFAULT_TASK = "transcribe"
LANGUAGE_TOKEN = re.compile(r"<\|[a-z]{2,3}\|>")

# Scalar flags of CTranslate2's TransformerDecoderSpec that must hold for a Whisper decoder
# (GELU activation id 3, pre-norm, unscaled embeddings, no ALiBi, positions from 0). Older
# converters write fewer of them; a flag that is absent is not checked.
_EXPECTED_DECODER_FLAGS = {
    "decoder/activation": 3,
    "decoder/pre_norm": 1,
    "decoder/scale_embeddings": 0,
    "decoder/alibi": 0,
    "decoder/alibi_use_positive_positions": 0,
    "decoder/scale_alibi": 0,
    "decoder/start_from_zero_embedding": 0,
}
# Scalars that only steer CTranslate2's own word alignment; they have no transformers weight.
_IGNORED_SCALARS = ("decoder/alignment_heads", "decoder/alignment_layer")


class _Cursor:
    """Sequential little-endian reader over a byte buffer that names the file in its errors."""

    def __init__(self, path: Path, buffer) -> None:
        self.path = path
        self.buffer = buffer
        self.size = len(buffer)
        self.offset = 0
        self.where = "header"

    def fail(self, problem: str) -> ValueError:
        return ValueError(f"{self.path}: {problem} (in {self.where}, at byte {self.offset})")

    def _need(self, nbytes: int) -> None:
        if self.offset + nbytes > self.size:
            raise ValueError(
                f"{self.path}: truncated at {self.where} (needs {nbytes} bytes at byte "
                f"{self.offset}, the file has {self.size})"
            )

    def unpack(self, fmt: str) -> tuple:
        nbytes = struct.calcsize(fmt)
        self._need(nbytes)
        values = struct.unpack_from(fmt, self.buffer, self.offset)
        self.offset += nbytes
        return values

    def u8(self) -> int:
        return self.unpack("<B")[0]

    def u32(self) -> int:
        return self.unpack("<I")[0]

    def string(self) -> str:
        length = self.unpack("<H")[0]
        if length == 0:
            raise self.fail("string of length 0 (a NUL terminator is always counted)")
        self._need(length)
        raw = bytes(self.buffer[self.offset : self.offset + length])
        if raw[-1] != 0:
            raise self.fail("string is not NUL-terminated")
        try:
            text = raw[:-1].decode("utf-8")
        except UnicodeDecodeError as error:
            raise self.fail(f"string is not utf-8 ({error})") from None
        self.offset += length
        return text

    def array(self, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
        """Read-only view of the next ``prod(shape)`` items; no copy is made."""
        count = int(np.prod(shape, dtype=np.int64))
        self._need(count * dtype.itemsize)
        values = np.frombuffer(self.buffer, dtype=dtype, count=count, offset=self.offset)
        self.offset += count * dtype.itemsize
        return values.reshape(shape)


def _bfloat16_to_float32(raw: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16, any shape) -> float32 of the same shape."""
    return (raw.astype(np.uint32) << BFLOAT16_SHIFT).view(np.float32)


def read_ct2_model(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, str], str]:
    """Read a CTranslate2 ``model.bin`` without ctranslate2.

    Args:
      path: the ``model.bin`` file.

    Returns:
      ``(variables, aliases, spec_name)``: variables maps each name (``encoder/conv1/weight``)
      to an array of its stored shape and dtype (float32, int8, int16, int32, float16;
      bfloat16 comes back as float32). Scalars are 0-d arrays. Float32, float16 and integer
      arrays are read-only views onto a memory map of the file, so reading costs no copy.
      aliases maps an alias name to the variable name it stands for (e.g.
      ``decoder/projection/weight -> decoder/embeddings/weight``). spec_name is the spec class
      name (``WhisperSpec``).

    Raises:
      ValueError: naming the file, for an unsupported binary version or a truncated or
        corrupt file (bad dtype id, size mismatch, duplicate name, dangling alias, trailing
        bytes).
    """
    cursor = _open_model_file(Path(path))
    spec_name = _read_header(cursor)
    variables = _read_variables(cursor)
    aliases = _read_aliases(cursor, variables)
    if cursor.offset != cursor.size:
        raise cursor.fail(f"{cursor.size - cursor.offset} unexpected trailing bytes")
    return variables, aliases, spec_name


def _open_model_file(path: Path) -> _Cursor:
    """A cursor at the start of a read-only memory map of ``path`` (refused when empty)."""
    if path.stat().st_size == 0:
        raise ValueError(f"{path}: empty file, not a CTranslate2 model")
    with path.open("rb") as handle:
        buffer = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
    return _Cursor(path, buffer)


def _read_header(cursor: _Cursor) -> str:
    """Check the binary version and return the spec name; the spec revision is skipped."""
    version = cursor.u32()
    if version != CT2_BINARY_VERSION:
        raise ValueError(
            f"{cursor.path}: unsupported CTranslate2 binary version {version} "
            f"(this reader supports version {CT2_BINARY_VERSION})"
        )
    spec_name = cursor.string()
    cursor.u32()  # spec revision: the variable names below are what the mapping relies on
    return spec_name


def _read_variables(cursor: _Cursor) -> dict[str, np.ndarray]:
    """The variable table: name -> array (bfloat16 widened to float32, others as views)."""
    variables: dict[str, np.ndarray] = {}
    count = cursor.u32()
    for index in range(count):
        cursor.where = f"the name of variable {index} of {count}"
        name = cursor.string()
        cursor.where = f"variable {name!r}"
        variables[name] = _read_variable(cursor, is_duplicate=name in variables)
    return variables


def _read_variable(cursor: _Cursor, is_duplicate: bool) -> np.ndarray:
    """One variable's shape, dtype, byte count and data, after its name has been read."""
    ndim = cursor.u8()
    shape = cursor.unpack(f"<{ndim}I")
    type_id = cursor.u8()
    if type_id not in _CT2_DTYPES:
        raise cursor.fail(f"unknown dtype id {type_id}")
    dtype = _CT2_DTYPES[type_id]
    nbytes = cursor.u32()
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if nbytes != expected:
        raise cursor.fail(f"{nbytes} data bytes for shape {shape} of dtype id {type_id}, "
                          f"expected {expected}")
    if is_duplicate:
        raise cursor.fail("duplicate variable name")
    values = cursor.array(dtype, shape)
    return _bfloat16_to_float32(values) if type_id == BFLOAT16_TYPE_ID else values


def _read_aliases(cursor: _Cursor, variables: dict[str, np.ndarray]) -> dict[str, str]:
    """The alias table: alias -> the name of an existing variable."""
    cursor.where = "the alias table"
    aliases: dict[str, str] = {}
    for _ in range(cursor.u32()):
        alias = cursor.string()
        target = cursor.string()
        if target not in variables:
            raise cursor.fail(f"alias {alias!r} points to missing variable {target!r}")
        aliases[alias] = target
    return aliases


class _Ct2Variables:
    """CTranslate2 variables handed out as float32, with every name accounted for.

    Aliases are resolved, int8/int16 weights are dequantized with their ``*_scale``
    companion, and each name handed out is remembered so that :meth:`check_all_used` can
    refuse a model that carries weights the mapping does not know.
    """

    def __init__(self, path: Path, variables: dict[str, np.ndarray], aliases: dict[str, str]):
        self.path = path
        self.variables = variables
        self.aliases = aliases
        self.used: set[str] = set()

    def _take(self, name: str) -> str:
        """The stored variable behind ``name`` (itself or its alias target), marked used."""
        target = self.aliases.get(name, name)
        if target not in self.variables:
            raise ValueError(f"{self.path}: missing variable {name!r}")
        self.used.update((name, target))
        return target

    def tensor(self, name: str) -> np.ndarray:
        """The named weight as a new float32 array of its stored shape."""
        target = self._take(name)
        values = self.variables[target]
        scale_name = target + QUANTIZATION_SCALE_SUFFIX
        if scale_name in self.variables or scale_name in self.aliases:
            scale = self.variables[self._take(scale_name)].astype(np.float32)
            # int8 scales are per output row (shape [rows]); int16 has one scalar scale.
            scale = scale.reshape(scale.shape + (1,) * (values.ndim - scale.ndim))
            return values.astype(np.float32) / scale
        if not np.issubdtype(values.dtype, np.floating):
            raise ValueError(f"{self.path}: {name!r} is {values.dtype} without a scale")
        return values.astype(np.float32)

    def scalar(self, name: str) -> int:
        """The named 0-d integer flag."""
        values = self.variables[self._take(name)]
        if values.ndim != 0:
            raise ValueError(f"{self.path}: {name!r} should be a scalar, has shape {values.shape}")
        return int(values)

    def is_alias_of(self, alias: str, target: str) -> bool:
        """Whether ``alias`` is stored as an alias of ``target`` (marks the alias used)."""
        return alias in self.aliases and self._take(alias) == target

    def layer_count(self, stack: str) -> int:
        """Number of ``{stack}/layer_{i}`` blocks; the indices must run 0..n-1."""
        pattern = re.compile(rf"{re.escape(stack)}/layer_(\d+)/")
        indices = {int(match.group(1)) for name in self.variables
                   if (match := pattern.match(name))}
        if not indices or indices != set(range(len(indices))):
            raise ValueError(f"{self.path}: {stack} layers are {sorted(indices)}, expected 0..n-1")
        return len(indices)

    def check_all_used(self) -> None:
        unused = sorted(set(self.variables).union(self.aliases) - self.used)
        if unused:
            raise ValueError(f"{self.path}: variables with no transformers counterpart: {unused}")


def _split_rows(values: np.ndarray, parts: int, name: str) -> list[np.ndarray]:
    """Split a fused weight [parts*d, d_in] or bias [parts*d] into ``parts`` row blocks."""
    if values.shape[0] % parts:
        raise ValueError(f"{name}: {values.shape[0]} rows do not split into {parts} projections")
    return [np.ascontiguousarray(block) for block in np.split(values, parts)]


def _check_zero_key_bias(bias: np.ndarray, name: str) -> None:
    largest = float(np.abs(bias).max(initial=0.0))
    if largest > KEY_BIAS_ATOL:
        raise ValueError(
            f"{name}: key part of the fused bias is not zero (max |b| = {largest:.3g}); "
            "Whisper's k_proj has no bias, so this is not a Whisper attention layer"
        )


def _linear(src: _Ct2Variables, ct2: str, hf: str, out: dict[str, np.ndarray]) -> None:
    out[f"{hf}.weight"] = src.tensor(f"{ct2}/weight")
    out[f"{hf}.bias"] = src.tensor(f"{ct2}/bias")


def _layer_norm(src: _Ct2Variables, ct2: str, hf: str, out: dict[str, np.ndarray]) -> None:
    out[f"{hf}.weight"] = src.tensor(f"{ct2}/gamma")
    out[f"{hf}.bias"] = src.tensor(f"{ct2}/beta")


def _key_value(src: _Ct2Variables, fused: str, hf: str, out: dict[str, np.ndarray],
               weights: list[np.ndarray], biases: list[np.ndarray]) -> None:
    """Store the k and v blocks (the last two of a fused projection); k has no bias."""
    (k_weight, v_weight), (k_bias, v_bias) = weights[-2:], biases[-2:]
    _check_zero_key_bias(k_bias, f"{src.path}: {fused}/bias")
    out[f"{hf}.k_proj.weight"] = k_weight
    out[f"{hf}.v_proj.weight"] = v_weight
    out[f"{hf}.v_proj.bias"] = v_bias


def _self_attention(src: _Ct2Variables, ct2: str, hf: str, out: dict[str, np.ndarray]) -> None:
    """``linear_0`` = fused q,k,v (weight [3d, d], bias [3d]); ``linear_1`` = out_proj."""
    fused = f"{ct2}/linear_0"
    weights = _split_rows(src.tensor(f"{fused}/weight"), 3, f"{src.path}: {fused}")
    biases = _split_rows(src.tensor(f"{fused}/bias"), 3, f"{src.path}: {fused}")
    out[f"{hf}.q_proj.weight"], out[f"{hf}.q_proj.bias"] = weights[0], biases[0]
    _key_value(src, fused, hf, out, weights, biases)
    _linear(src, f"{ct2}/linear_1", f"{hf}.out_proj", out)


def _cross_attention(src: _Ct2Variables, ct2: str, hf: str, out: dict[str, np.ndarray]) -> None:
    """``linear_0`` = q_proj; ``linear_1`` = fused k,v ([2d, d], bias [2d]); ``linear_2`` = out."""
    _linear(src, f"{ct2}/linear_0", f"{hf}.q_proj", out)
    fused = f"{ct2}/linear_1"
    weights = _split_rows(src.tensor(f"{fused}/weight"), 2, f"{src.path}: {fused}")
    biases = _split_rows(src.tensor(f"{fused}/bias"), 2, f"{src.path}: {fused}")
    _key_value(src, fused, hf, out, weights, biases)
    _linear(src, f"{ct2}/linear_2", f"{hf}.out_proj", out)


def _feed_forward(src: _Ct2Variables, ct2: str, hf: str, out: dict[str, np.ndarray]) -> None:
    _layer_norm(src, f"{ct2}/ffn/layer_norm", f"{hf}.final_layer_norm", out)
    _linear(src, f"{ct2}/ffn/linear_0", f"{hf}.fc1", out)
    _linear(src, f"{ct2}/ffn/linear_1", f"{hf}.fc2", out)


def _whisper_state_dict(src: _Ct2Variables) -> dict[str, np.ndarray]:
    """Map CTranslate2 WhisperSpec variables onto ``WhisperForConditionalGeneration`` keys.

    Returns float32 arrays keyed as in ``model.state_dict()``; ``proj_out.weight`` is the
    same array as ``model.decoder.embed_tokens.weight`` (tied). Shapes: conv1 [d, n_mels, 3],
    conv2 [d, d, 3], encoder positions [max_source_positions, d], embed_tokens [vocab, d],
    decoder positions [max_target_positions, d], attention projections [d, d], fc1 [ffn, d],
    fc2 [d, ffn].
    """
    out: dict[str, np.ndarray] = {}
    for conv in ("conv1", "conv2"):
        _linear(src, f"encoder/{conv}", f"model.encoder.{conv}", out)
    out["model.encoder.embed_positions.weight"] = src.tensor("encoder/position_encodings/encodings")
    for index in range(src.layer_count("encoder")):
        ct2, hf = f"encoder/layer_{index}", f"model.encoder.layers.{index}"
        _layer_norm(src, f"{ct2}/self_attention/layer_norm", f"{hf}.self_attn_layer_norm", out)
        _self_attention(src, f"{ct2}/self_attention", f"{hf}.self_attn", out)
        _feed_forward(src, ct2, hf, out)
    _layer_norm(src, "encoder/layer_norm", "model.encoder.layer_norm", out)

    embeddings = src.tensor("decoder/embeddings/weight")
    if not src.is_alias_of("decoder/projection/weight", "decoder/embeddings/weight"):
        raise ValueError(f"{src.path}: output projection is not tied to the token embeddings")
    out["model.decoder.embed_tokens.weight"] = embeddings
    out["proj_out.weight"] = embeddings
    out["model.decoder.embed_positions.weight"] = src.tensor("decoder/position_encodings/encodings")
    for index in range(src.layer_count("decoder")):
        ct2, hf = f"decoder/layer_{index}", f"model.decoder.layers.{index}"
        _layer_norm(src, f"{ct2}/self_attention/layer_norm", f"{hf}.self_attn_layer_norm", out)
        _self_attention(src, f"{ct2}/self_attention", f"{hf}.self_attn", out)
        _layer_norm(src, f"{ct2}/attention/layer_norm", f"{hf}.encoder_attn_layer_norm", out)
        _cross_attention(src, f"{ct2}/attention", f"{hf}.encoder_attn", out)
        _feed_forward(src, ct2, hf, out)
    _layer_norm(src, "decoder/layer_norm", "model.decoder.layer_norm", out)
    return out


def _check_decoder_flags(src: _Ct2Variables) -> None:
    for name, expected in _EXPECTED_DECODER_FLAGS.items():
        if name in src.variables and src.scalar(name) != expected:
            raise ValueError(f"{src.path}: {name} is {src.scalar(name)}, Whisper needs {expected}")
    for name in _IGNORED_SCALARS:
        if name in src.variables:
            src.scalar(name)


def special_token_ids(tokenizer_json: dict) -> dict[str, int]:
    """Content -> id of every special added token in a ``tokenizer.json`` document."""
    return {token["content"]: token["id"] for token in tokenizer_json.get("added_tokens", [])
            if token.get("special")}


def generation_settings(ct2_config: dict, special_ids: dict[str, int], vocab_size: int,
                        max_target_positions: int) -> dict:
    """Keyword arguments for ``transformers.GenerationConfig`` of a Whisper model.

    Args:
      ct2_config: the CTranslate2 ``config.json`` (suppress_ids, suppress_ids_begin,
        lang_ids, alignment_heads).
      special_ids: special token content -> id, from the tokenizer.
      vocab_size: rows of the token embedding; 51865+ means multilingual, 51864 English-only.
      max_target_positions: rows of the decoder position table (the longest decode).

    Multilingual models get ``lang_to_id`` (every ``<|xx|>`` special token), ``task_to_id``
    and the default task ``transcribe`` (the language is detected unless given).
    English-only models get none of these: their CTranslate2 ``lang_ids`` are not language
    tokens of their vocabulary, and a ``lang_to_id`` would make ``generate`` try language
    detection.
    """
    missing = [t for t in (END_OF_TEXT, START_OF_TRANSCRIPT, NO_TIMESTAMPS) if t not in special_ids]
    if missing:
        raise ValueError(f"tokenizer lacks the special tokens {missing}")
    suppress, suppress_begin = _suppressed_ids(ct2_config, vocab_size)
    end_of_text = special_ids[END_OF_TEXT]
    is_multilingual = vocab_size >= MULTILINGUAL_MIN_VOCAB_SIZE
    settings = {
        "decoder_start_token_id": special_ids[START_OF_TRANSCRIPT],
        "bos_token_id": end_of_text,
        "eos_token_id": end_of_text,
        "pad_token_id": end_of_text,
        "suppress_tokens": suppress,
        "begin_suppress_tokens": suppress_begin,
        "no_timestamps_token_id": special_ids[NO_TIMESTAMPS],
        "max_initial_timestamp_index": round(MAX_INITIAL_TIMESTAMP_SECONDS / TIMESTAMP_SECONDS),
        "return_timestamps": False,
        "max_length": max_target_positions,
        "is_multilingual": is_multilingual,
    }
    if START_OF_PREV in special_ids:
        settings["prev_sot_token_id"] = special_ids[START_OF_PREV]
    if ct2_config.get("alignment_heads"):
        settings["alignment_heads"] = [list(pair) for pair in ct2_config["alignment_heads"]]
    if is_multilingual:
        settings.update(_multilingual_settings(ct2_config, special_ids))
    return settings


def _suppressed_ids(ct2_config: dict, vocab_size: int) -> tuple[list[int], list[int]]:
    """``(suppress_ids, suppress_ids_begin)`` of the CTranslate2 config, checked against the vocab."""
    suppress = list(ct2_config.get("suppress_ids") or [])
    suppress_begin = list(ct2_config.get("suppress_ids_begin") or [])
    out_of_range = [i for i in suppress + suppress_begin if not 0 <= i < vocab_size]
    if out_of_range:
        raise ValueError(f"suppressed token ids {out_of_range} are outside the vocabulary "
                         f"of {vocab_size}")
    return suppress, suppress_begin


def _multilingual_settings(ct2_config: dict, special_ids: dict[str, int]) -> dict:
    """``lang_to_id``, ``task_to_id`` and the default ``task`` of a multilingual model."""
    lang_to_id = {token: i for token, i in special_ids.items() if LANGUAGE_TOKEN.fullmatch(token)}
    ct2_lang_ids = ct2_config.get("lang_ids") or []
    if not lang_to_id or (ct2_lang_ids and set(ct2_lang_ids) != set(lang_to_id.values())):
        raise ValueError(f"language tokens of the tokenizer {sorted(lang_to_id.values())} do not "
                         f"match the CTranslate2 lang_ids {sorted(ct2_lang_ids)}")
    missing_tasks = [t for t in (TRANSCRIBE, TRANSLATE) if t not in special_ids]
    if missing_tasks:
        raise ValueError(f"multilingual tokenizer lacks the task tokens {missing_tasks}")
    return {
        "lang_to_id": dict(sorted(lang_to_id.items(), key=lambda item: item[1])),
        "task_to_id": {"transcribe": special_ids[TRANSCRIBE], "translate": special_ids[TRANSLATE]},
        # Without a task, generate() would prompt [sot, language, notimestamps] after language
        # detection, which Whisper never saw in training; openai/whisper defaults to transcribe.
        "task": DEFAULT_TASK,
    }


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: cannot read JSON ({error})") from None


def _chunk_seconds(max_source_positions: int, path: Path) -> int:
    """Seconds of audio the encoder takes: positions * conv stride = mel frames (30 s: 1500)."""
    seconds, remainder = divmod(max_source_positions * ENCODER_CONV_STRIDE * HOP_LENGTH,
                                SAMPLE_RATE)
    if remainder:
        raise ValueError(f"{path}: {max_source_positions} encoder positions are not a whole "
                         "number of seconds of audio")
    return seconds


def _save_processor(out_dir: Path, tokenizer_path: Path, special_ids: dict[str, int],
                    n_mels: int, chunk_seconds: int) -> None:
    """WhisperProcessor: log-mel features [n_mels, chunk frames] + the model's tokenizer."""
    from transformers import WhisperFeatureExtractor, WhisperProcessor, WhisperTokenizer

    feature_extractor = WhisperFeatureExtractor(
        feature_size=n_mels, sampling_rate=SAMPLE_RATE, hop_length=HOP_LENGTH,
        chunk_length=chunk_seconds, n_fft=N_FFT,
    )
    ordered_specials = sorted(special_ids, key=special_ids.get)
    tokenizer = WhisperTokenizer(
        tokenizer_file=str(tokenizer_path),
        unk_token=END_OF_TEXT, bos_token=END_OF_TEXT, eos_token=END_OF_TEXT, pad_token=END_OF_TEXT,
        extra_special_tokens=[token for token in ordered_specials if token != END_OF_TEXT],
    )
    WhisperProcessor(feature_extractor=feature_extractor, tokenizer=tokenizer).save_pretrained(out_dir)


def ct2_whisper_to_transformers(ct2_dir: str | Path, out_dir: str | Path) -> None:
    """Convert a CTranslate2 Whisper folder into a transformers Whisper folder.

    Reads ``model.bin``, ``config.json`` and ``tokenizer.json`` from ``ct2_dir`` and writes
    into ``out_dir``: ``config.json`` + ``model.safetensors`` (float32) for
    ``WhisperForConditionalGeneration.from_pretrained``, the tokenizer and feature extractor
    for ``WhisperProcessor.from_pretrained``, and ``generation_config.json``. Every size is
    derived from the arrays: d_model and vocab from the token embedding [vocab, d], n_mels
    from conv1 [d, n_mels, 3], layer counts from the layer names, heads from
    ``encoder/num_heads`` / ``decoder/num_heads``, ffn widths from fc1 [ffn, d], and
    max_source/target_positions from the position tables. The caller makes ``out_dir`` and
    moves it into place atomically.

    Raises:
      ValueError: naming the file, for a corrupt file, a model that is not Whisper, or
        weights this mapping does not account for.
    """
    # torch/transformers are imported here so that read_ct2_model stays numpy-only.
    import torch
    from transformers import GenerationConfig, WhisperForConditionalGeneration

    ct2_dir, out_dir = Path(ct2_dir), Path(out_dir)
    src, ct2_config, tokenizer_path, special_ids = _read_ct2_whisper(ct2_dir)
    state, heads = _convert_weights(src)
    sizes = _model_sizes(src, state, heads)
    chunk_seconds = _chunk_seconds(sizes["max_source_positions"], src.path)
    settings = generation_settings(ct2_config, special_ids, sizes["vocab_size"],
                                   sizes["max_target_positions"])
    config = _whisper_config(sizes, settings)

    with torch.device("meta"):
        model = WhisperForConditionalGeneration(config)
    # strict: every architecture key gets exactly one converted tensor of the right shape.
    model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True,
                          assign=True)
    model.generation_config = GenerationConfig(**settings)
    model.save_pretrained(out_dir)
    _save_processor(out_dir, tokenizer_path, special_ids, sizes["num_mel_bins"], chunk_seconds)


def _read_ct2_whisper(ct2_dir: Path) -> tuple[_Ct2Variables, dict, Path, dict[str, int]]:
    """``(variables, config.json, tokenizer.json path, special token ids)`` of a Whisper folder."""
    model_path = ct2_dir / MODEL_FILE
    variables, aliases, spec_name = read_ct2_model(model_path)
    if spec_name != WHISPER_SPEC_NAME:
        raise ValueError(f"{model_path}: spec is {spec_name!r}, expected {WHISPER_SPEC_NAME!r}")
    ct2_config = _read_json(ct2_dir / CONFIG_FILE)
    tokenizer_path = ct2_dir / TOKENIZER_FILE
    special_ids = special_token_ids(_read_json(tokenizer_path))
    return _Ct2Variables(model_path, variables, aliases), ct2_config, tokenizer_path, special_ids


def _convert_weights(src: _Ct2Variables) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """The transformers state dict and ``{encoder,decoder}_attention_heads`` of the model.

    Every stored variable must be used by the mapping.
    """
    _check_decoder_flags(src)
    heads = {
        "encoder_attention_heads": src.scalar("encoder/num_heads"),
        "decoder_attention_heads": src.scalar("decoder/num_heads"),
    }
    state = _whisper_state_dict(src)
    src.check_all_used()
    return state, heads


def _model_sizes(src: _Ct2Variables, state: dict[str, np.ndarray], heads: dict[str, int]) -> dict:
    """``WhisperConfig`` size arguments, all derived from the converted arrays and head counts."""
    vocab_size, d_model = state["model.decoder.embed_tokens.weight"].shape
    for count in heads.values():
        if count <= 0 or d_model % count:
            raise ValueError(f"{src.path}: {count} heads do not divide d_model {d_model}")
    return {
        "vocab_size": vocab_size,
        "num_mel_bins": state["model.encoder.conv1.weight"].shape[1],
        "d_model": d_model,
        "encoder_layers": src.layer_count("encoder"),
        "decoder_layers": src.layer_count("decoder"),
        **heads,
        "encoder_ffn_dim": state["model.encoder.layers.0.fc1.weight"].shape[0],
        "decoder_ffn_dim": state["model.decoder.layers.0.fc1.weight"].shape[0],
        "max_source_positions": state["model.encoder.embed_positions.weight"].shape[0],
        "max_target_positions": state["model.decoder.embed_positions.weight"].shape[0],
    }


def _whisper_config(sizes: dict, settings: dict):
    """A ``WhisperConfig`` of the given sizes with the generation settings' special token ids."""
    from transformers import WhisperConfig

    return WhisperConfig(
        **sizes,
        activation_function="gelu",
        scale_embedding=False,
        tie_word_embeddings=True,
        decoder_start_token_id=settings["decoder_start_token_id"],
        bos_token_id=settings["bos_token_id"],
        eos_token_id=settings["eos_token_id"],
        pad_token_id=settings["pad_token_id"],
        suppress_tokens=settings["suppress_tokens"],
        begin_suppress_tokens=settings["begin_suppress_tokens"],
    )
