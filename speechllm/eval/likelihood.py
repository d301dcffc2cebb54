"""Accuracy by likelihood: which of an attribute's answers does the speech model find likeliest?

For each clip, the attribute's question with each value's short answer as the target ("The speaker
is male.", "The speaker is female."); the value whose answer has the lowest mean token loss wins.
No decoding: a model that knows the voice but words its answer oddly (or follows an unfamiliar
answer-format line badly) is still seen to know it, and one that prefers one answer whatever the
audio scores the share of that value, as a constant answerer does. The field scores multiple-choice
tasks this way too (lm-evaluation-harness's loglikelihood tasks); `speechllm eval` scores generated
answers, and the demo's experiment 3 reports both.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..labels import ATTRIBUTES
from ..records import MetadataRecord
from .forgetting import bootstrap_interval

if TYPE_CHECKING:
    import torch

    from ..model.speechllm import SpeechLLM


@dataclass
class LikelihoodAccuracy:
    attribute: str
    items: int
    """Clips with a value of the attribute among its known values."""
    accuracy: float | None
    ci_low: float | None
    ci_high: float | None
    chance: float
    """1 / number of values."""
    majority: float | None
    """Share of the commonest value among the items: what always preferring it scores."""
    question: str

    def to_json(self) -> dict:
        return dict(self.__dict__)


def clip_states(model: "SpeechLLM", audio: Path) -> list["torch.Tensor"]:
    """The tapped encoder states of one clip, trimmed to its frames: [(frames, width)] per tap."""
    from ..io.audio import load_audio

    enc = model.encoder.encode([load_audio(audio)])
    return [s[0, : int(enc.lengths[0])] for s in enc.states]


def choose(model: "SpeechLLM", question: str, states: list["torch.Tensor"], transcript: str | None,
           answers: list[str]) -> int:
    """Index of the answer with the lowest loss after [audio][transcript][question]."""
    import torch

    from ..model.speechllm import Example

    with torch.no_grad():
        losses = [float(model([Example(question, states=states, transcript=transcript, target=a)])) for a in answers]
    return min(range(len(answers)), key=losses.__getitem__)


def accuracy_by_likelihood(model: "SpeechLLM", records: list[MetadataRecord], audio_root: Path, attribute: str,
                           seed: int = 0, states: dict[str, list["torch.Tensor"]] | None = None
                           ) -> LikelihoodAccuracy:
    """The attribute's accuracy by likelihood over `records` (audio paths relative to `audio_root`;
    `states`: encoder states already computed, by record id), with a 95% bootstrap interval."""
    attr = ATTRIBUTES[attribute]
    values = list(attr.values)
    items = [(r, values.index(r.value(attribute).lower())) for r in records
             if r.value(attribute) and r.value(attribute).lower() in values]
    right = np.zeros(len(items))
    for i, (rec, truth) in enumerate(items):
        s = states[rec.id] if states and rec.id in states else clip_states(model, audio_root / rec.audio)
        answers = [attr.answer.format(value=v) for v in values]
        right[i] = choose(model, attr.question, s, rec.asr_transcript or rec.transcript, answers) == truth
    low, high = bootstrap_interval(len(items), lambda idx: right[idx].mean(1), seed=seed)
    counts = collections.Counter(t for _, t in items)
    return LikelihoodAccuracy(attribute, len(items), float(right.mean()) if items else None, low, high,
                              1 / len(values), max(counts.values()) / len(items) if items else None, attr.question)
