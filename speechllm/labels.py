"""Shared label bins: where a measured value turns into a word.

The synthetic corpus (`annotate.synth`) labels its clips with these bins, and the annotators label
real audio with the same bins, so the two can be compared value by value. Every edge is an
absolute number (not a percentile of some corpus):

- pitch: the clip's median F0 in Hz; low < 120 <= normal <= 200 < high;
- speed: syllables per second of speech time (the duration of the detected speech); slow < 3 <=
  normal <= 5 < fast; syllables are counted on the transcript with `count_syllables`, so every
  stage counts them the same way;
- volume: integrated loudness in LUFS (ITU-R BS.1770, as pyloudnorm measures it);
  quiet < -33 <= normal <= -20 < loud;
- noise: signal-to-noise ratio in dB; noisy < 20 <= clean.

A value on an edge belongs to the inner bin (`to_bin` documents the rule).
"""

from __future__ import annotations

import bisect
import math
import re
from collections.abc import Sequence

PITCH_BINS_HZ = (120.0, 200.0)
"""Median-F0 edges (Hz) between `PITCH_NAMES`."""
PITCH_NAMES = ("low", "normal", "high")

SPEED_BINS_SYLL_PER_S = (3.0, 5.0)
"""Speaking-rate edges (syllables per second of speech time) between `SPEED_NAMES`."""
SPEED_NAMES = ("slow", "normal", "fast")

VOLUME_BINS_LUFS = (-33.0, -20.0)
"""Integrated-loudness edges (LUFS) between `VOLUME_NAMES`."""
VOLUME_NAMES = ("quiet", "normal", "loud")

NOISE_SNR_DB = 20.0
"""A clip whose speech-to-noise ratio is below this many dB is noisy."""
NOISE_NAMES = ("noisy", "clean")
"""Bin names for `to_bin(snr_db, (NOISE_SNR_DB,), NOISE_NAMES)`; a clip with no noise is clean."""

GENDER_NAMES = ("female", "male")

_VOWEL_GROUPS = re.compile(r"[aeiouy]+")
_TOKENS = re.compile(r"[A-Za-z']+|\d+")
_SOUNDED_ES_ENDINGS = ("ses", "zes", "ces", "ges", "shes", "ches", "xes")
"""-es endings that add a syllable ("voices", "boxes"); after other letters the e is silent."""
_DIGIT_SYLLABLES = {"0": 2, "1": 1, "2": 1, "3": 1, "4": 1, "5": 1, "6": 1, "7": 2, "8": 1, "9": 1}
"""A run of digits is read digit by digit ("zero" and "seven" have two syllables)."""


def to_bin(value: float, edges: Sequence[float], names: Sequence[str]) -> str:
    """The name of the bin that `value` falls in.

    `edges` are strictly ascending and split the line into `len(edges) + 1` bins named by `names`.
    A value below the first edge falls in the first bin and one above the last edge in the last
    bin. A value exactly on an edge belongs to the bin above the first edge and to the bin below
    any later edge; with the two-edge bins of this module that makes the middle bin closed
    (`to_bin(120.0, PITCH_BINS_HZ, PITCH_NAMES) == to_bin(200.0, ...) == "normal"`), and with a
    single edge a value on it falls in the upper bin (20 dB SNR is clean).
    """
    if len(names) != len(edges) + 1:
        raise ValueError(f"{len(edges)} edges need {len(edges) + 1} names, got {len(names)}: {list(names)}")
    if any(b <= a for a, b in zip(edges, edges[1:])):
        raise ValueError(f"bin edges must be strictly ascending, got {list(edges)}")
    if not math.isfinite(value):
        raise ValueError(f"cannot bin a non-finite value ({value})")
    if value < edges[0]:
        return names[0]
    return names[max(1, bisect.bisect_left(edges, value))]


def word_syllables(word: str) -> int:
    """Syllables of one English word: its vowel groups, less a silent final e ("make", but not
    "table" or "free"), or else less an -ed / -es that adds no syllable ("walked", "makes", but
    not "wanted", "voices"). Digits count as read one by one. About one syllable in ten off on
    running text."""
    word = word.lower()
    if word.isdigit():
        return sum(_DIGIT_SYLLABLES[d] for d in word)
    word = re.sub(r"[^a-z]", "", word)
    if not word:
        return 0
    count = len(_VOWEL_GROUPS.findall(word))
    if count > 1:
        consonant_le = word.endswith("le") and len(word) > 2 and word[-3] not in "aeiouy"
        if word.endswith("e") and not word.endswith(("ee", "ye")) and not consonant_le:
            count -= 1
        elif word.endswith("ed") and not word.endswith(("ted", "ded")):
            count -= 1
        elif word.endswith("es") and not word.endswith(_SOUNDED_ES_ENDINGS):
            count -= 1
    return max(1, count)


def count_syllables(text: str) -> int:
    """Estimated number of spoken syllables in English `text` (`word_syllables` of each word).

    The one definition of a syllable for the speed bins: the synthetic corpus's targets and the
    annotators' measurements both count with it, so its errors cancel between them.
    """
    return sum(word_syllables(w) for w in _TOKENS.findall(text))
