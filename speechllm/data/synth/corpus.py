"""A labelled synthetic speech corpus from offline TTS (`speechllm synth`).

Every clip is spoken by an offline engine (espeak-ng voices and variants, flite voices) with
settings chosen so that each label is known from how the clip was made, not from measuring it:

- `transcript`: the sentence given to the engine;
- `gender`: the voice's gender;
- `pitch` (low / normal / high, `speechllm.labels.PITCH_BINS_HZ` on the median F0): the engine's pitch
  setting is chosen from a per-voice calibration table (`Calibration.pitch` in `calibration.json`,
  measured by `scripts/calibrate_synth.py`) so the expected median F0 lands well inside a bin. Targets:
  male low 85-110 Hz, male normal 125-145 Hz, female normal 175-195 Hz, female high 215-260 Hz.
  Male-high and female-low clips are never made, and the normal band keeps clear of the gender
  annotator's uncertain band around 160 Hz (`annotate.pitch`), so gender stays inferable from
  pitch, as it is for most real adult voices;
- `speed` (slow / normal / fast, `SPEED_BINS_SYLL_PER_S` on syllables per second of speech time,
  syllables counted by `speechllm.labels.count_syllables`): a target rate is drawn well inside a bin
  and the engine's rate setting is steered onto it the way loudness is steered onto its target
  (see `speak`): the calibrated setting (`Calibration.rate`) first, then corrections from the
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

The sentences (`sentences.txt` beside this file) were written for this project and are dedicated to
the public domain (CC0 1.0).

mbrola voices (contrib, not in Debian main) and piper are not used: the voice set is fixed so that
a seed means the same corpus on every machine, and only calibrated voices can hit pitch targets.
"""

from __future__ import annotations

import functools
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

from ...errors import SpeechLLMError
from ...io.audio import SAMPLE_RATE, prepare_waveform
from ...io.jsonl import ResumableJsonl, iter_lines, write_jsonl_atomic

from ...labels import (GENDER_NAMES, MEASURED, NOISE_NAMES, PITCH_BINS_HZ, PITCH_NAMES, SPEED_BINS_SYLL_PER_S,
                       SPEED_NAMES, VOLUME_BINS_LUFS, VOLUME_NAMES, count_syllables, to_bin)

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
"""SNR range of noisy clips (5 dB inside `speechllm.labels.NOISE_SNR_DB`; below 5 dB white noise the
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


class SynthError(SpeechLLMError, RuntimeError):
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


# ----------------------------------------------------------------------------- calibration

CALIBRATION_RESOURCE = "calibration.json"
"""The voices' calibration tables, beside this module; scripts/calibrate_synth.py writes the file."""
CALIBRATION_FORMAT = 1
"""Version of the calibration file's layout (its "format" field)."""
CALIBRATION_NOTE = (
    "Written by scripts/calibrate_synth.py; rerun it rather than editing the numbers by hand:",
    "python scripts/calibrate_synth.py [--sentences 10] [--workers 2] [--out PATH]; PATH defaults to this file.",
    "It renders calibration sentences with every voice over a grid of engine settings and measures them.",
    "pitch: per voice and calibrated rate setting, [pitch setting, median F0 in Hz] pairs, settings ascending.",
    "Each rate key is the rate setting written as a JSON number (175 an integer, 1.0 a float).",
    "The F0 is the median over the calibration sentences of each rendering's median F0 (praat-parselmouth).",
    "Pitch settings are espeak-ng -p, or flite int_f0_target_mean in Hz; null: no pitch control.",
    "rate: per voice, [rate setting, syllables per second of speech time] pairs at the default pitch,",
    "over all calibration sentences; rate settings are espeak-ng -s (words per minute) or flite",
    "duration_stretch (larger is slower).",
    "engines: the version strings of the engines that were measured.",
)
"""The calibration file's "note": who writes it, how, and what its numbers are."""

PitchTable = dict[float, tuple[tuple[float | None, float], ...]]
"""Per calibrated rate setting: (pitch setting or None, median F0 in Hz) rows, settings ascending."""
RateTable = tuple[tuple[float, float], ...]
"""(rate setting, syllables per second of speech time) rows."""


@dataclass(frozen=True)
class Calibration:
    """Per-voice tables from engine settings to what the renderings measure (see `CALIBRATION_NOTE`).

    Rate settings keep the type they were measured with (espeak-ng's are ints, flite's floats), as
    do pitch settings; the file stores them as JSON numbers, so a round trip gives the same values."""

    pitch: dict[str, PitchTable]
    """Per voice: its pitch table."""
    rate: dict[str, RateTable]
    """Per voice: its rate table (at the default pitch)."""
    engines: dict[str, str]
    """Version strings of the engines that were measured."""


