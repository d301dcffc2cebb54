"""Target strategies, chosen by name through `STRATEGIES` (`--strategy`).

- `self-output` (DeSTA2): the base LLM's own answer to `<description>\\n\\n<instruction>`;
- `label`: a human-style sentence written from the labels (or annotations) by a template, the
  "ground truth" baseline known to cause forgetting;
- `paraphrase`: the base LLM rewrites the label target in its own words;
- `selective` (Selective Self-Rehearsal): the self-output where code checks find it agrees with
  the labels (gender words, attribute words, transcript overlap), else the label target;
- `minimum-change`: the self-output with only what the labels show to be wrong changed (a wrong
  attribute word replaced by code, a missed transcript put in; `speechllm.targets.edits`), so
  the target stays as close as possible to the model's own words. It sits between `selective`
  (wrong answers replaced whole) and `self-output` (wrong answers kept).

A strategy turns jobs into drafts; the stage (`speechllm.targets.run`) handles degenerate answers,
truncation and writing.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable

from ..config import TargetsConfig
from ..labels import ATTRIBUTES, LABEL_ONLY
from .checks import agreement
from .edits import (asks_transcript, better_edit, contains_transcript, fix_attributes, insert_transcript,
                    minimal_edit_prompt, word_edit_distance)
from ..model.generate import Generation
from ..model.prompt import description_prompt

PARAPHRASE_INSTRUCTION = ("Rewrite the following description of an audio recording in your own words, "
                          "as an answer to someone who asked what can be heard. Keep every fact.\n\n")
LABEL_TEMPLATE_VERSION = "label-template/1"
MINIMUM_CHANGE_VERSION = "minimum-change/1"
"""Version of the minimum-change edit rules, recorded in each such target's provenance."""


@dataclass
class Job:
    """One record to make a target for."""
    id: str
    audio: str
    description: str
    instruction: str
    attrs: dict[str, str]
    """Attribute words (gender, pitch, ...) from labels, else from annotation bins."""
    transcript: str | None
    examples: tuple[tuple[str, str], ...] = ()
    """Worked (user turn, answer) examples shown to the teacher before this record's turn."""
    example_ids: tuple[str, ...] = ()
    """The clips the examples come from (provenance)."""
    duration: float | None = None
    """The clip's seconds from the metadata (None when it gives none); carried into the target."""


@dataclass
class Draft:
    """A strategy's answer for one job, before degeneracy and truncation handling."""
    text: str
    source: str
    """`llm` (generated, subject to degeneracy checks and regeneration) or `template`."""
    generation: Generation | None = None
    extra: dict = field(default_factory=dict)


Prompt = tuple[str, tuple[tuple[str, str], ...]]
"""A user turn and the worked (user, answer) turns shown before it."""
Generate = Callable[[list[Prompt]], list[Generation]]
"""Answers of the base LLM to prompts (batched by the caller)."""


def self_output_prompt(job: Job) -> str:
    return description_prompt(job.description, job.instruction)


def label_target(job: Job) -> str:
    """The template target: plain statements of the labelled facts (each attribute's phrase from
    the attribute table), then the words spoken."""
    a = job.attrs
    phrase = {name: ATTRIBUTES[name].phrases for name in ("gender", "speed", "volume", "noise")}
    parts = []
    who = phrase["gender"].get(a.get("gender", ""), "a speaker")
    voice = f" with a {a['pitch']}-pitched voice" if a.get("pitch") else ""
    parts.append(f"The recording contains {who} speaking{voice}.")
    manner = [phrase[k].get(a[k], a[k]) for k in ("speed", "volume") if a.get(k)]
    if manner:
        parts.append("The speaker talks " + " and ".join(manner) + ".")
    if a.get("noise"):
        parts.append(phrase["noise"].get(a["noise"], ""))
    for key in LABEL_ONLY:
        if a.get(key):
            parts.append(f"The speaker's {key} is {a[key]}.")
    if job.transcript:
        parts.append(f'The speaker says: "{job.transcript.strip()}"')
    return " ".join(p for p in parts if p)


