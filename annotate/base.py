"""Annotator interface and registry.

An annotator measures one thing about a clip and returns an `Annotation`: the raw value, a word
bin for the description, and a confidence in [0, 1]. Annotators work on batches (ASR is much
faster batched) and may read the annotations of annotators that ran before them (`requires`).

Register your own:

    @register_annotator
    class Emotion(Annotator):
        name, version, field = "emotion", "1", "Emotion"
        def annotate(self, clips, prior):
            return [Annotation(value=..., bin="sad", confidence=0.8) for clip in clips]

and run it with `speechllm annotate ... --annotators duration,vad,...,emotion`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import numpy as np


class ClipError(ValueError):
    """A clip that cannot be annotated (no speech, too long, ...); it becomes an error record."""


@dataclass
class Clip:
    id: str
    """Record id from the manifest."""
    audio: str
    """Audio path as written in the manifest (relative to the manifest's folder)."""
    wav: np.ndarray
    """16 kHz mono float32 samples."""
    labels: dict[str, Any] = field(default_factory=dict)
    """Ground-truth labels from the manifest (may be empty)."""

    @property
    def duration(self) -> float:
        from speechllm.io.audio import SAMPLE_RATE

        return len(self.wav) / SAMPLE_RATE


@dataclass
class Annotation:
    value: Any
    """The raw measurement (Hz, LUFS, syllables/s, transcript text, segment list...)."""
    bin: str | None = None
    """The word used in the description (e.g. "high"); None when the annotator abstains."""
    confidence: float = 1.0
    """How sure the annotator is of `bin`, in [0, 1]."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Secondary measurements worth keeping (spread, coverage, model scores)."""

    def to_dict(self) -> dict:
        """JSON-ready: numpy scalars and arrays become Python numbers and lists."""
        return _plain(asdict(self))


def _plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    return x


class Annotator:
    """Base class: subclasses set the class attributes and implement `annotate`."""

    name: ClassVar[str]
    """Registry key and key in the metadata's `annotations`."""
    version: ClassVar[str] = "1"
    """Bump when outputs change."""
    field: ClassVar[str | None] = None
    """Label shown in the description ("Gender", "Pitch", ...); None: not shown as a field."""
    requires: ClassVar[tuple[str, ...]] = ()
    """Annotators whose results `annotate` reads from `prior`."""

    def annotate(self, clips: list[Clip], prior: list[dict[str, Annotation]]) -> list[Annotation]:
        raise NotImplementedError

    @property
    def tag(self) -> str:
        return f"{self.name}/{self.version}"


ANNOTATORS: dict[str, type[Annotator]] = {}
"""name -> annotator class; `register_annotator` adds to it."""


def register_annotator(cls: type[Annotator]) -> type[Annotator]:
    if not getattr(cls, "name", None):
        raise TypeError(f"{cls.__name__} needs a `name`")
    ANNOTATORS[cls.name] = cls
    return cls


def order_annotators(names: list[str], provided: tuple[str, ...] = ()) -> list[str]:
    """`names` ordered so that each annotator runs after those it requires; missing requirements
    and unknown names are errors. `provided`: names that run before all of these (classifier
    annotators), which satisfy a requirement too."""
    unknown = [n for n in names if n not in ANNOTATORS]
    if unknown:
        raise ValueError(f"unknown annotator(s) {', '.join(unknown)}; known: {', '.join(ANNOTATORS)}")
    out: list[str] = []
    pending = list(names)
    while pending:
        progressed = False
        for n in list(pending):
            req = ANNOTATORS[n].requires
            missing = [r for r in req if r not in names and r not in provided]
            if missing:
                raise ValueError(f"annotator '{n}' requires {', '.join(missing)}; add it to --annotators")
            if all(r in out or r in provided for r in req):
                out.append(n)
                pending.remove(n)
                progressed = True
        if not progressed:
            raise ValueError(f"annotators {', '.join(pending)} require each other in a cycle")
    return out
