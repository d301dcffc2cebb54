"""Accuracy by likelihood: which of an attribute's answers does the speech model find likeliest?

For each clip, the attribute's question with each value's short answer as the target ("The speaker
is male.", "The speaker is female."); the value whose answer has the lowest mean token loss wins.
No decoding: a model that knows the voice but words its answer oddly (or follows an unfamiliar
answer-format line badly) is still seen to know it, and one that prefers one answer whatever the
audio scores the share of that value, as a constant answerer does. The field scores multiple-choice
tasks this way too (lm-evaluation-harness's loglikelihood tasks); `speechllm eval` scores generated
answers, and the demo's experiment 3 reports both. Beside it, `accuracy_as_asked`: the same items
answered by greedy decoding to one fixed question (the training phrasing, say), scored leniently:
what a user asking that way gets.
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
class AttributeAccuracy:
    """An attribute's accuracy over clips, by likelihood or by generated answers."""
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
    """The question asked (by likelihood: the attribute's first phrasing)."""

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


def _items(records: list[MetadataRecord], attribute: str) -> list[tuple[MetadataRecord, int]]:
    """(record, index of its value) for the records whose value is one of the attribute's values."""
    values = list(ATTRIBUTES[attribute].values)
    return [(r, values.index(r.value(attribute).lower())) for r in records
            if r.value(attribute) and r.value(attribute).lower() in values]


def summarize(attribute: str, question: str, truths: list[str], right: np.ndarray, seed: int = 0
              ) -> AttributeAccuracy:
    """An attribute's accuracy from per-item outcomes: `truths` the items' values, `right` (items,)
    1.0 where the item was answered right; with a 95% bootstrap interval, chance and the share of
    the commonest value."""
    low, high = bootstrap_interval(len(truths), lambda idx: right[idx].mean(1), seed=seed)
    counts = collections.Counter(truths)
    return AttributeAccuracy(attribute, len(truths), float(right.mean()) if truths else None, low, high,
                              1 / len(ATTRIBUTES[attribute].values),
                              max(counts.values()) / len(truths) if truths else None, question)


def _result(attribute: str, question: str, items: list[tuple[MetadataRecord, int]], right: np.ndarray,
            seed: int) -> AttributeAccuracy:
    values = ATTRIBUTES[attribute].values
    return summarize(attribute, question, [values[t] for _, t in items], right, seed)


def accuracy_as_asked(model: "SpeechLLM", records: list[MetadataRecord], audio_root: Path, attribute: str,
                      question: str, max_new_tokens: int = 24, batch_size: int = 16, seed: int = 0,
                      states: dict[str, list["torch.Tensor"]] | None = None) -> AttributeAccuracy:
    """The attribute's accuracy of greedy answers to `question` (no answer-format line added),
    the value read leniently from each answer (`labels.extract_lenient`), with a 95% interval.
    Clips are encoded `CHUNK_BATCHES` batches' worth at a time (their states held only for the
    chunk), each chunk decoded `batch_size` at once with freed rows refilled from it."""
    import torch

    from ..config import GenerationConfig
    from ..labels import extract_lenient
    from ..model.speechllm import Example
    from .answer import speech_answers
    from .generations import CHUNK_BATCHES

    values = list(ATTRIBUTES[attribute].values)
    items = _items(records, attribute)
    gen = GenerationConfig(max_new_tokens=max_new_tokens)
    answers: list[str] = []
    step = batch_size * CHUNK_BATCHES
    for start in range(0, len(items), step):
        chunk = items[start: start + step]
        exs = [Example(question, states=states[r.id] if states and r.id in states else
                       clip_states(model, audio_root / r.audio), transcript=r.asr_transcript or r.transcript)
               for r, _ in chunk]
        with torch.no_grad():
            answers += speech_answers(model, exs, gen, batch_size)
    right = np.array([extract_lenient(a, values, question) == values[t] for a, (_, t) in zip(answers, items)],
                     dtype=float)
    return _result(attribute, question, items, right, seed)


def accuracy_by_likelihood(model: "SpeechLLM", records: list[MetadataRecord], audio_root: Path, attribute: str,
                           seed: int = 0, states: dict[str, list["torch.Tensor"]] | None = None
                           ) -> AttributeAccuracy:
    """The attribute's accuracy by likelihood over `records` (audio paths relative to `audio_root`;
    `states`: encoder states already computed, by record id), with a 95% bootstrap interval."""
    attr = ATTRIBUTES[attribute]
    items = _items(records, attribute)
    answers = [attr.answer.format(value=v) for v in attr.values]
    right = np.zeros(len(items))
    for i, (rec, truth) in enumerate(items):
        s = states[rec.id] if states and rec.id in states else clip_states(model, audio_root / rec.audio)
        right[i] = choose(model, attr.question, s, rec.asr_transcript or rec.transcript, answers) == truth
    return _result(attribute, attr.question, items, right, seed)