class Strategy:
    """A way to make targets, built from the run's `targets` settings (`STRATEGIES[name](cfg)`)."""
    name = ""

    def __init__(self, cfg: TargetsConfig | None = None):
        self.cfg = cfg if cfg is not None else TargetsConfig()

    def drafts(self, jobs: list[Job], generate: Generate, min_recall: float) -> list[Draft]:
        """One draft per job, in order."""
        raise NotImplementedError


class SelfOutput(Strategy):
    name = "self-output"

    def drafts(self, jobs: list[Job], generate: Generate, min_recall: float) -> list[Draft]:
        return [Draft(g.text, "llm", g) for g in generate([(self_output_prompt(j), j.examples) for j in jobs])]


class MinimumChange(Strategy):
    """The self-output, changed only where the labels show it wrong (`speechllm.targets.edits`).

    `targets.transcript_fix` says how a missed transcript is put in: `code` (the quoted span
    replaced, or the transcript sentence added) or `prompt` (the base LLM asked for a minimal
    edit, kept only when it holds the transcript and changes no more words than the code would)."""
    name = "minimum-change"

    def drafts(self, jobs: list[Job], generate: Generate, min_recall: float) -> list[Draft]:
        gens = generate([(self_output_prompt(j), j.examples) for j in jobs])
        texts, fixes = [], []
        for job, gen in zip(jobs, gens):
            text, made = fix_attributes(gen.text, job.attrs, job.instruction, job.transcript)
            texts.append(text)
            fixes.append([f.to_json() for f in made])
        missed = [i for i, j in enumerate(jobs) if j.transcript and asks_transcript(j.instruction)
                  and not contains_transcript(texts[i], j.transcript)]
        coded = {i: insert_transcript(texts[i], jobs[i].transcript, gens[i].finished) for i in missed}
        prompted: dict[int, str] = {}
        if missed and self.cfg.transcript_fix == "prompt":
            asked = generate([(minimal_edit_prompt(jobs[i].instruction, texts[i], jobs[i].transcript), ())
                              for i in missed])
            prompted = {i: g.text for i, g in zip(missed, asked)}
        for i in missed:
            text, fix = coded[i]
            if i in prompted and better_edit(texts[i], prompted[i], text, jobs[i].transcript):
                text, fix = prompted[i], dataclasses.replace(fix, after=prompted[i], how="prompt")
            texts[i] = text
            fixes[i].append(fix.to_json())
        return [Draft(text, "llm", gen, {"self_output": gen.text, "edit_distance": word_edit_distance(gen.text, text),
                                         "fixes": made, "kept": "minimum-change" if made else "self-output",
                                         "editor": MINIMUM_CHANGE_VERSION})
                for text, gen, made in zip(texts, gens, fixes)]


class Label(Strategy):
    name = "label"

    def drafts(self, jobs: list[Job], generate: Generate, min_recall: float) -> list[Draft]:
        return [Draft(label_target(j), "template", extra={"template": LABEL_TEMPLATE_VERSION}) for j in jobs]


class Paraphrase(Strategy):
    name = "paraphrase"

    def drafts(self, jobs: list[Job], generate: Generate, min_recall: float) -> list[Draft]:
        labels = [label_target(j) for j in jobs]
        gens = generate([(PARAPHRASE_INSTRUCTION + t, ()) for t in labels])
        return [Draft(g.text, "llm", g, {"label_target": t}) for g, t in zip(gens, labels)]


class Selective(Strategy):
    name = "selective"

    def drafts(self, jobs: list[Job], generate: Generate, min_recall: float) -> list[Draft]:
        out = []
        for job, gen in zip(jobs, generate([(self_output_prompt(j), j.examples) for j in jobs])):
            checks = agreement(gen.text, job.attrs, job.transcript, min_recall)
            if all(checks.values()):
                out.append(Draft(gen.text, "llm", gen, {"checks": checks, "kept": "self-output"}))
            else:
                out.append(Draft(label_target(job), "template",
                                 extra={"checks": checks, "kept": "label", "rejected_self_output": gen.text}))
        return out


STRATEGIES = {cls.name: cls for cls in (SelfOutput, Label, Paraphrase, Selective, MinimumChange)}
"""strategy name -> class; every class has `drafts(jobs, generate, min_recall)`."""
