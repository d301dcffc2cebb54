"""The speech model: tapped Whisper encoder -> adapter -> frozen chat LLM."""

from .adapters import ADAPTERS, build_adapter, register_adapter
from .encoder import WhisperTappedEncoder, load_whisper_encoder
from .speechllm import Batch, CheckpointError, Example, SpeechLLM, build_model

__all__ = ["ADAPTERS", "Batch", "CheckpointError", "Example", "SpeechLLM", "WhisperTappedEncoder",
           "build_adapter", "build_model", "load_whisper_encoder", "register_adapter"]
