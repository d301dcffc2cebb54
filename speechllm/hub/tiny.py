"""Tiny random-init models for tests, built offline in seconds.

`tiny-random-llama`: a 2-layer Llama with a byte-level BPE tokenizer trained here on a few
sentences, with ChatML control tokens and a chat template like SmolLM2's.
`tiny-random-whisper`: a 2-layer Whisper (64 wide, 80 mel bins) with its feature extractor;
`tiny-random-whisper-128mel`: the same with 128 mel bins, the log-mel input of Whisper large-v3.
Both are deterministic for a given torch / tokenizers version (fixed seed).
"""

from __future__ import annotations

from pathlib import Path

SEED = 0
LLM_INIT_STD = 0.15
"""Weight init of the tiny LLM: larger than the usual 0.02, so that its outputs depend on its
inputs enough for a few adapter steps to move the loss (training tests need a learnable signal)."""
TINY_VOCAB = 400
"""BPE vocabulary size including the 256 byte symbols and the special tokens."""
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
_CORPUS = [
    "You are a helpful assistant.",
    "What can you hear in the audio?",
    "The speaker is a woman with a high pitch, speaking fast and loud.",
    "The speaker is a man with a low pitch, speaking slowly in a quiet voice.",
    "The recording is clean, there is no background noise.",
    "The recording is noisy, with background noise behind the voice.",
    "Gender: Female, Pitch: High, Speaking speed: Fast, Volume: Normal, Noise: Clean",
    "Gender: Male, Pitch: Low, Speaking speed: Slow, Volume: Quiet, Noise: Noisy",
    "unless to be rather cold hearted and rather selfish is to be ill disposed",
    "he might even have been made amiable himself",
    "Answer in JSON. Answer in lowercase letters only. Wrap your answer in double quotes.",
    "0 1 2 3 4 5 6 7 8 9 seconds [00:00-00:05]",
]


def build_tiny_tokenizer():
    """A `PreTrainedTokenizerFast` with ChatML specials and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TINY_VOCAB, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    fast.chat_template = CHATML_TEMPLATE
    return fast


def build_tiny_llm(out: Path) -> None:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tokenizer = build_tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        tie_word_embeddings=True, initializer_range=LLM_INIT_STD, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                                               pad_token_id=config.pad_token_id)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


WHISPER_MEL_BINS = 80
"""Log-mel bins of Whisper tiny to large-v2."""
WHISPER_V3_MEL_BINS = 128
"""Log-mel bins of Whisper large-v3."""


def build_tiny_whisper(out: Path, n_mels: int = WHISPER_MEL_BINS) -> None:
    import torch
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration

    config = WhisperConfig(
        vocab_size=128, num_mel_bins=n_mels, d_model=64, encoder_layers=2, encoder_attention_heads=4,
        decoder_layers=1, decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128,
        max_source_positions=1500, max_target_positions=64, pad_token_id=0, bos_token_id=1,
        eos_token_id=2, decoder_start_token_id=1,
    )
    torch.manual_seed(SEED)
    WhisperForConditionalGeneration(config).save_pretrained(out)
    WhisperFeatureExtractor(feature_size=n_mels).save_pretrained(out)


def build_tiny_audio_classifier(out: Path, labels: list[str], kind: str = "wav2vec2") -> None:
    """A tiny random-init transformers audio-classification model with its feature extractor,
    labels in its config's `id2label` (what `speechllm annotate --classifier KEY=FOLDER` loads).
    `kind`: "wav2vec2" (raw waveform input, attention mask) or "whisper" (log-mel input)."""
    import torch

    id2label = dict(enumerate(labels))
    label2id = {v: k for k, v in id2label.items()}
    torch.manual_seed(SEED)
    if kind == "wav2vec2":
        from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2ForSequenceClassification

        config = Wav2Vec2Config(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            conv_dim=(16, 16, 16), conv_stride=(5, 4, 4), conv_kernel=(10, 4, 4), feat_extract_norm="layer",
            num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2, classifier_proj_size=16,
            id2label=id2label, label2id=label2id,
        )
        Wav2Vec2ForSequenceClassification(config).save_pretrained(out)
        Wav2Vec2FeatureExtractor(return_attention_mask=True, do_normalize=True).save_pretrained(out)
    elif kind == "whisper":
        from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperForAudioClassification

        config = WhisperConfig(
            vocab_size=128, num_mel_bins=80, d_model=32, encoder_layers=1, encoder_attention_heads=2,
            decoder_layers=1, decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
            max_source_positions=1500, classifier_proj_size=16, id2label=id2label, label2id=label2id,
            pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
        )
        WhisperForAudioClassification(config).save_pretrained(out)
        WhisperFeatureExtractor(feature_size=80).save_pretrained(out)
    else:
        raise ValueError(f"unknown tiny classifier kind '{kind}' (wav2vec2 or whisper)")
