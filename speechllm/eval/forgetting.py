"""Speech-IFEval's forgetting rate with a paired bootstrap confidence interval.

Each item is an audio task with one verifiable format constraint, answered twice: by the speech
model from audio, and by the reference (the same base LLM reading the text description).

    IFrate = share of items whose answer follows its constraint
    delta  = (IFrate_speech - IFrate_ref) / IFrate_ref     (0: nothing forgotten; -1: all of it)

The interval resamples items with replacement (both answers of an item together) and takes the
percentiles of delta over the resamples.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ..config import EvalConfig

BOOTSTRAP_SAMPLES: int = EvalConfig.bootstrap
"""Resamples of an interval when none are given: the evaluation's configured default."""
CONFIDENCE = 0.95
"""Coverage of every interval."""


def bootstrap_interval(n: int, stat: Callable[[np.ndarray], np.ndarray], samples: int = BOOTSTRAP_SAMPLES,
                       seed: int = 0, confidence: float = CONFIDENCE) -> tuple[float | None, float | None]:
    """Percentile interval of a statistic over `samples` resamples of n items with replacement.

    `stat` maps an index matrix (samples, n) to one value per resample (samples,); resamples where
    it is not finite (e.g. a ratio over a zero) are left out. (None, None) when nothing is left."""
    if n == 0:
        return None, None
    idx = np.random.default_rng(seed).integers(0, n, size=(samples, n))
    with np.errstate(divide="ignore", invalid="ignore"):
        values = np.asarray(stat(idx), dtype=float)
    values = values[np.isfinite(values)]
    if not len(values):
        return None, None
    tail = (1 - confidence) / 2 * 100
    return float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail))


@dataclass
class ForgettingResult:
    items: int
    ifrate: float
    """IFrate of the speech model (audio input)."""
    ifrate_ref: float
    """IFrate of the reference (base LLM reading the description)."""
    delta: float | None
    """Relative change; None when the reference follows no constraint at all."""
    ci_low: float | None
    ci_high: float | None
    per_constraint: dict[str, dict] = field(default_factory=dict)
    """kind -> {"items", "ifrate", "ifrate_ref", "delta"}."""

    def to_dict(self) -> dict:
        return {"items": self.items, "ifrate": self.ifrate, "ifrate_ref": self.ifrate_ref, "delta": self.delta,
                "ci_low": self.ci_low, "ci_high": self.ci_high, "per_constraint": self.per_constraint}


def relative_delta(ifrate: float, ifrate_ref: float) -> float | None:
    return None if ifrate_ref == 0 else (ifrate - ifrate_ref) / ifrate_ref


def forgetting_rate(speech: list[bool], reference: list[bool], kinds: list[str] | None = None,
                    samples: int = BOOTSTRAP_SAMPLES, confidence: float = CONFIDENCE,
                    seed: int = 0) -> ForgettingResult:
    """IFrates, delta and its paired-bootstrap interval; `kinds[i]` is item i's constraint kind."""
    s = np.asarray(speech, dtype=float)
    r = np.asarray(reference, dtype=float)
    if s.shape != r.shape or s.ndim != 1 or len(s) == 0:
        raise ValueError(f"need two equally long, non-empty pass lists (got {s.shape} and {r.shape})")
    ifrate, ifrate_ref = float(s.mean()), float(r.mean())
    lo, hi = bootstrap_interval(len(s), lambda idx: (s[idx].mean(1) - r[idx].mean(1)) / r[idx].mean(1), samples,
                                seed, confidence)
    per: dict[str, dict] = {}
    if kinds is not None:
        if len(kinds) != len(s):
            raise ValueError(f"{len(kinds)} kinds for {len(s)} items")
        for kind in sorted(set(kinds)):
            m = np.array([k == kind for k in kinds])
            a, b = float(s[m].mean()), float(r[m].mean())
            per[kind] = {"items": int(m.sum()), "ifrate": a, "ifrate_ref": b, "delta": relative_delta(a, b)}
    return ForgettingResult(len(s), ifrate, ifrate_ref, relative_delta(ifrate, ifrate_ref), lo, hi, per)
