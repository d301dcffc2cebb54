"""Transcripts.

The embedded Whisper models keep their original CTranslate2 copy (see `speechllm.weights`), which
CTranslate2 runs directly and fast on a CPU; any other model (a Whisper or CTC folder or hub id)
runs through transformers' automatic-speech-recognition pipeline.
"""

from __future__ import annotations

import numpy as np

from speechllm.hub import weights
from speechllm.io.audio import SAMPLE_RATE

from .base import Annotation, Annotator, Clip, register_annotator

MAX_DECODE_TOKENS = 224
"""Longest transcript decoded for one 30 s window (Whisper's own default sample_len)."""


class SpeechRecognizer:
    """Greedy (or beam) transcription of 16 kHz clips up to 30 s.

    Args:
        model: embedded Whisper name, or local folder / hub id of any transformers ASR model.
        beam_size: 1 is greedy decoding.
        threads: CPU threads for CTranslate2 (0 = its default).
        compute_type: CTranslate2 compute type; float32 is exact on any CPU, int8 is faster.
    """

    def __init__(self, model: str = "whisper-tiny.en", beam_size: int = 1, threads: int = 0,
                 compute_type: str = "float32"):
        self.model_name, self.beam_size = model, beam_size
        self.prompt_ids: list[int] | None = None
        """The decoder's start tokens when CTranslate2 runs the model (None: transformers' pipeline
        picks its own)."""
        ct2 = weights.ct2_path(model) if model in weights.REGISTRY else None
        if ct2 is not None:
            import ctranslate2
            from tokenizers import Tokenizer
            from transformers import WhisperFeatureExtractor

            self.feature_extractor = WhisperFeatureExtractor.from_pretrained(weights.resolve(model))
            self._ct2 = ctranslate2.models.Whisper(str(ct2), device="cpu", compute_type=compute_type,
                                                   intra_threads=threads)
            self._tokenizer = Tokenizer.from_file(str(ct2 / "tokenizer.json"))
            prompt = ["<|startoftranscript|>"]
            if self._ct2.is_multilingual:
                prompt += ["<|en|>", "<|transcribe|>"]
            prompt.append("<|notimestamps|>")
            self.prompt_ids = [self._tokenizer.token_to_id(t) for t in prompt]
            self._pipe = None
        else:
            from transformers import pipeline

            self._ct2 = None
            self._pipe = pipeline("automatic-speech-recognition", model=weights.resolve(model))
            config = self._pipe.model.config
            kwargs = {}
            if config.model_type == "whisper":
                # the decoder holds max_target_positions tokens, the start-of-transcript prompt included
                room = getattr(config, "max_target_positions", MAX_DECODE_TOKENS + 4) - 4
                kwargs = {"num_beams": beam_size, "max_new_tokens": min(MAX_DECODE_TOKENS, room)}
            self._generate_kwargs = kwargs

    def transcribe(self, waveforms: list[np.ndarray]) -> list[str]:
        """Transcripts of 16 kHz mono float32 clips (each at most 30 s)."""
        if not waveforms:
            return []
        if self._ct2 is None:
            inputs = [{"raw": w, "sampling_rate": SAMPLE_RATE} for w in waveforms]
            kwargs = {"generate_kwargs": self._generate_kwargs} if self._generate_kwargs else {}
            return [r["text"].strip() for r in self._pipe(inputs, batch_size=len(inputs), **kwargs)]
        import ctranslate2

        feats = self.feature_extractor(waveforms, sampling_rate=SAMPLE_RATE, return_tensors="np")["input_features"]
        results = self._ct2.generate(ctranslate2.StorageView.from_array(np.ascontiguousarray(feats)),
                                     [self.prompt_ids] * len(waveforms), beam_size=self.beam_size,
                                     max_length=MAX_DECODE_TOKENS, suppress_blank=True)
        return [self._tokenizer.decode(r.sequences_ids[0], skip_special_tokens=True).strip() for r in results]

@register_annotator
class Transcript(Annotator):
    """ASR transcript (embedded whisper-tiny.en by default; any transformers ASR model by name).

    Args:
        model: Whisper model name, folder or hub id (`speechllm annotate --asr-model`).
        threads: CTranslate2 CPU threads (the pipeline gives each worker its share).
    """

    name, version = "transcript", "1"

    def __init__(self, model: str = "whisper-tiny.en", threads: int = 0):
        self.model = model
        self.asr = SpeechRecognizer(model, threads=threads)

    def annotate(self, clips: list[Clip], prior) -> list[Annotation]:
        texts = self.asr.transcribe([c.wav for c in clips])
        return [Annotation(value=t, extra={"model": self.model}) for t in texts]
