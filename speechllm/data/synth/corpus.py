"""A labelled synthetic speech corpus from offline TTS (`speechllm synth`).

Every clip is spoken by an offline engine (espeak-ng voices and variants, flite voices) with
settings chosen so that each label is known from how the clip was made, not from measuring it:

- `transcript`: the sentence given to the engine;
- `gender`: the voice's gender;
- `pitch` (low / normal / high, `annotate.bins.PITCH_BINS_HZ` on the median F0): the engine's pitch
  setting is chosen from a per-voice calibration table (`PITCH_CALIBRATION`, measured by
  `scripts/calibrate_synth.py`) so the expected median F0 lands well inside a bin. Targets:
  male low 85-110 Hz, male normal 125-145 Hz, female normal 175-195 Hz, female high 215-260 Hz.
  Male-high and female-low clips are never made, and the normal band keeps clear of the gender
  annotator's uncertain band around 160 Hz (`annotate.pitch`), so gender stays inferable from
  pitch, as it is for most real adult voices;
- `speed` (slow / normal / fast, `SPEED_BINS_SYLL_PER_S` on syllables per second of speech time,
  syllables counted by `annotate.bins.count_syllables`): a target rate is drawn well inside a bin
  and the engine's rate setting is steered onto it the way loudness is steered onto its target
  (see `speak`): the calibrated setting (`RATE_CALIBRATION`) first, then corrections from the
  rendering's own syllables over its speech span (first to last speech sound), until it is within
  `RATE_TOLERANCE`. Sentences differ too much at one setting (by up to 40%) for an open-loop
  setting to give unambiguous bins. A target the engine cannot reach (espeak-ng goes no slower than
  80 words per minute) is redrawn within reach, which can move a clip to the next bin;
- `volume` (quiet / normal / loud, `VOLUME_BINS_LUFS`): the mix is measured with pyloudnorm and
  scaled to a target loudness (quiet -40..-36, normal -29..-24, loud -19..-14 LUFS). A loud target
  that would push the peak above `PEAK_LIMIT_DBFS` is redrawn below that limit, or the clip falls
  to the next quieter bin; `loudness_lufs` is measured on the written 16-bit file;
- `noise` (clean / noisy): half the clips get stationary white or pink Gaussian noise (seeded per
  clip) at 5-15 dB SNR, where SNR is the clean speech's mean power over its speech span (first to
  last speech sound) against the noise's mean power; the other half get no noise at all (clean,
  `snr_db` null). Babble is not used: it would carry words and a second gender.

Each clip has 0.3-0.6 s of silence before and after the speech (the noise runs through it), and
`speech_start_s` / `speech_end_s` say where the speech is. Numeric ground truth is stored next to
the bins: `f0_hz_target` (the calibrated median F0 of the chosen pitch setting at the chosen rate),
`syllables_per_second_target` (the rate the rendering was steered onto), `syllables`, `rate_wpm`
(espeak-ng's words-per-minute setting; null for flite, which has a duration stretch instead, see
`engine_settings`), `loudness_lufs`, `snr_db`, `noise_type`, `voice`, `engine`, `split`.

Splits are disjoint by voice and by sentence: a fraction of the voices (per engine and gender) and
of the sentences is held out, and every test clip pairs a held-out voice with a held-out
sentence. The corpus is a function of (n, seed, test fraction, voice list, sentence list, engine
versions): the same seed gives byte-identical audio and manifests, whatever the number of workers
and however often a run was interrupted and resumed.

Output (`synthesize`): `out_dir/audio/<id>.wav` (16 kHz mono PCM16), `out_dir/train.jsonl`,
`out_dir/test.jsonl` (`{"id", "audio": "audio/<id>.wav", "labels": {...}}`) and `out_dir/synth.json`.

The sentences (`annotate/data/sentences.txt`) were written for this project and are dedicated to
the public domain (CC0 1.0).

mbrola voices (contrib, not in Debian main) and piper are not used: the voice set is fixed so that
a seed means the same corpus on every machine, and only calibrated voices can hit pitch targets.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from speechllm.audio import SAMPLE_RATE, prepare_waveform
from speechllm.data.jsonl import ResumableJsonl, iter_lines, write_jsonl_atomic

from .bins import (GENDER_NAMES, NOISE_NAMES, PITCH_BINS_HZ, PITCH_NAMES, SPEED_BINS_SYLL_PER_S, SPEED_NAMES,
                   VOLUME_BINS_LUFS, VOLUME_NAMES, count_syllables, to_bin)

FORMAT_VERSION = 1
"""Version of the corpus recipe; part of the settings a resumed run must match."""

# ----------------------------------------------------------------------------- targets

PITCH_TARGETS_HZ: dict[tuple[str, str], tuple[float, float]] = {
    ("male", "low"): (85.0, 110.0),
    ("male", "normal"): (125.0, 145.0),
    ("female", "normal"): (175.0, 195.0),
    ("female", "high"): (215.0, 260.0),
}
"""Median-F0 target range per (gender, pitch bin); no male-high and no female-low clips."""
SPEED_TARGETS_SYLL_PER_S: dict[str, tuple[float, float]] = {
    "slow": (2.0, 2.6),
    "normal": (3.5, 4.4),
    "fast": (6.0, 7.2),
}
"""Target syllables per second of speech time per speed bin; with `RATE_TOLERANCE` a clip stays at
least 8% inside its bin (fast: 14%, because a VAD's padding makes short fast clips read slower)."""
LOUDNESS_TARGETS_LUFS: dict[str, tuple[float, float]] = {
    "quiet": (-40.0, -36.0),
    "normal": (-29.0, -24.0),
    "loud": (-19.0, -14.0),
}
"""Target integrated loudness per volume bin. TTS speech peaks 14-21 dB above its loudness, so loud
targets reach down to -19 LUFS (1 LU inside the bin) to stay under `PEAK_LIMIT_DBFS` for most clips;
`loudness_lufs` is measured on the written file exactly as the volume annotator measures it."""
NOISY_FRACTION = 0.5
"""Share of clips that get noise."""
NOISY_SNR_DB = (5.0, 15.0)
"""SNR range of noisy clips (5 dB inside `annotate.bins.NOISE_SNR_DB`; below 5 dB white noise the
speech is barely intelligible, to Whisper and to listeners)."""
NOISE_TYPES = ("white", "pink")
PINK_NOISE_LOW_HZ = 20.0
"""Pink noise starts at this frequency."""
PEAK_LIMIT_DBFS = -1.0
"""No written sample exceeds this level; loud targets that would are lowered."""
SILENCE_S = (0.3, 0.6)
"""Range of the leading and of the trailing silence (drawn separately)."""
MIN_TARGET_RANGE_HZ = 5.0
"""A voice takes a pitch bin only if its calibrated F0 range covers this much of the bin's targets."""

# ----------------------------------------------------------------------------- trimming

TRIM_FRAME_S = 0.01
"""Frame length for finding where the engine's speech starts and ends."""
TRIM_BELOW_MAX_DB = 45.0
"""Frames more than this below the loudest frame, at either end, are the engine's silence."""
FADE_S = 0.005
"""Raised-cosine fade at both ends of the cut speech (no click at the cut)."""

# ----------------------------------------------------------------------------- voices

ESPEAK, FLITE = "espeak-ng", "flite"
DEBIAN_PACKAGES = {ESPEAK: "espeak-ng", FLITE: "flite"}
"""Debian package that provides each engine's binary."""
ESPEAK_RATE_RANGE = (80, 450)
"""espeak-ng's -s (words per minute) range: it clamps slower settings to 80."""
ESPEAK_DEFAULT_PITCH, ESPEAK_DEFAULT_RATE = 50, 175
FLITE_STRETCH_RANGE = (0.4, 3.0)
"""flite duration_stretch values used (larger is slower); the rate calibration covers them."""
RATE_TOLERANCE = 0.05
"""A rendering's syllables per second of speech time must be this close (relative) to the target."""
MAX_RATE_RENDERS = 6
"""Renderings per clip while steering the rate setting onto the target."""


@dataclass(frozen=True)
class Voice:
    """One TTS voice: an engine, its voice argument, and the speaker's gender."""

    engine: str
    model: str
    """espeak-ng: "language+variant" (e.g. "en-gb+f4"); flite: the voice name (e.g. "slt")."""
    gender: str
    pitch_control: bool = True
    """False when the engine ignores pitch settings for this voice (it speaks at its natural F0)."""

    @property
    def name(self) -> str:
        return f"{self.engine}:{self.model}"


def _espeak_voices(gender: str, pairs: str) -> tuple[Voice, ...]:
    return tuple(Voice(ESPEAK, p, gender) for p in pairs.split())


VOICES: tuple[Voice, ...] = (
    _espeak_voices("female", "en-us+f1 en+f2 en-us+f3 en-gb-x-rp+f4 en-gb-scotland+f5 en-us+Alicia "
                             "en-029+Andrea en+Annie en-us-nyc+belinda en-gb-x-gbclan+steph en-us+anika "
                             "en-gb-x-gbcwmd+aunty")
    + _espeak_voices("male", "en-us+m1 en+m2 en-us+m3 en-gb-x-rp+m4 en-gb-scotland+m5 en-029+m6 "
                             "en-us-nyc+m7 en+Andy en-us+ed en-gb-x-gbclan+victor en-us+travis "
                             "en-gb-x-gbcwmd+Michael")
    + (Voice(FLITE, "slt", "female"), Voice(FLITE, "awb", "male"), Voice(FLITE, "kal16", "male"),
       Voice(FLITE, "rms", "male", pitch_control=False))
)
"""Every voice of the corpus; each espeak-ng variant appears with one accent only, so that holding
out a voice holds out its timbre. British English is "en", not "en-gb": espeak-ng 1.51 silently
drops the variant of "en-gb+f2" (the calibration script flags voices that sound the same)."""
VOICES_BY_NAME = {v.name: v for v in VOICES}

# ----------------------------------------------------------------------------- calibration
# Produced by `python scripts/calibrate_synth.py` (espeak-ng 1.51, flite 2.2), which prints these
# two tables. PITCH_CALIBRATION: per voice and per calibrated rate setting, (pitch setting, median
# F0 in Hz) rows, the F0 being the median over the calibration sentences of each rendering's median
# F0 (parselmouth). Pitch settings are espeak-ng -p or flite int_f0_target_mean (Hz); None marks a
# voice without pitch control. RATE_CALIBRATION: per voice, (rate setting, syllables per second of
# speech time over all calibration sentences) rows at the default pitch; rate settings are
# espeak-ng -s (words per minute) or flite duration_stretch.

PITCH_CALIBRATION: dict[str, dict[float, tuple[tuple[float | None, float], ...]]] = {
    "espeak-ng:en-us+f1": {
        80: ((0, 114.5), (10, 124.7), (20, 135.1), (30, 148.3), (40, 162.6), (50, 180.0), (60, 199.5),
         (70, 222.0), (80, 247.5), (90, 277.2), (99, 306.6),),
        175: ((0, 114.8), (10, 124.5), (20, 134.8), (30, 148.0), (40, 162.4), (50, 179.8), (60, 199.6),
         (70, 222.1), (80, 246.8), (90, 277.0), (99, 306.7),),
        330: ((0, 115.6), (10, 125.0), (20, 135.4), (30, 148.1), (40, 162.4), (50, 179.9), (60, 198.9),
         (70, 221.6), (80, 246.8), (90, 276.6), (99, 305.8),),
    },
    "espeak-ng:en+f2": {
        80: ((0, 128.3), (10, 139.1), (20, 149.3), (30, 162.9), (40, 177.5), (50, 195.1), (60, 214.7),
         (70, 237.5), (80, 263.8), (90, 293.8), (99, 324.1),),
        175: ((0, 129.0), (10, 139.4), (20, 149.8), (30, 163.7), (40, 177.7), (50, 195.6), (60, 215.4),
         (70, 237.5), (80, 263.9), (90, 293.8), (99, 323.9),),
        330: ((0, 131.0), (10, 141.2), (20, 150.9), (30, 164.2), (40, 179.1), (50, 197.0), (60, 216.1),
         (70, 239.2), (80, 264.8), (90, 295.2), (99, 325.0),),
    },
    "espeak-ng:en-us+f3": {
        80: ((0, 146.6), (10, 156.7), (20, 167.0), (30, 180.5), (40, 194.8), (50, 212.2), (60, 231.6),
         (70, 253.8), (80, 278.9), (90, 308.6), (99, 337.4),),
        175: ((0, 146.7), (10, 156.8), (20, 166.8), (30, 180.2), (40, 194.5), (50, 212.0), (60, 231.6),
         (70, 253.6), (80, 279.4), (90, 309.5), (99, 339.0),),
        330: ((0, 147.7), (10, 157.8), (20, 168.3), (30, 181.1), (40, 194.1), (50, 211.9), (60, 231.1),
         (70, 253.5), (80, 278.8), (90, 308.5), (99, 338.1),),
    },
    "espeak-ng:en-gb-x-rp+f4": {
        80: ((0, 112.4), (10, 123.0), (20, 133.3), (30, 146.7), (40, 161.2), (50, 178.9), (60, 198.7),
         (70, 221.5), (80, 247.4), (90, 277.5), (99, 307.6),),
        175: ((0, 112.9), (10, 123.5), (20, 133.8), (30, 147.3), (40, 162.0), (50, 179.7), (60, 199.3),
         (70, 222.2), (80, 247.8), (90, 278.3), (99, 309.0),),
        330: ((0, 114.0), (10, 123.7), (20, 134.6), (30, 147.8), (40, 162.6), (50, 179.8), (60, 199.5),
         (70, 222.3), (80, 248.5), (90, 278.5), (99, 308.6),),
    },
    "espeak-ng:en-gb-scotland+f5": {
        80: ((0, 129.4), (10, 141.2), (20, 153.1), (30, 168.4), (40, 185.1), (50, 205.1), (60, 227.3),
         (70, 253.5), (80, 283.0), (90, 317.0), (99, 351.5),),
        175: ((0, 129.9), (10, 141.8), (20, 153.6), (30, 168.9), (40, 185.4), (50, 205.4), (60, 227.6),
         (70, 253.6), (80, 283.0), (90, 317.6), (99, 351.3),),
        330: ((0, 130.3), (10, 142.1), (20, 153.6), (30, 168.7), (40, 185.8), (50, 205.4), (60, 227.8),
         (70, 253.9), (80, 283.3), (90, 317.5), (99, 351.0),),
    },
    "espeak-ng:en-us+Alicia": {
        80: ((0, 165.7), (10, 179.0), (20, 192.5), (30, 210.0), (40, 228.5), (50, 251.2), (60, 276.8),
         (70, 305.8), (80, 339.3), (90, 377.5), (99, 417.0),),
        175: ((0, 166.2), (10, 179.5), (20, 192.5), (30, 210.0), (40, 228.8), (50, 251.5), (60, 276.5),
         (70, 306.1), (80, 339.1), (90, 377.8), (99, 417.4),),
        330: ((0, 169.0), (10, 181.9), (20, 194.9), (30, 212.0), (40, 231.3), (50, 253.7), (60, 279.0),
         (70, 308.3), (80, 340.5), (90, 379.7), (99, 418.4),),
    },
    "espeak-ng:en-029+Andrea": {
        80: ((0, 149.1), (10, 164.2), (20, 179.1), (30, 198.5), (40, 219.5), (50, 244.6), (60, 273.0),
         (70, 305.9), (80, 343.5), (90, 386.7), (99, 430.8),),
        175: ((0, 150.0), (10, 164.7), (20, 179.2), (30, 198.9), (40, 219.9), (50, 245.2), (60, 273.5),
         (70, 306.3), (80, 343.7), (90, 387.3), (99, 431.1),),
        330: ((0, 150.9), (10, 165.5), (20, 180.9), (30, 199.8), (40, 220.9), (50, 245.8), (60, 274.3),
         (70, 307.1), (80, 344.1), (90, 388.3), (99, 431.4),),
    },
    "espeak-ng:en+Annie": {
        80: ((0, 182.3), (10, 190.7), (20, 199.6), (30, 210.8), (40, 222.9), (50, 237.6), (60, 253.9),
         (70, 272.9), (80, 294.6), (90, 319.5), (99, 344.5),),
        175: ((0, 182.7), (10, 189.8), (20, 198.4), (30, 209.3), (40, 221.9), (50, 236.4), (60, 252.9),
         (70, 272.0), (80, 293.1), (90, 318.1), (99, 343.7),),
        330: ((0, 185.7), (10, 195.2), (20, 201.1), (30, 213.8), (40, 224.8), (50, 237.7), (60, 253.5),
         (70, 270.9), (80, 294.4), (90, 319.1), (99, 342.7),),
    },
    "espeak-ng:en-us-nyc+belinda": {
        80: ((0, 133.6), (10, 148.6), (20, 163.6), (30, 182.9), (40, 203.8), (50, 229.2), (60, 257.6),
         (70, 290.2), (80, 327.7), (90, 370.9), (99, 414.2),),
        175: ((0, 133.6), (10, 148.8), (20, 163.6), (30, 183.1), (40, 203.9), (50, 229.6), (60, 257.7),
         (70, 290.7), (80, 327.9), (90, 371.3), (99, 414.5),),
        330: ((0, 133.7), (10, 148.5), (20, 163.3), (30, 183.0), (40, 203.5), (50, 229.0), (60, 257.2),
         (70, 290.2), (80, 327.6), (90, 370.8), (99, 414.1),),
    },
    "espeak-ng:en-gb-x-gbclan+steph": {
        80: ((0, 105.7), (10, 118.0), (20, 130.4), (30, 146.2), (40, 163.5), (50, 184.1), (60, 207.6),
         (70, 234.6), (80, 265.4), (90, 300.8), (99, 336.7),),
        175: ((0, 105.8), (10, 118.2), (20, 130.4), (30, 146.3), (40, 163.6), (50, 184.3), (60, 207.6),
         (70, 234.7), (80, 265.3), (90, 300.8), (99, 336.8),),
        330: ((0, 105.7), (10, 118.3), (20, 130.5), (30, 146.6), (40, 163.6), (50, 184.5), (60, 208.0),
         (70, 234.6), (80, 265.6), (90, 301.2), (99, 336.7),),
    },
    "espeak-ng:en-us+anika": {
        80: ((0, 172.3), (10, 187.3), (20, 202.4), (30, 221.7), (40, 242.5), (50, 268.3), (60, 296.3),
         (70, 329.4), (80, 366.4), (90, 409.0), (99, 452.9),),
        175: ((0, 174.0), (10, 188.8), (20, 203.2), (30, 223.1), (40, 243.4), (50, 268.8), (60, 297.2),
         (70, 330.3), (80, 368.0), (90, 410.4), (99, 453.6),),
        330: ((0, 173.0), (10, 187.5), (20, 203.6), (30, 222.7), (40, 243.9), (50, 268.6), (60, 297.2),
         (70, 329.8), (80, 367.2), (90, 411.5), (99, 454.0),),
    },
    "espeak-ng:en-gb-x-gbcwmd+aunty": {
        80: ((0, 74.9), (10, 90.2), (20, 105.5), (30, 125.1), (40, 146.4), (50, 172.3), (60, 201.1),
         (70, 234.7), (80, 272.7), (90, 317.1), (99, 361.1),),
        175: ((0, 74.6), (10, 90.0), (20, 105.2), (30, 124.6), (40, 146.2), (50, 172.1), (60, 201.0),
         (70, 234.7), (80, 272.4), (90, 317.2), (99, 361.1),),
        330: ((0, 74.8), (10, 90.7), (20, 105.2), (30, 125.1), (40, 146.7), (50, 172.5), (60, 201.6),
         (70, 234.8), (80, 273.2), (90, 317.4), (99, 361.7),),
    },
    "espeak-ng:en-us+m1": {
        80: ((0, 66.9), (10, 67.9), (20, 71.8), (30, 78.2), (40, 85.0), (50, 93.6), (60, 103.6), (70, 114.8),
         (80, 127.8), (90, 142.6), (99, 157.6),),
        175: ((0, 65.7), (10, 67.6), (20, 72.0), (30, 77.6), (40, 84.9), (50, 93.5), (60, 103.2),
         (70, 114.5), (80, 127.6), (90, 142.7), (99, 157.7),),
        330: ((0, 67.5), (10, 69.1), (20, 72.2), (30, 78.8), (40, 84.9), (50, 93.7), (60, 103.2),
         (70, 115.1), (80, 127.7), (90, 142.7), (99, 157.6),),
    },
    "espeak-ng:en+m2": {
        80: ((0, 64.6), (10, 68.3), (20, 73.9), (30, 81.6), (40, 90.1), (50, 100.8), (60, 112.4),
         (70, 126.0), (80, 141.4), (90, 159.2), (99, 177.2),),
        175: ((0, 64.5), (10, 68.2), (20, 73.8), (30, 81.5), (40, 90.2), (50, 100.8), (60, 112.4),
         (70, 126.1), (80, 141.7), (90, 159.6), (99, 177.7),),
        330: ((0, 64.0), (10, 68.1), (20, 73.9), (30, 82.0), (40, 90.6), (50, 101.1), (60, 112.5),
         (70, 126.3), (80, 141.7), (90, 159.7), (99, 177.5),),
    },
    "espeak-ng:en-us+m3": {
        80: ((0, 70.7), (10, 75.4), (20, 80.7), (30, 87.5), (40, 95.2), (50, 104.6), (60, 115.2),
         (70, 127.4), (80, 141.4), (90, 157.4), (99, 173.4),),
        175: ((0, 70.9), (10, 75.6), (20, 81.0), (30, 87.7), (40, 95.4), (50, 104.7), (60, 115.2),
         (70, 127.4), (80, 141.4), (90, 157.5), (99, 173.5),),
        330: ((0, 71.3), (10, 76.3), (20, 81.7), (30, 88.2), (40, 95.8), (50, 105.2), (60, 115.4),
         (70, 127.6), (80, 141.5), (90, 157.6), (99, 173.6),),
    },
    "espeak-ng:en-gb-x-rp+m4": {
        80: ((0, 68.1), (10, 69.0), (20, 73.1), (30, 78.7), (40, 85.1), (50, 93.0), (60, 102.0), (70, 112.5),
         (80, 124.5), (90, 138.2), (99, 151.9),),
        175: ((0, 68.2), (10, 69.1), (20, 73.1), (30, 78.9), (40, 84.9), (50, 93.0), (60, 102.0),
         (70, 112.5), (80, 124.3), (90, 138.2), (99, 152.1),),
        330: ((0, 68.4), (10, 70.3), (20, 73.0), (30, 80.4), (40, 85.5), (50, 93.3), (60, 102.3),
         (70, 112.7), (80, 125.1), (90, 138.8), (99, 152.3),),
    },
    "espeak-ng:en-gb-scotland+m5": {
        80: ((0, 68.6), (10, 73.7), (20, 79.1), (30, 85.5), (40, 93.4), (50, 102.8), (60, 113.2),
         (70, 125.5), (80, 139.4), (90, 155.4), (99, 171.8),),
        175: ((0, 68.5), (10, 73.5), (20, 78.9), (30, 85.6), (40, 93.4), (50, 102.7), (60, 113.2),
         (70, 125.5), (80, 139.6), (90, 155.4), (99, 171.5),),
        330: ((0, 69.3), (10, 74.7), (20, 79.8), (30, 86.4), (40, 94.0), (50, 103.5), (60, 113.3),
         (70, 125.7), (80, 140.1), (90, 155.5), (99, 172.0),),
    },
    "espeak-ng:en-029+m6": {
        80: ((0, 66.7), (10, 71.2), (20, 76.4), (30, 83.6), (40, 91.4), (50, 101.0), (60, 111.9),
         (70, 124.4), (80, 138.7), (90, 155.3), (99, 171.8),),
        175: ((0, 66.4), (10, 71.3), (20, 76.3), (30, 83.3), (40, 91.5), (50, 100.9), (60, 111.9),
         (70, 124.5), (80, 138.7), (90, 155.2), (99, 171.9),),
        330: ((0, 66.1), (10, 70.6), (20, 77.0), (30, 84.0), (40, 91.5), (50, 101.5), (60, 112.5),
         (70, 124.7), (80, 139.0), (90, 155.4), (99, 171.9),),
    },
    "espeak-ng:en-us-nyc+m7": {
        80: ((0, 74.6), (10, 79.2), (20, 84.0), (30, 90.4), (40, 97.3), (50, 106.2), (60, 116.0),
         (70, 127.4), (80, 140.3), (90, 155.2), (99, 170.1),),
        175: ((0, 74.8), (10, 79.3), (20, 84.3), (30, 90.5), (40, 97.3), (50, 106.3), (60, 116.0),
         (70, 127.4), (80, 140.3), (90, 155.2), (99, 170.3),),
        330: ((0, 75.6), (10, 79.7), (20, 84.4), (30, 90.9), (40, 97.7), (50, 106.5), (60, 116.5),
         (70, 127.7), (80, 140.7), (90, 155.4), (99, 170.4),),
    },
    "espeak-ng:en+Andy": {
        80: ((0, 64.1), (10, 65.1), (20, 70.0), (30, 77.0), (40, 85.2), (50, 95.4), (60, 106.7), (70, 119.7),
         (80, 134.5), (90, 151.7), (99, 169.1),),
        175: ((0, 64.5), (10, 65.1), (20, 69.9), (30, 77.3), (40, 85.4), (50, 95.6), (60, 106.8),
         (70, 120.1), (80, 134.9), (90, 152.2), (99, 169.4),),
        330: ((0, 65.5), (10, 66.2), (20, 71.3), (30, 77.8), (40, 86.2), (50, 96.2), (60, 107.3),
         (70, 120.7), (80, 135.2), (90, 152.7), (99, 169.7),),
    },
    "espeak-ng:en-us+ed": {
        80: ((0, 85.7), (10, 91.7), (20, 97.5), (30, 105.8), (40, 114.6), (50, 125.4), (60, 137.5),
         (70, 151.5), (80, 167.2), (90, 185.7), (99, 204.0),),
        175: ((0, 85.8), (10, 92.1), (20, 97.6), (30, 106.1), (40, 114.6), (50, 125.6), (60, 137.6),
         (70, 151.6), (80, 167.4), (90, 185.6), (99, 204.1),),
        330: ((0, 87.6), (10, 93.0), (20, 99.0), (30, 106.3), (40, 115.0), (50, 126.3), (60, 138.2),
         (70, 152.0), (80, 167.6), (90, 186.0), (99, 203.7),),
    },
    "espeak-ng:en-gb-x-gbclan+victor": {
        80: ((0, 65.5), (10, 67.0), (20, 71.5), (30, 78.1), (40, 85.8), (50, 95.2), (60, 105.8), (70, 117.9),
         (80, 131.8), (90, 147.8), (99, 163.9),),
        175: ((0, 65.8), (10, 66.7), (20, 71.1), (30, 77.7), (40, 85.3), (50, 94.9), (60, 105.5),
         (70, 117.8), (80, 131.7), (90, 147.9), (99, 164.0),),
        330: ((0, 66.6), (10, 67.4), (20, 71.2), (30, 78.3), (40, 85.6), (50, 95.4), (60, 106.0),
         (70, 118.2), (80, 131.9), (90, 148.1), (99, 164.2),),
    },
    "espeak-ng:en-us+travis": {
        80: ((0, 72.0), (10, 76.3), (20, 80.8), (30, 86.4), (40, 93.6), (50, 102.5), (60, 112.3),
         (70, 123.5), (80, 136.3), (90, 151.4), (99, 166.3),),
        175: ((0, 71.9), (10, 76.4), (20, 80.9), (30, 86.5), (40, 93.8), (50, 102.4), (60, 112.1),
         (70, 123.7), (80, 136.4), (90, 151.4), (99, 166.5),),
        330: ((0, 72.6), (10, 76.8), (20, 80.9), (30, 87.7), (40, 93.8), (50, 102.6), (60, 112.5),
         (70, 124.1), (80, 137.0), (90, 151.5), (99, 166.5),),
    },
    "espeak-ng:en-gb-x-gbcwmd+Michael": {
        80: ((0, 73.5), (10, 78.5), (20, 83.5), (30, 90.2), (40, 97.4), (50, 106.2), (60, 116.0),
         (70, 127.3), (80, 140.3), (90, 155.1), (99, 169.9),),
        175: ((0, 75.2), (10, 78.5), (20, 83.4), (30, 90.4), (40, 96.9), (50, 105.7), (60, 115.1),
         (70, 126.7), (80, 139.7), (90, 154.3), (99, 169.3),),
        330: ((10, 81.9), (20, 87.7), (30, 93.0), (40, 98.8), (50, 105.7), (60, 116.1), (70, 127.5),
         (80, 139.9), (90, 154.3), (99, 168.8),),
    },
    "flite:slt": {
        2.0: ((70.0, 73.3), (90.0, 89.8), (110.0, 109.8), (130.0, 129.5), (150.0, 149.8), (170.0, 169.7),
         (190.0, 189.9), (210.0, 209.6), (230.0, 229.4), (250.0, 249.3), (270.0, 269.1), (290.0, 288.0),),
        1.0: ((70.0, 72.8), (90.0, 87.5), (110.0, 107.6), (130.0, 127.6), (150.0, 147.3), (170.0, 167.4),
         (190.0, 187.4), (210.0, 207.3), (230.0, 227.2), (250.0, 246.8), (270.0, 266.6), (290.0, 286.6),),
        0.6: ((70.0, 72.8), (90.0, 90.1), (110.0, 110.5), (130.0, 130.0), (150.0, 150.3), (170.0, 169.8),
         (190.0, 189.3), (210.0, 208.8), (230.0, 228.6), (250.0, 247.5), (270.0, 267.3), (290.0, 288.2),),
    },
    "flite:awb": {
        2.0: ((70.0, 71.1), (90.0, 86.0), (110.0, 104.5), (130.0, 124.9), (150.0, 144.5), (170.0, 164.6),
         (190.0, 184.6), (210.0, 204.3), (230.0, 224.4), (250.0, 244.2), (270.0, 264.1), (290.0, 284.3),),
        1.0: ((70.0, 70.1), (90.0, 87.3), (110.0, 106.8), (130.0, 127.2), (150.0, 146.9), (170.0, 166.7),
         (190.0, 186.5), (210.0, 206.5), (230.0, 226.1), (250.0, 246.2), (270.0, 266.1), (290.0, 286.3),),
        0.6: ((70.0, 71.4), (90.0, 88.3), (110.0, 106.7), (130.0, 128.0), (150.0, 147.4), (170.0, 167.5),
         (190.0, 186.8), (210.0, 206.4), (230.0, 226.3), (250.0, 246.2), (270.0, 266.1), (290.0, 286.1),),
    },
    "flite:kal16": {
        2.0: ((70.0, 65.9), (90.0, 83.6), (110.0, 104.5), (130.0, 126.0), (150.0, 147.1), (170.0, 168.9),
         (190.0, 190.7), (210.0, 212.3), (230.0, 233.5), (250.0, 255.2), (270.0, 276.9), (290.0, 298.6),),
        1.0: ((70.0, 65.8), (90.0, 84.1), (110.0, 105.3), (130.0, 126.1), (150.0, 147.4), (170.0, 169.0),
         (190.0, 190.7), (210.0, 212.3), (230.0, 233.3), (250.0, 254.1), (270.0, 276.4), (290.0, 298.2),),
        0.6: ((70.0, 65.9), (90.0, 84.0), (110.0, 105.3), (130.0, 126.5), (150.0, 147.8), (170.0, 168.7),
         (190.0, 190.9), (210.0, 212.1), (230.0, 232.9), (250.0, 254.2), (270.0, 275.0), (290.0, 296.8),),
    },
    "flite:rms": {
        2.0: ((None, 103.5),),
        1.0: ((None, 101.8),),
        0.6: ((None, 98.9),),
    },
}
RATE_CALIBRATION: dict[str, tuple[tuple[float, float], ...]] = {
    "espeak-ng:en-us+f1": ((80, 2.21), (100, 2.62), (125, 3.28), (150, 3.92), (175, 4.60), (210, 5.51),
     (250, 6.52), (300, 7.77), (360, 9.29), (450, 11.27),),
    "espeak-ng:en+f2": ((80, 2.30), (100, 2.70), (125, 3.34), (150, 3.96), (175, 4.58), (210, 5.42),
     (250, 6.29), (300, 7.50), (360, 9.14), (450, 11.20),),
    "espeak-ng:en-us+f3": ((80, 2.32), (100, 2.73), (125, 3.39), (150, 4.01), (175, 4.66), (210, 5.51),
     (250, 6.37), (300, 7.51), (360, 9.05), (450, 11.33),),
    "espeak-ng:en-gb-x-rp+f4": ((80, 2.26), (100, 2.67), (125, 3.31), (150, 3.94), (175, 4.56), (210, 5.45),
     (250, 6.37), (300, 7.54), (360, 9.05), (450, 11.29),),
    "espeak-ng:en-gb-scotland+f5": ((80, 2.39), (100, 2.80), (125, 3.47), (150, 4.10), (175, 4.74),
     (210, 5.59), (250, 6.49), (300, 7.63), (360, 9.34), (450, 11.47),),
    "espeak-ng:en-us+Alicia": ((80, 1.91), (100, 2.28), (125, 2.89), (150, 3.50), (175, 4.14), (210, 5.03),
     (250, 6.10), (300, 7.41), (360, 9.00), (450, 10.50),),
    "espeak-ng:en-029+Andrea": ((80, 3.14), (100, 3.67), (125, 4.44), (150, 5.17), (175, 5.86), (210, 6.76),
     (250, 7.58), (300, 8.43), (360, 9.54), (450, 13.36),),
    "espeak-ng:en+Annie": ((80, 2.39), (100, 2.82), (125, 3.50), (150, 4.17), (175, 4.84), (210, 5.74),
     (250, 6.71), (300, 7.96), (360, 9.51), (450, 11.58),),
    "espeak-ng:en-us-nyc+belinda": ((80, 2.39), (100, 2.82), (125, 3.52), (150, 4.18), (175, 4.87),
     (210, 5.81), (250, 6.72), (300, 8.03), (360, 9.46), (450, 11.65),),
    "espeak-ng:en-gb-x-gbclan+steph": ((80, 2.30), (100, 2.72), (125, 3.39), (150, 4.05), (175, 4.74),
     (210, 5.66), (250, 6.73), (300, 7.97), (360, 9.50), (450, 11.59),),
    "espeak-ng:en-us+anika": ((80, 3.01), (100, 3.49), (125, 4.26), (150, 4.97), (175, 5.65), (210, 6.51),
     (250, 7.30), (300, 8.19), (360, 9.40), (450, 12.74),),
    "espeak-ng:en-gb-x-gbcwmd+aunty": ((80, 2.25), (100, 2.66), (125, 3.32), (150, 3.98), (175, 4.66),
     (210, 5.62), (250, 6.64), (300, 7.98), (360, 9.50), (450, 11.40),),
    "espeak-ng:en-us+m1": ((80, 2.34), (100, 2.76), (125, 3.43), (150, 4.09), (175, 4.75), (210, 5.67),
     (250, 6.58), (300, 7.76), (360, 9.19), (450, 11.49),),
    "espeak-ng:en+m2": ((80, 2.35), (100, 2.75), (125, 3.39), (150, 4.01), (175, 4.64), (210, 5.45),
     (250, 6.30), (300, 7.46), (360, 9.00), (450, 11.20),),
    "espeak-ng:en-us+m3": ((80, 2.43), (100, 2.86), (125, 3.55), (150, 4.22), (175, 4.89), (210, 5.78),
     (250, 6.72), (300, 7.79), (360, 9.17), (450, 11.63),),
    "espeak-ng:en-gb-x-rp+m4": ((80, 2.19), (100, 2.59), (125, 3.24), (150, 3.87), (175, 4.54), (210, 5.46),
     (250, 6.49), (300, 7.77), (360, 9.27), (450, 11.17),),
    "espeak-ng:en-gb-scotland+m5": ((80, 2.47), (100, 2.91), (125, 3.60), (150, 4.28), (175, 4.96),
     (210, 5.89), (250, 6.87), (300, 7.95), (360, 9.37), (450, 11.87),),
    "espeak-ng:en-029+m6": ((80, 2.35), (100, 2.78), (125, 3.46), (150, 4.15), (175, 4.82), (210, 5.76),
     (250, 6.77), (300, 7.98), (360, 9.31), (450, 11.73),),
    "espeak-ng:en-us-nyc+m7": ((80, 2.38), (100, 2.80), (125, 3.49), (150, 4.17), (175, 4.86), (210, 5.77),
     (250, 6.69), (300, 7.91), (360, 9.30), (450, 11.66),),
    "espeak-ng:en+Andy": ((80, 2.24), (100, 2.65), (125, 3.30), (150, 3.96), (175, 4.63), (210, 5.51),
     (250, 6.59), (300, 7.88), (360, 9.31), (450, 11.31),),
    "espeak-ng:en-us+ed": ((80, 2.34), (100, 2.76), (125, 3.45), (150, 4.10), (175, 4.78), (210, 5.69),
     (250, 6.62), (300, 7.80), (360, 9.24), (450, 11.56),),
    "espeak-ng:en-gb-x-gbclan+victor": ((80, 2.29), (100, 2.70), (125, 3.37), (150, 4.03), (175, 4.70),
     (210, 5.60), (250, 6.62), (300, 7.86), (360, 9.38), (450, 11.34),),
    "espeak-ng:en-us+travis": ((80, 2.34), (100, 2.76), (125, 3.43), (150, 4.09), (175, 4.77), (210, 5.68),
     (250, 6.58), (300, 7.75), (360, 9.16), (450, 11.37),),
    "espeak-ng:en-gb-x-gbcwmd+Michael": ((80, 2.34), (100, 2.76), (125, 3.43), (150, 4.09), (175, 4.78),
     (210, 5.64), (250, 6.62), (300, 7.89), (360, 9.37), (450, 11.55),),
    "flite:slt": ((3.0, 1.58), (2.4, 2.01), (2.0, 2.40), (1.7, 2.84), (1.4, 3.44), (1.2, 4.00), (1.0, 4.81),
     (0.85, 5.64), (0.7, 6.84), (0.55, 8.65), (0.4, 11.63),),
    "flite:awb": ((3.0, 1.53), (2.4, 1.87), (2.0, 2.19), (1.7, 2.56), (1.4, 3.15), (1.2, 3.86), (1.0, 4.60),
     (0.85, 5.23), (0.7, 6.50), (0.55, 8.04), (0.4, 10.90),),
    "flite:kal16": ((3.0, 1.79), (2.4, 2.24), (2.0, 2.70), (1.7, 3.19), (1.4, 3.85), (1.2, 4.48),
     (1.0, 5.42), (0.85, 6.29), (0.7, 7.76), (0.55, 9.83), (0.4, 13.39),),
    "flite:rms": ((3.0, 1.32), (2.4, 1.66), (2.0, 1.99), (1.7, 2.35), (1.4, 2.87), (1.2, 3.34), (1.0, 4.01),
     (0.85, 4.71), (0.7, 5.70), (0.55, 7.25), (0.4, 9.80),),
}


class SynthError(RuntimeError):
    """The corpus cannot be made; the message names the file or tool and the cause."""


# ----------------------------------------------------------------------------- engines

def require_engines(engines: set[str] | None = None) -> dict[str, str]:
    """Version strings of the TTS engines; a missing binary is a `SynthError` naming its package."""
    versions = {}
    for engine in sorted(engines or DEBIAN_PACKAGES):
        if shutil.which(engine) is None:
            package = DEBIAN_PACKAGES[engine]
            raise SynthError(f"{engine} not found on PATH: install the Debian package {package} "
                             f"(`make setup` or `bash scripts/install_system_deps.sh` installs it)")
        out = subprocess.run([engine, "--version"], capture_output=True, text=True)
        lines = [ln.strip() for ln in (out.stdout + out.stderr).splitlines() if ln.strip()]
        versions[engine] = next((ln for ln in lines if "version" in ln.lower()), lines[0] if lines else "unknown")
    return versions


def check_voices(voices: tuple[Voice, ...] = VOICES) -> None:
    """Every voice must exist in its engine: both engines silently fall back to a default voice."""
    espeak_models = {v.model for v in voices if v.engine == ESPEAK}
    if espeak_models:
        listed = subprocess.run([ESPEAK, "--voices"], capture_output=True, text=True).stdout.split("\n")[1:]
        known_langs = set()
        for ln in listed:  # columns: priority, language, age/gender, name, file, (other languages)
            cols = ln.split()
            if len(cols) >= 5:
                known_langs |= {cols[1], cols[4], cols[4].rsplit("/", 1)[-1]}
        variants = subprocess.run([ESPEAK, "--voices=variant"], capture_output=True, text=True).stdout
        known_variants = {ln.split()[-1].removeprefix("!v/") for ln in variants.split("\n")[1:] if ln.split()}
        for model in sorted(espeak_models):
            lang, _, variant = model.partition("+")
            if lang not in known_langs or (variant and variant not in known_variants):
                raise SynthError(f"{ESPEAK} has no voice {model!r} (language {lang!r}, variant {variant!r}); "
                                 f"check `espeak-ng --voices` and `espeak-ng --voices=variant`")
    flite_models = {v.model for v in voices if v.engine == FLITE}
    if flite_models:
        listed = subprocess.run([FLITE, "-lv"], capture_output=True, text=True).stdout
        known = set(listed.split(":", 1)[-1].split())
        missing = sorted(flite_models - known)
        if missing:
            raise SynthError(f"{FLITE} has no voice(s) {', '.join(missing)} (it lists: {' '.join(sorted(known))})")


def _run(cmd: list[str], stdin: bytes | None = None) -> bytes:
    try:
        done = subprocess.run(cmd, input=stdin, capture_output=True, check=False)
    except FileNotFoundError:
        raise SynthError(f"{cmd[0]} not found on PATH: install the Debian package {DEBIAN_PACKAGES[cmd[0]]} "
                         f"(`make setup` or `bash scripts/install_system_deps.sh`)") from None
    if done.returncode != 0:
        raise SynthError(f"{' '.join(cmd)} failed with exit code {done.returncode}: "
                         f"{done.stderr.decode(errors='replace').strip()}")
    return done.stdout


def tts(voice: Voice, text: str, pitch: float | None, rate: float) -> np.ndarray:
    """The engine's rendering of `text` as float32 mono at `SAMPLE_RATE` (engine silence included).

    `pitch`: espeak-ng -p (0-99) or flite int_f0_target_mean (Hz), None for the engine default;
    `rate`: espeak-ng -s (words per minute) or flite duration_stretch."""
    import soundfile as sf

    if voice.engine == ESPEAK:
        cmd = [ESPEAK, "--stdout", "-v", voice.model, "-s", str(int(rate))]
        if pitch is not None:
            cmd += ["-p", str(int(pitch))]
        data, sr = sf.read(io.BytesIO(_run(cmd, stdin=text.encode("utf-8"))), dtype="float32")
    elif voice.engine == FLITE:
        with tempfile.TemporaryDirectory(prefix="speechllm-flite-") as tmp:
            path = Path(tmp) / "out.wav"
            cmd = [FLITE, "-voice", voice.model, "--setf", f"duration_stretch={rate:.4f}"]
            if pitch is not None and voice.pitch_control:
                cmd += ["--setf", f"int_f0_target_mean={pitch:.1f}"]
            _run(cmd + ["-t", text, "-o", str(path)])
            data, sr = sf.read(path, dtype="float32")
    else:
        raise SynthError(f"unknown TTS engine {voice.engine!r} for voice {voice.name}")
    return prepare_waveform(data, sr, f"{voice.name} rendering of {text!r}")


def speech_span(wav: np.ndarray, sample_rate: int = SAMPLE_RATE) -> tuple[int, int]:
    """(first, last + 1) sample of the speech: the frames within `TRIM_BELOW_MAX_DB` of the loudest."""
    frame = int(TRIM_FRAME_S * sample_rate)
    n = len(wav) // frame
    if n == 0:
        raise SynthError("the engine produced no audio")
    power = (wav[: n * frame].astype(np.float64).reshape(n, frame) ** 2).mean(axis=1)
    level = 10 * np.log10(power + 1e-20)
    loud = np.flatnonzero(level > level.max() - TRIM_BELOW_MAX_DB)
    if power.max() <= 0 or loud.size == 0:
        raise SynthError("the engine produced only silence")
    return int(loud[0]) * frame, min(len(wav), (int(loud[-1]) + 1) * frame)


def cut_speech(wav: np.ndarray) -> np.ndarray:
    """The speech span of an engine rendering, faded in and out over `FADE_S`."""
    start, end = speech_span(wav)
    speech = wav[start:end].astype(np.float64)
    fade = min(int(FADE_S * SAMPLE_RATE), len(speech) // 2)
    if fade > 0:
        ramp = 0.5 - 0.5 * np.cos(np.pi * np.arange(fade) / fade)
        speech[:fade] *= ramp
        speech[-fade:] *= ramp[::-1]
    return speech


# ----------------------------------------------------------------------------- calibration look-ups

def _pitch_curves(voice: Voice) -> dict[float, tuple[np.ndarray | None, np.ndarray]]:
    """Per calibrated rate setting: (pitch settings or None, median F0) arrays, settings ascending."""
    table = PITCH_CALIBRATION.get(voice.name)
    if not table:
        raise SynthError(f"no pitch calibration for voice {voice.name}: run scripts/calibrate_synth.py "
                         f"and paste its PITCH_CALIBRATION into {__file__}")
    curves = {}
    for rate, rows in table.items():
        f0 = np.array([r[1] for r in rows], dtype=float)
        curves[float(rate)] = (None, f0) if rows[0][0] is None else (np.array([r[0] for r in rows], dtype=float), f0)
    return curves


def _rate_weights(curves: dict[float, Any], rate: float) -> list[tuple[float, float]]:
    """(calibrated rate, weight) pairs that interpolate linearly to `rate` (clamped at the ends)."""
    rates = sorted(curves)
    if rate <= rates[0] or len(rates) == 1:
        return [(rates[0], 1.0)]
    if rate >= rates[-1]:
        return [(rates[-1], 1.0)]
    hi = next(i for i, r in enumerate(rates) if r >= rate)
    r0, r1 = rates[hi - 1], rates[hi]
    w = (rate - r0) / (r1 - r0)
    return [(r0, 1.0 - w), (r1, w)]


def pitch_range_hz(voice: Voice) -> tuple[float, float]:
    """The median-F0 range a voice reaches at every calibrated rate; without pitch control, the
    range its natural F0 takes over the calibrated rates."""
    curves = _pitch_curves(voice).values()
    if not voice.pitch_control:
        return min(float(f0[0]) for _, f0 in curves), max(float(f0[0]) for _, f0 in curves)
    return max(float(f0.min()) for _, f0 in curves), min(float(f0.max()) for _, f0 in curves)


def pitch_bins_for(voice: Voice) -> list[tuple[str, float, float]]:
    """The pitch bins a voice can take, each with the F0 target range it can reach in that bin."""
    lo, hi = pitch_range_hz(voice)
    out = []
    for (gender, name), (t_lo, t_hi) in PITCH_TARGETS_HZ.items():
        if gender != voice.gender:
            continue
        a, b = max(lo, t_lo), min(hi, t_hi)
        if not voice.pitch_control:
            if t_lo <= lo and hi <= t_hi:
                out.append((name, lo, hi))
        elif b - a >= MIN_TARGET_RANGE_HZ:
            out.append((name, a, b))
    return out


def pitch_setting(voice: Voice, f0_hz: float, rate: float) -> tuple[float | None, float]:
    """(engine pitch setting, expected median F0) nearest to `f0_hz` for `voice` at rate setting `rate`."""
    curves = _pitch_curves(voice)
    weights = _rate_weights(curves, rate)
    if not voice.pitch_control:
        return None, round(sum(w * float(curves[r][1][0]) for r, w in weights), 1)
    setting = sum(w * float(np.interp(f0_hz, curves[r][1], curves[r][0])) for r, w in weights)
    setting = float(round(setting)) if voice.engine == ESPEAK else round(setting, 1)
    expected = sum(w * float(np.interp(setting, curves[r][0], curves[r][1])) for r, w in weights)
    return setting, round(expected, 1)


def _rate_curve(voice: Voice) -> tuple[np.ndarray, np.ndarray]:
    """(rate settings, syllables per second) sorted by syllables per second."""
    rows = RATE_CALIBRATION.get(voice.name)
    if not rows:
        raise SynthError(f"no rate calibration for voice {voice.name}: run scripts/calibrate_synth.py "
                         f"and paste its RATE_CALIBRATION into {__file__}")
    rows = sorted(rows, key=lambda r: r[1])
    return np.array([r[0] for r in rows], dtype=float), np.array([r[1] for r in rows], dtype=float)


def rate_setting(voice: Voice, syllables_per_s: float) -> float:
    """The engine rate setting whose calibrated rate is `syllables_per_s` (clamped to the engine's range)."""
    settings, sps = _rate_curve(voice)
    setting = float(np.interp(syllables_per_s, sps, settings))
    return float(round(setting)) if voice.engine == ESPEAK else round(setting, 3)


def calibrated_rate(voice: Voice, setting: float) -> float:
    """Calibrated syllables per second of `voice` at rate setting `setting`."""
    settings, sps = _rate_curve(voice)
    order = np.argsort(settings)
    return float(np.interp(setting, settings[order], sps[order]))


# ----------------------------------------------------------------------------- sentences

SENTENCES_RESOURCE = "data/sentences.txt"
"""Path of the sentence list inside the `annotate` package."""


def load_sentences() -> list[str]:
    """The shipped sentences (one per line; lines starting with # are comments)."""
    ref = resources.files("annotate").joinpath(SENTENCES_RESOURCE)
    try:
        text = ref.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SynthError(f"{ref}: sentence list missing (is the annotate package data installed?)") from None
    sentences = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    if len(set(sentences)) != len(sentences):
        raise SynthError(f"{ref}: the sentence list has duplicate lines")
    if len(sentences) < 2:
        raise SynthError(f"{ref}: needs at least 2 sentences, found {len(sentences)}")
    return sentences


# ----------------------------------------------------------------------------- the plan

PLAN_STREAM, RENDER_STREAM = 0, 1
"""Random streams: the split and per-clip choices (PLAN) and a clip's noise and loudness redraws
(RENDER), each seeded from (seed, clip index, stream) so a clip never depends on another."""


@dataclass(frozen=True)
class ClipSpec:
    """Everything needed to render one clip; rendering it twice gives the same bytes."""

    id: str
    index: int
    seed: int
    split: str
    sentence: str
    voice: str
    gender: str
    pitch: str
    f0_hz_target: float
    """Drawn target; the rendering's setting is the calibrated one nearest to it."""
    speed: str
    syllables_per_second_target: float
    """Drawn target; rendering steers the rate setting onto it (or redraws it if out of reach)."""
    volume: str
    loudness_target_lufs: float
    noise: str
    noise_type: str | None
    snr_db: float | None
    lead_s: float
    trail_s: float


@dataclass(frozen=True)
class Splits:
    """Held-out voices and sentences (test) and the rest (train)."""

    voices: dict[str, list[str]]
    sentences: dict[str, list[str]]


def split_voices_and_sentences(seed: int, test_fraction: float, voices: tuple[Voice, ...],
                               sentences: list[str]) -> Splits:
    """Hold out `test_fraction` of the sentences and of the voices of each (engine, gender) group.

    A group of one voice stays in train; a group of two or more keeps at least one voice on each
    side (when `test_fraction` > 0)."""
    rng = np.random.default_rng([seed, PLAN_STREAM])
    test_voices: list[str] = []
    for engine in sorted({v.engine for v in voices}):
        for gender in GENDER_NAMES:
            group = [v.name for v in voices if v.engine == engine and v.gender == gender]
            if len(group) < 2 or test_fraction <= 0:
                continue
            k = min(max(1, round(test_fraction * len(group))), len(group) - 1)
            test_voices += [group[i] for i in sorted(rng.permutation(len(group))[:k])]
    k = min(max(1, round(test_fraction * len(sentences))), len(sentences) - 1) if test_fraction > 0 else 0
    test_idx = set(rng.permutation(len(sentences))[:k].tolist())
    return Splits(
        voices={"train": [v.name for v in voices if v.name not in test_voices],
                "test": [v.name for v in voices if v.name in test_voices]},
        sentences={"train": [s for i, s in enumerate(sentences) if i not in test_idx],
                   "test": [s for i, s in enumerate(sentences) if i in test_idx]})


def clip_id(seed: int, index: int) -> str:
    return f"synth-s{seed}-{index:06d}"


def clip_split(index: int, test_fraction: float) -> str:
    """Every 1/test_fraction-th clip is a test clip (exact share, independent of n)."""
    return "test" if math.floor((index + 1) * test_fraction) > math.floor(index * test_fraction) else "train"


def plan_clip(index: int, seed: int, test_fraction: float, splits: Splits) -> ClipSpec:
    """The choices for clip `index`; they depend only on (seed, index, test fraction, splits)."""
    rng = np.random.default_rng([seed, index, PLAN_STREAM])
    split = clip_split(index, test_fraction)
    voices = [VOICES_BY_NAME[n] for n in splits.voices[split]]
    genders = [g for g in GENDER_NAMES if any(v.gender == g for v in voices)]
    gender = genders[rng.integers(len(genders))]
    candidates = [v for v in voices if v.gender == gender]
    voice = candidates[rng.integers(len(candidates))]
    sentence = splits.sentences[split][rng.integers(len(splits.sentences[split]))]

    bins = pitch_bins_for(voice)
    if not bins:
        raise SynthError(f"voice {voice.name} reaches no pitch target of a {voice.gender} voice "
                         f"(calibrated F0 {pitch_range_hz(voice)})")
    pitch, f_lo, f_hi = bins[rng.integers(len(bins))]
    f0 = round(float(rng.uniform(f_lo, f_hi)), 1)
    speed = SPEED_NAMES[rng.integers(len(SPEED_NAMES))]
    sps = round(float(rng.uniform(*SPEED_TARGETS_SYLL_PER_S[speed])), 2)

    volume = VOLUME_NAMES[rng.integers(len(VOLUME_NAMES))]
    lufs = round(float(rng.uniform(*LOUDNESS_TARGETS_LUFS[volume])), 2)

    noisy = bool(rng.random() < NOISY_FRACTION)
    noise_type = NOISE_TYPES[rng.integers(len(NOISE_TYPES))] if noisy else None
    snr = round(float(rng.uniform(*NOISY_SNR_DB)), 1) if noisy else None
    lead, trail = (round(float(x), 3) for x in rng.uniform(*SILENCE_S, size=2))
    return ClipSpec(id=clip_id(seed, index), index=index, seed=seed, split=split, sentence=sentence,
                    voice=voice.name, gender=voice.gender, pitch=pitch, f0_hz_target=f0,
                    speed=speed, syllables_per_second_target=sps, volume=volume, loudness_target_lufs=lufs,
                    noise=NOISE_NAMES[0] if noisy else NOISE_NAMES[1], noise_type=noise_type, snr_db=snr,
                    lead_s=lead, trail_s=trail)


# ----------------------------------------------------------------------------- rendering

_METER = None


def _loudness(x: np.ndarray) -> float:
    global _METER
    if _METER is None:
        import pyloudnorm

        _METER = pyloudnorm.Meter(SAMPLE_RATE)
    return float(_METER.integrated_loudness(x))


def make_noise(kind: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """Unit-RMS stationary Gaussian noise: "white" (flat spectrum) or "pink" (power ~ 1/f from
    `PINK_NOISE_LOW_HZ` up, nothing below: sub-audio drift would dominate its power)."""
    white = rng.standard_normal(n)
    if kind == "white":
        noise = white
    elif kind == "pink":
        spectrum = np.fft.rfft(white)
        freqs = np.fft.rfftfreq(n, d=1.0 / SAMPLE_RATE)
        audible = freqs >= PINK_NOISE_LOW_HZ
        spectrum[audible] /= np.sqrt(freqs[audible] / PINK_NOISE_LOW_HZ)
        spectrum[~audible] = 0.0
        noise = np.fft.irfft(spectrum, n)
    else:
        raise SynthError(f"unknown noise type {kind!r} (known: {', '.join(NOISE_TYPES)})")
    return noise / np.sqrt(np.mean(noise ** 2))


def _choose_loudness(spec: ClipSpec, max_lufs: float, rng: np.random.Generator) -> tuple[str, float]:
    """(volume bin, target LUFS): the planned target unless the peak limit caps it below; then a
    redraw under the cap inside the same bin, or else inside the next quieter bin that fits."""
    if spec.loudness_target_lufs <= max_lufs:
        return spec.volume, spec.loudness_target_lufs
    for name in reversed(VOLUME_NAMES[: VOLUME_NAMES.index(spec.volume) + 1]):
        lo, hi = LOUDNESS_TARGETS_LUFS[name]
        if min(hi, max_lufs) >= lo:
            return name, round(float(rng.uniform(lo, min(hi, max_lufs))), 2)
    raise SynthError(f"even a quiet target exceeds the peak limit (at most {max_lufs:.1f} LUFS)")


def _reachable_speed(speed: str, reached: float, slower: bool, rng: np.random.Generator) -> tuple[str, float]:
    """(speed bin, target) when the engine's rate limit stops at `reached` syllables per second
    short of the target: a redraw between the limit and the bin's far end, or else in the nearest
    bin toward the limit that the voice still reaches (a sentence too quick to say slowly is normal)."""
    i = SPEED_NAMES.index(speed)
    for name in (SPEED_NAMES[i:] if slower else SPEED_NAMES[i::-1]):
        lo, hi = SPEED_TARGETS_SYLL_PER_S[name]
        lo, hi = (max(lo, reached), hi) if slower else (lo, min(hi, reached))
        if lo <= hi:
            return name, round(float(rng.uniform(lo, hi)), 2)
    raise SynthError(f"the rate limit ({reached:.2f} syllables/s) is outside every speed target")


@dataclass(frozen=True)
class _Speech:
    """A rendering cut to its speech span, with the settings that made it."""

    wav: np.ndarray
    speed: str
    syllables_per_second_target: float
    pitch_setting: float | None
    f0_hz_target: float
    rate_setting: float


def speak(voice: Voice, sentence: str, f0_hz: float, speed: str, syllables_per_s: float,
          rng: np.random.Generator) -> _Speech:
    """Render `sentence` at the pitch setting for `f0_hz` and the rate setting that gives
    `syllables_per_s` syllables per second of speech time.

    The rate is steered the way loudness is: the calibrated setting first, then settings corrected
    by this sentence's measured ratio to the calibration (sentences differ by up to 40% at one
    setting), until a rendering is within `RATE_TOLERANCE` of the target. When the engine's slowest
    (or fastest) setting is not enough, the target is redrawn within reach (`_reachable_speed`).
    When the engine's response is too uneven to converge (flite's is, by a few percent), the
    rendering closest to the target is kept and the target becomes its rate, provided that rate
    lies inside a speed bin's target range."""
    syllables = count_syllables(sentence)
    if syllables == 0:
        raise SynthError(f"no syllables in {sentence!r}")
    settings, _ = _rate_curve(voice)
    limits = (float(settings.min()), float(settings.max()))
    rate = rate_setting(voice, syllables_per_s)
    tried: list[tuple[float, _Speech]] = []
    for _ in range(MAX_RATE_RENDERS):
        p_setting, f0 = pitch_setting(voice, f0_hz, rate)
        wav = cut_speech(tts(voice, sentence, p_setting, rate))
        reached = syllables * SAMPLE_RATE / len(wav)
        tried.append((reached, _Speech(wav, speed, syllables_per_s, p_setting, f0, rate)))
        if abs(reached / syllables_per_s - 1) <= RATE_TOLERANCE:
            return tried[-1][1]
        factor = reached / calibrated_rate(voice, rate)
        next_rate = rate_setting(voice, syllables_per_s / factor)
        if next_rate == rate and rate in limits:  # the engine cannot say this sentence that slowly (fast)
            speed, syllables_per_s = _reachable_speed(speed, reached, syllables_per_s < reached, rng)
            if abs(reached / syllables_per_s - 1) <= RATE_TOLERANCE:
                return _Speech(wav, speed, syllables_per_s, p_setting, f0, rate)
            next_rate = rate_setting(voice, syllables_per_s / factor)
        if any(next_rate == t.rate_setting for _, t in tried):
            break
        rate = next_rate
    reached, best = min(tried, key=lambda t: abs(t[0] / syllables_per_s - 1))
    for name, (lo, hi) in SPEED_TARGETS_SYLL_PER_S.items():
        if lo <= reached <= hi:
            return _Speech(best.wav, name, round(reached, 2), best.pitch_setting, best.f0_hz_target,
                           best.rate_setting)
    raise SynthError(f"rate setting did not converge on {syllables_per_s} syllables/s "
                     f"(closest rendering {reached:.2f} at setting {best.rate_setting})")


def render_clip(spec: ClipSpec, audio_dir: Path) -> dict[str, Any]:
    """Render `spec` into `audio_dir/<id>.wav` (atomically) and return its manifest record."""
    import soundfile as sf

    voice = VOICES_BY_NAME[spec.voice]
    rng = np.random.default_rng([spec.seed, spec.index, RENDER_STREAM])
    said = speak(voice, spec.sentence, spec.f0_hz_target, spec.speed, spec.syllables_per_second_target, rng)
    lead, trail = round(spec.lead_s * SAMPLE_RATE), round(spec.trail_s * SAMPLE_RATE)
    mix = np.concatenate([np.zeros(lead), said.wav, np.zeros(trail)])
    if spec.noise_type is not None:
        speech_power = float(np.mean(said.wav ** 2))
        noise = make_noise(spec.noise_type, len(mix), rng)
        mix = mix + noise * math.sqrt(speech_power / 10 ** (spec.snr_db / 10))
    peak_dbfs = 20 * math.log10(float(np.abs(mix).max()))
    level = _loudness(mix)
    volume, target = _choose_loudness(spec, level + PEAK_LIMIT_DBFS - peak_dbfs, rng)
    pcm = np.round(np.clip(mix * 10 ** ((target - level) / 20), -1.0, 1.0) * 32767).astype(np.int16)
    loudness = _loudness(pcm / 32768.0)
    if voice.engine == ESPEAK:
        settings = {"pitch": int(said.pitch_setting), "rate_wpm": int(said.rate_setting)}
    else:
        settings = {"int_f0_target_mean": said.pitch_setting, "duration_stretch": said.rate_setting}
    labels = {
        "transcript": spec.sentence,
        "gender": spec.gender,
        "pitch": spec.pitch,
        "speed": said.speed,
        "volume": volume,
        "noise": spec.noise,
        "f0_hz_target": said.f0_hz_target,
        "rate_wpm": int(said.rate_setting) if voice.engine == ESPEAK else None,
        "syllables_per_second_target": said.syllables_per_second_target,
        "syllables": count_syllables(spec.sentence),
        "loudness_lufs": round(loudness, 2),
        "snr_db": spec.snr_db,
        "noise_type": spec.noise_type,
        "speech_start_s": round(lead / SAMPLE_RATE, 3),
        "speech_end_s": round((lead + len(said.wav)) / SAMPLE_RATE, 3),
        "voice": voice.name,
        "engine": voice.engine,
        "engine_settings": settings,
        "split": spec.split,
    }
    _check_consistent(labels)
    tmp = audio_dir / f".{spec.id}.wav.{os.getpid()}.tmp"
    sf.write(tmp, pcm, SAMPLE_RATE, format="WAV", subtype="PCM_16")
    os.replace(tmp, audio_dir / f"{spec.id}.wav")
    return {"id": spec.id, "audio": f"audio/{spec.id}.wav", "labels": labels}


def _check_consistent(labels: dict[str, Any]) -> None:
    """Every bin label must be the bin of its own numeric ground truth."""
    expected = {
        "pitch": to_bin(labels["f0_hz_target"], PITCH_BINS_HZ, PITCH_NAMES),
        "speed": to_bin(labels["syllables_per_second_target"], SPEED_BINS_SYLL_PER_S, SPEED_NAMES),
        "volume": to_bin(labels["loudness_lufs"], VOLUME_BINS_LUFS, VOLUME_NAMES),
    }
    wrong = {k: (labels[k], v) for k, v in expected.items() if labels[k] != v}
    if wrong:
        raise SynthError("labels contradict their own targets (label, bin of the target): "
                         + ", ".join(f"{k} {a} vs {b}" for k, (a, b) in wrong.items()))


def _render_job(job: tuple[ClipSpec, str]) -> dict[str, Any]:
    spec, audio_dir = job
    try:
        return render_clip(spec, Path(audio_dir))
    except SynthError as err:
        raise SynthError(f"clip {spec.id} ({spec.voice}, {spec.sentence!r}): {err}") from None


# ----------------------------------------------------------------------------- the stage

SPLITS = ("train", "test")
LABEL_COUNT_KEYS = ("gender", "pitch", "speed", "volume", "noise")
"""Labels whose values `SynthSummary` counts."""


@dataclass
class SynthSummary:
    """What a `synthesize` run left in `out_dir`."""

    out_dir: Path
    clips: dict[str, int]
    """Clips per split."""
    generated: int
    """Clips rendered by this run (the rest were there from an earlier run)."""
    skipped: int
    seconds: float
    """Wall time of this run."""
    labels: dict[str, dict[str, dict[str, int]]] = field(default_factory=dict)
    """split -> label key -> value -> clips."""

    def line(self) -> str:
        total = sum(self.clips.values())
        speed = f", {self.generated / self.seconds:.1f} clips/s" if self.generated and self.seconds > 0 else ""
        parts = []
        for key in LABEL_COUNT_KEYS:
            counts = Counter()
            for split in self.labels.values():
                counts.update(split.get(key, {}))
            parts.append(f"{key} " + "/".join(f"{v} {counts[v]}" for v in sorted(counts)))
        return (f"synth: {total} clips (train {self.clips.get('train', 0)}, test {self.clips.get('test', 0)}) "
                f"in {self.out_dir}; {self.generated} generated, {self.skipped} already there, "
                f"{self.seconds:.1f} s{speed}; " + "; ".join(parts))


def _settings(n: int, seed: int, test_fraction: float, engines: dict[str, str], splits: Splits,
              sentences: list[str]) -> dict[str, Any]:
    digest = hashlib.sha256("\n".join(sentences).encode("utf-8")).hexdigest()
    return {"format": FORMAT_VERSION, "n": n, "seed": seed, "test_fraction": test_fraction, "engines": engines,
            "voices": splits.voices, "sentences_sha256": digest,
            "sentences": {s: len(v) for s, v in splits.sentences.items()}}


def _write_json_atomic(path: Path, obj: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _check_settings(path: Path, settings: dict[str, Any]) -> None:
    if not path.exists():
        return
    try:
        before = json.loads(path.read_text(encoding="utf-8"))["settings"]
    except (json.JSONDecodeError, KeyError) as err:
        raise SynthError(f"{path}: unreadable ({err}); remove the folder or pick another --out") from None
    changed = [k for k in settings if before.get(k) != settings[k]]
    if changed:
        details = "; ".join(f"{k}: {before.get(k)!r} -> {settings[k]!r}" for k in changed
                            if k not in ("voices", "engines"))
        raise SynthError(f"{path}: this folder holds a corpus made with other settings "
                         f"({', '.join(changed)}{': ' + details if details else ''}); "
                         f"rerun with the same settings to resume, or pick another --out")


def _completed(manifest: Path, planned: dict[str, ClipSpec], split: str, audio_dir: Path) -> dict[str, dict]:
    """Records of `manifest` whose clip is planned in `split` and whose wav exists. A torn last
    line is cut; records that fail this check are removed from the file (their clips are redone)."""
    if not manifest.exists():
        return {}
    with ResumableJsonl(manifest):  # cuts a torn last line
        pass
    kept: dict[str, dict] = {}
    dropped = 0
    for line in iter_lines(manifest):
        if line.error:
            raise SynthError(f"{line.error}; remove that line or the folder")
        rec = line.record
        spec = planned.get(rec.get("id"))
        if spec is None or spec.split != split or rec["id"] in kept or not (audio_dir / f"{rec['id']}.wav").is_file():
            dropped += 1
            continue
        kept[rec["id"]] = rec
    if dropped:
        write_jsonl_atomic(manifest, list(kept.values()))
    return kept


def synthesize(out_dir: Path, n: int, seed: int = 0, test_fraction: float = 0.2, workers: int = 2,
               progress: bool = True) -> SynthSummary:
    """Make (or finish) an `n`-clip labelled corpus in `out_dir`; see the module docstring.

    Rerunning with the same arguments skips clips already written; other arguments in the same
    folder are an error. Prints a one-line summary and returns it."""
    from tqdm import tqdm

    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    if n < 1:
        raise SynthError(f"--n must be at least 1, got {n}")
    if not 0.0 <= test_fraction < 1.0:
        raise SynthError(f"--test-fraction must be in [0, 1), got {test_fraction}")
    engines = require_engines({v.engine for v in VOICES})
    check_voices()
    sentences = load_sentences()
    splits = split_voices_and_sentences(seed, test_fraction, VOICES, sentences)
    settings = _settings(n, seed, test_fraction, engines, splits, sentences)
    plan = [plan_clip(i, seed, test_fraction, splits) for i in range(n)]
    planned = {s.id: s for s in plan}

    audio_dir = out_dir / "audio"
    audio_dir.mkdir(parents=True, exist_ok=True)
    info_path = out_dir / "synth.json"
    _check_settings(info_path, settings)
    _write_json_atomic(info_path, {"settings": settings, "complete": False})
    for stale in audio_dir.glob(".*.tmp"):
        stale.unlink()

    manifests = {split: out_dir / f"{split}.jsonl" for split in SPLITS}
    records = {split: _completed(manifests[split], planned, split, audio_dir) for split in SPLITS}
    todo = [s for s in plan if s.id not in records[s.split]]
    skipped = n - len(todo)
    writers = {split: ResumableJsonl(manifests[split]) for split in SPLITS}
    bar = tqdm(total=len(todo), desc="synth", unit="clip", disable=not progress, file=sys.stderr)
    jobs = [(s, str(audio_dir)) for s in todo]
    pool = None
    try:
        workers = max(1, min(workers, len(jobs)))
        if workers == 1:
            results = map(_render_job, jobs)
        else:
            pool = mp.get_context("spawn").Pool(workers)
            results = pool.imap(_render_job, jobs)
        for rec in results:
            split = rec["labels"]["split"]
            writers[split].write(rec)
            records[split][rec["id"]] = rec
            bar.update(1)
        if pool is not None:
            pool.close()
            pool.join()
    finally:
        bar.close()
        for w in writers.values():
            w.close()
        if pool is not None:
            pool.terminate()

    for split in SPLITS:  # the plan's order, whatever order the clips were finished in
        write_jsonl_atomic(manifests[split], [records[split][s.id] for s in plan if s.id in records[split]])
    label_counts = {split: {key: dict(sorted(Counter(str(r["labels"][key]) for r in records[split].values()).items()))
                            for key in LABEL_COUNT_KEYS} for split in SPLITS}
    clips = {split: len(records[split]) for split in SPLITS}
    _write_json_atomic(info_path, {
        "settings": settings, "complete": True, "clips": clips, "labels": label_counts,
        "bins": {"pitch_hz": PITCH_BINS_HZ, "speed_syllables_per_s": SPEED_BINS_SYLL_PER_S,
                 "volume_lufs": VOLUME_BINS_LUFS},
        "targets": {"pitch_hz": {f"{g} {b}": r for (g, b), r in PITCH_TARGETS_HZ.items()},
                    "speed_syllables_per_s": SPEED_TARGETS_SYLL_PER_S, "loudness_lufs": LOUDNESS_TARGETS_LUFS,
                    "noisy_snr_db": NOISY_SNR_DB, "noisy_fraction": NOISY_FRACTION, "silence_s": SILENCE_S}})
    summary = SynthSummary(out_dir=out_dir, clips=clips, generated=len(todo), skipped=skipped,
                           seconds=time.perf_counter() - t0, labels=label_counts)
    print(summary.line())
    return summary