def calibration_to_json(calibration: Calibration) -> dict[str, Any]:
    """The calibration file's content for `calibration`; `calibration_from_json` is its inverse."""
    return {
        "format": CALIBRATION_FORMAT,
        "note": list(CALIBRATION_NOTE),
        "engines": dict(calibration.engines),
        "pitch": {voice: {json.dumps(rate): [list(row) for row in rows] for rate, rows in table.items()}
                  for voice, table in calibration.pitch.items()},
        "rate": {voice: [list(row) for row in rows] for voice, rows in calibration.rate.items()},
    }


def _is_number(value: Any) -> bool:
    """Whether a JSON value is a finite number (not a boolean)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def calibration_from_json(doc: Any, source: str) -> Calibration:
    """The tables in a calibration file's content (the inverse of `calibration_to_json`). Anything
    malformed is a `SynthError` naming `source` and the part that is wrong (with its voice)."""

    def bad(where: str, what: str) -> SynthError:
        return SynthError(f"{source}: malformed calibration file ({where}: {what}); "
                          f"rerun scripts/calibrate_synth.py to rewrite it")

    def pairs(value: Any, where: str, null_settings: bool) -> tuple[tuple[Any, float], ...]:
        if not isinstance(value, list) or not value:
            raise bad(where, "expected a non-empty list of [setting, value] pairs")
        for i, row in enumerate(value):
            if not (isinstance(row, list) and len(row) == 2 and _is_number(row[1])
                    and (_is_number(row[0]) or (null_settings and row[0] is None))):
                raise bad(f"{where}[{i}]", f"{json.dumps(row)} is not a [setting, value] pair of numbers")
        if len({row[0] is None for row in value}) > 1:
            raise bad(where, "null and numeric pitch settings mixed")
        return tuple((row[0], row[1]) for row in value)

    if not isinstance(doc, dict):
        raise bad("top level", "not a JSON object")
    if doc.get("format") != CALIBRATION_FORMAT:
        raise bad("format", f"{json.dumps(doc.get('format'))}, this version reads format {CALIBRATION_FORMAT}")
    for section in ("engines", "pitch", "rate"):
        if not isinstance(doc.get(section), dict):
            raise bad(section, "missing or not a JSON object")
    engines = doc["engines"]
    if not all(isinstance(v, str) for v in engines.values()):
        raise bad("engines", "expected engine names mapped to version strings")
    pitch: dict[str, PitchTable] = {}
    for voice, table in doc["pitch"].items():
        if not isinstance(table, dict) or not table:
            raise bad(f'pitch["{voice}"]', "expected an object of rate settings")
        pitch[voice] = {}
        for key, rows in table.items():
            try:
                rate = json.loads(key)
            except ValueError:
                rate = None
            if not _is_number(rate) or json.dumps(rate) != key:
                raise bad(f'pitch["{voice}"]', f"key {key!r} is not a rate setting written as a JSON number")
            pitch[voice][rate] = pairs(rows, f'pitch["{voice}"]["{key}"]', null_settings=True)
    rate_tables = {voice: pairs(rows, f'rate["{voice}"]', null_settings=False) for voice, rows in doc["rate"].items()}
    return Calibration(pitch=pitch, rate=rate_tables, engines=dict(engines))


def _calibration_ref() -> Path:
    """The shipped calibration file (a resource of this package)."""
    return resources.files(__package__).joinpath(CALIBRATION_RESOURCE)


def read_calibration(source: Path, voices: tuple[Voice, ...] = VOICES) -> Calibration:
    """The calibration file at `source` (a path or a package resource). A missing, unreadable or
    malformed file, or one without a voice of `voices`, is a `SynthError` naming the file (and the voice)."""
    try:
        doc = json.loads(source.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SynthError(f"{source}: calibration file missing; run scripts/calibrate_synth.py to write it "
                         f"(is the package data installed?)") from None
    except OSError as err:
        raise SynthError(f"{source}: calibration file unreadable ({err})") from None
    except ValueError as err:
        raise SynthError(f"{source}: calibration file is not valid JSON ({err}); "
                         f"rerun scripts/calibrate_synth.py to rewrite it") from None
    calibration = calibration_from_json(doc, str(source))
    for voice in voices:
        for section, tables in (("pitch", calibration.pitch), ("rate", calibration.rate)):
            if voice.name not in tables:
                raise SynthError(f"{source}: no {section} calibration for voice {voice.name}; "
                                 f"run scripts/calibrate_synth.py to measure every voice")
    return calibration


@functools.cache
def load_calibration() -> Calibration:
    """The shipped calibration (`CALIBRATION_RESOURCE`), read and checked once per process."""
    return read_calibration(_calibration_ref())


def _pitch_curves(voice: Voice) -> dict[float, tuple[np.ndarray | None, np.ndarray]]:
    """Per calibrated rate setting: (pitch settings or None, median F0) arrays, settings ascending."""
    table = load_calibration().pitch.get(voice.name)
    if table is None:
        raise SynthError(f"{_calibration_ref()}: no pitch calibration for voice {voice.name}; "
                         f"run scripts/calibrate_synth.py to measure it")
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
    rows = load_calibration().rate.get(voice.name)
    if rows is None:
        raise SynthError(f"{_calibration_ref()}: no rate calibration for voice {voice.name}; "
                         f"run scripts/calibrate_synth.py to measure it")
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

SENTENCES_RESOURCE = "sentences.txt"
"""The sentence list, beside this module."""


def load_sentences() -> list[str]:
    """The shipped sentences (one per line; lines starting with # are comments)."""
    ref = resources.files(__package__).joinpath(SENTENCES_RESOURCE)
    try:
        text = ref.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SynthError(f"{ref}: sentence list missing (is the package data installed?)") from None
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
LABEL_COUNT_KEYS = MEASURED
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
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    settings, plan = _plan_corpus(n, seed, test_fraction)
    audio_dir, info_path = _prepare_out_dir(out_dir, settings)
    manifests = {split: out_dir / f"{split}.jsonl" for split in SPLITS}
    planned = {s.id: s for s in plan}
    records = {split: _completed(manifests[split], planned, split, audio_dir) for split in SPLITS}
    todo = [s for s in plan if s.id not in records[s.split]]
    skipped = n - len(todo)
    _render_clips(todo, audio_dir, manifests, records, workers, progress)

    for split in SPLITS:  # the plan's order, whatever order the clips were finished in
        write_jsonl_atomic(manifests[split], [records[split][s.id] for s in plan if s.id in records[split]])
    label_counts = _label_counts(records)
    clips = {split: len(records[split]) for split in SPLITS}
    _write_json_atomic(info_path, _corpus_info(settings, clips, label_counts))
    summary = SynthSummary(out_dir=out_dir, clips=clips, generated=len(todo), skipped=skipped,
                           seconds=time.perf_counter() - t0, labels=label_counts)
    print(summary.line())
    return summary


def _plan_corpus(n: int, seed: int, test_fraction: float) -> tuple[dict[str, Any], list[ClipSpec]]:
    """Check the arguments, engines and voices; return the run's settings and every clip's spec."""
    if n < 1:
        raise SynthError(f"--n must be at least 1, got {n}")
    if not 0.0 <= test_fraction < 1.0:
        raise SynthError(f"--test-fraction must be in [0, 1), got {test_fraction}")
    engines = require_engines({v.engine for v in VOICES})
    check_voices()
    sentences = load_sentences()
    splits = split_voices_and_sentences(seed, test_fraction, VOICES, sentences)
    settings = _settings(n, seed, test_fraction, engines, splits, sentences)
    return settings, [plan_clip(i, seed, test_fraction, splits) for i in range(n)]


def _prepare_out_dir(out_dir: Path, settings: dict[str, Any]) -> tuple[Path, Path]:
    """Make `out_dir/audio`, refuse a corpus made with other settings, mark the corpus incomplete
    and remove temporary wavs an interrupted run left. Returns the audio folder and `synth.json`."""
    audio_dir = out_dir / "audio"
    audio_dir.mkdir(parents=True, exist_ok=True)
    info_path = out_dir / "synth.json"
    _check_settings(info_path, settings)
    _write_json_atomic(info_path, {"settings": settings, "complete": False})
    for stale in audio_dir.glob(".*.tmp"):
        stale.unlink()
    return audio_dir, info_path


def _render_clips(todo: list[ClipSpec], audio_dir: Path, manifests: dict[str, Path],
                  records: dict[str, dict[str, dict]], workers: int, progress: bool) -> None:
    """Render the `todo` clips on up to `workers` processes, appending each record to its split's
    manifest as it arrives and adding it to `records`."""
    from tqdm import tqdm

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


def _label_counts(records: dict[str, dict[str, dict]]) -> dict[str, dict[str, dict[str, int]]]:
    """split -> label key -> value -> clips, for the keys in `LABEL_COUNT_KEYS`."""
    return {split: {key: dict(sorted(Counter(str(r["labels"][key]) for r in records[split].values()).items()))
                    for key in LABEL_COUNT_KEYS} for split in SPLITS}


def _corpus_info(settings: dict[str, Any], clips: dict[str, int],
                 label_counts: dict[str, dict[str, dict[str, int]]]) -> dict[str, Any]:
    """The `synth.json` of a complete corpus: settings, counts, label bins and targets."""
    return {
        "settings": settings, "complete": True, "clips": clips, "labels": label_counts,
        "bins": {"pitch_hz": PITCH_BINS_HZ, "speed_syllables_per_s": SPEED_BINS_SYLL_PER_S,
                 "volume_lufs": VOLUME_BINS_LUFS},
        "targets": {"pitch_hz": {f"{g} {b}": r for (g, b), r in PITCH_TARGETS_HZ.items()},
                    "speed_syllables_per_s": SPEED_TARGETS_SYLL_PER_S, "loudness_lufs": LOUDNESS_TARGETS_LUFS,
                    "noisy_snr_db": NOISY_SNR_DB, "noisy_fraction": NOISY_FRACTION, "silence_s": SILENCE_S}}
