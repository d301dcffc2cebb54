"""Teacher fidelity: how often the teacher's answer from a description agrees with that
description.

Self-output targets can teach the speech model only the facts the teacher reads. The probe asks
the teacher, on a seeded sample of the run's own descriptions, each attribute's question (the
run's own instruction about that attribute when its pool has one, else the attribute table's
phrasings) with the run's prompt (worked examples included), and scores the answer against the
value the description states: the label extracted from the answer (lenient, as the evaluation
extracts it) for attributes, and whether the answer contains the transcript (after Whisper's
English normalisation) for the words spoken.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from ..labels import ATTRIBUTES, TRANSCRIPT, TRANSCRIPT_QUESTION, attribute_of, extract_lenient, generic
from .examples import ExamplePool, described_value

MIN_VALUES = 2
"""An attribute is probed only when the descriptions state at least this many distinct values."""


@dataclass(frozen=True)
class Probe:
    """One probe question about one clip."""
    id: str
    attribute: str
    """An attribute key, or `transcript`."""
    description: str
    instruction: str
    expected: str
    """The value the description states (the transcript for `transcript`)."""
    values: tuple[str, ...] = ()
    """The attribute's values seen in the descriptions (what an answer is extracted against)."""


@dataclass
class Fidelity:
    """Per attribute: probes and agreements."""
    examples: int
    """Worked examples per question in the prompt probed."""
    asked: dict[str, int] = field(default_factory=dict)
    agreed: dict[str, int] = field(default_factory=dict)

    def rate(self, attribute: str) -> float:
        return self.agreed.get(attribute, 0) / self.asked[attribute] if self.asked.get(attribute) else 0.0

    def to_json(self) -> dict:
        return {"examples": self.examples, "attributes": {a: {"asked": n, "agreed": self.agreed.get(a, 0),
                                                             "fidelity": round(self.rate(a), 4)}
                                                         for a, n in self.asked.items()}}

    @classmethod
    def from_json(cls, obj: dict) -> "Fidelity":
        """The counts `to_json` wrote (a fidelity file, or the demo report's section)."""
        attributes = obj["attributes"]
        return cls(obj["examples"], {a: v["asked"] for a, v in attributes.items()},
                   {a: v["agreed"] for a, v in attributes.items()})

    def line(self) -> str:
        parts = [f"{a} {self.agreed.get(a, 0)}/{n} ({self.rate(a):.0%})" for a, n in self.asked.items()]
        prompt = f"{self.examples} worked examples" if self.examples else "zero-shot"
        return f"teacher fidelity ({prompt}): " + ", ".join(parts) if parts else "teacher fidelity: nothing to probe"


def _values(descriptions: list[tuple[str, str]], attribute: str) -> list[tuple[str, str, str]]:
    """(id, description, stated value) of every clip whose description states `attribute`."""
    out = []
    for clip_id, description in descriptions:
        value = described_value(description, attribute)
        if value:
            out.append((clip_id, description, value))
    return out


def probes(descriptions: list[tuple[str, str]], pool: list[str], per_attribute: int, seed: int) -> list[Probe]:
    """A seeded sample of up to `per_attribute` probe questions per attribute the descriptions
    state with at least two values (and for the transcript), from the instruction pool's questions
    about that attribute, else the table's phrasings."""
    out: list[Probe] = []
    for attribute in (*ATTRIBUTES, TRANSCRIPT):
        stated = _values(descriptions, attribute)
        seen = sorted({v for _, _, v in stated})
        if attribute != TRANSCRIPT and len(seen) < MIN_VALUES:
            continue
        if not stated:
            continue
        questions = [q for q in pool if attribute_of(q) == attribute] or (
            [TRANSCRIPT_QUESTION] if attribute == TRANSCRIPT else list(generic(attribute).phrasings))
        rng = random.Random(f"{seed}:fidelity:{attribute}")
        order = [v for v in generic(attribute).values if v in seen] + [v for v in seen
                                                                      if v not in generic(attribute).values]
        for clip_id, description, value in rng.sample(stated, min(per_attribute, len(stated))):
            out.append(Probe(clip_id, attribute, description, rng.choice(questions), value,
                             tuple(order) if attribute != TRANSCRIPT else ()))
    return out


def agrees(probe: Probe, answer: str) -> bool:
    """Whether the teacher's answer states the value the description states."""
    if probe.attribute == TRANSCRIPT:
        from annotate.evaluate import normalize_text

        said = normalize_text(probe.expected)
        return bool(said) and said in normalize_text(answer)
    return extract_lenient(answer, list(probe.values), probe.instruction) == probe.expected


def probe_prompts(items: list[Probe], examples: ExamplePool) -> list[tuple[str, list]]:
    """(user text, worked-example turns) of every probe: its description and question, with the
    worked examples the pool draws for it."""
    from ..model.prompt import description_prompt

    return [(description_prompt(p.description, p.instruction),
             [e.turn() for e in examples.draw(p.id, p.instruction)]) for p in items]


def measure(items: list[Probe], answer, examples: ExamplePool) -> Fidelity:
    """Ask every probe (through `answer`: a list of (user text, worked-example turns) -> answers)
    with the worked examples the pool draws for it, and count agreements."""
    prompts = probe_prompts(items, examples)
    result = Fidelity(examples.k)
    for probe, text in zip(items, answer(prompts)):
        result.asked[probe.attribute] = result.asked.get(probe.attribute, 0) + 1
        result.agreed[probe.attribute] = result.agreed.get(probe.attribute, 0) + agrees(probe, text)
    return result
