"""Worked examples for the teacher: how a question about one attribute is answered from a
description, shown before the record's own description (in-context learning).

A 135M teacher asked "Is the speaker male or female?" zero-shot gives the same word whatever the
description says; shown first two other clips' descriptions (one male, one female) with the
answer their descriptions give, it reads. Examples are drawn, seeded by the record's id, from the
other clips of the same metadata file (never the record's own clip), covering as many different
values of the attribute as there are examples; their answers are short sentences from the
attribute table (`speechllm.labels`). Open instructions get no examples: no answer to "What can
you hear?" can be written without putting words in the teacher's mouth.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from annotate.description import parse_description

from ..io.jsonl import JsonlError, iter_lines
from ..labels import ATTRIBUTES, TRANSCRIPT, TRANSCRIPT_ANSWER, attribute_of, generic
from ..model.prompt import description_prompt

Turn = tuple[str, str]
"""One worked example: (user turn, assistant answer)."""


@dataclass(frozen=True)
class Example:
    """A worked example before it is asked: a description, the question and its answer."""
    id: str
    """The clip it comes from (never the record's own)."""
    description: str
    instruction: str
    answer: str

    def turn(self) -> Turn:
        return description_prompt(self.description, self.instruction), self.answer


def described_value(description: str, attribute: str) -> str | None:
    """The value of `attribute` (or the transcript) that a description states, None if it does not."""
    transcript, fields = parse_description(description)
    return transcript if attribute == TRANSCRIPT else fields.get(attribute)


def answer_for(attribute: str, value: str) -> str:
    """The worked example's answer stating `value`."""
    if attribute == TRANSCRIPT:
        return TRANSCRIPT_ANSWER.format(value=value)
    template = generic(attribute).answer or f"The speaker's {attribute} is {{value}}."
    return template.format(value=value)


class ExamplePool:
    """Worked examples for every record of a run, seeded by (seed, record id, attribute).

    Args:
        clips: (id, description) of every clip the examples may come from.
        k: examples per question (0: none).
        seed: the run's seed.
        given: examples from a file (`targets.example_file`) instead of drawing from `clips`.
    """

    def __init__(self, clips: list[tuple[str, str]], k: int, seed: int, given: list[Example] | None = None):
        self.k, self.seed, self.given = k, seed, given
        self.by_value: dict[str, dict[str, list[tuple[str, str]]]] = {}
        if given is None:
            for attribute in (*ATTRIBUTES, TRANSCRIPT):
                groups: dict[str, list[tuple[str, str]]] = {}
                for clip_id, description in clips:
                    value = described_value(description, attribute)
                    if value:
                        groups.setdefault(value if attribute != TRANSCRIPT else "", []).append((clip_id, description))
                if groups:
                    self.by_value[attribute] = groups

    def draw(self, record_id: str, instruction: str) -> list[Example]:
        """The worked examples shown before `record_id`'s description when it is asked
        `instruction` (the same question, asked of other clips)."""
        if self.k <= 0:
            return []
        attribute = attribute_of(instruction)
        rng = random.Random(f"{self.seed}:{record_id}:{attribute}")
        if self.given is not None:
            fits = [e for e in self.given if attribute_of(e.instruction) == attribute and e.id != record_id]
            return rng.sample(fits, min(self.k, len(fits)))
        groups = self.by_value.get(attribute) if attribute else None
        if not groups:
            return []
        values = sorted(groups)
        rng.shuffle(values)
        out: list[Example] = []
        used: set[str] = {record_id}
        for i in range(self.k * len(values)):  # round-robin over values until k are found
            if len(out) == self.k:
                break
            value = values[i % len(values)]
            choices = [c for c in groups[value] if c[0] not in used]
            if not choices:
                continue
            clip_id, description = rng.choice(choices)
            used.add(clip_id)
            shown = described_value(description, attribute) or value
            out.append(Example(clip_id, description, instruction, answer_for(attribute, shown)))
        return out


def read_examples(path: str | Path) -> list[Example]:
    """Worked examples from a JSONL file of {"description", "instruction", "answer"} (an "id"
    is optional); a malformed line is an error naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise JsonlError(f"{path}: no such examples file (targets.example_file)")
    out = []
    for line in iter_lines(path, required=("description", "instruction", "answer")):
        if line.error:
            raise JsonlError(line.error)
        rec = line.record
        if not all(isinstance(rec[k], str) and rec[k].strip() for k in ("description", "instruction", "answer")):
            raise JsonlError(f"{path}:{line.number}: description, instruction and answer must be non-empty text")
        out.append(Example(str(rec.get("id", f"{path.name}:{line.number}")), rec["description"],
                           rec["instruction"], rec["answer"]))
    return out
