"""The labelled synthetic speech corpus (`speechllm synth`): see `corpus` for how each label is
made; `sentences.txt` (CC0) and `calibration.json` (written by scripts/calibrate_synth.py) lie
beside it."""

from .corpus import VOICES, SynthError, synthesize

__all__ = ["VOICES", "SynthError", "synthesize"]
