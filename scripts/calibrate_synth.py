"""Calibrate the synthetic corpus's voices, or check a generated corpus against its labels.

    python scripts/calibrate_synth.py [--sentences 10] [--workers 2] [--out PATH]   # calibration.json
    python scripts/calibrate_synth.py --verify OUT_DIR                               # label vs realisation

Calibration renders a few sentences with every voice of `speechllm.data.synth.corpus.VOICES` over a
grid of engine settings and measures
- pitch: for each pitch setting (espeak-ng -p, flite int_f0_target_mean) at three rate settings
  (the rate moves F0 by up to 5%), the median over sentences of each clip's median F0
  (praat-parselmouth);
- rate: for each rate setting (espeak-ng -s, flite duration_stretch) at the default pitch, the
  syllables (`speechllm.labels.count_syllables`) of all sentences over their total speech time
  (`speechllm.data.synth.corpus.speech_span`), and the spread over sentences.
It prints a readable table, then writes the tables (median F0 to 0.1 Hz, rates to 0.01 syllables per
second) to the corpus's calibration file, speechllm/data/synth/calibration.json (or `--out`),
replacing it atomically; its layout is described in the file's "note". Pitch rows keep only the part
of the grid where F0 rises with the setting (some espeak-ng variants jump an octave at -p 0). Voices
whose tables are identical are flagged: espeak-ng silently ignores a variant it cannot attach (e.g.
"en-gb+f2").

Verification reads OUT_DIR/{train,test}.jsonl and reports, per split, engine and noise, how often
the realised median F0 of the written clip falls in the labelled pitch bin, and how often its
syllables per second of speech time do: with the labelled speech span (what rendering steered), and
with the speech that Silero VAD finds in the written clip (what an annotator sees).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from speechllm.data.synth import corpus as synth
from speechllm.labels import PITCH_BINS_HZ, PITCH_NAMES, SPEED_BINS_SYLL_PER_S, SPEED_NAMES, count_syllables, to_bin
from speechllm.io.audio import SAMPLE_RATE, load_audio

F0_FLOOR_HZ, F0_CEILING_HZ, F0_STEP_S = 60.0, 500.0, 0.01
"""Pitch tracker settings (the same as the pitch annotator's)."""
ESPEAK_PITCH_GRID = (0, 10, 20, 30, 40, 50, 60, 70, 80, 90, 99)
FLITE_F0_GRID = (70.0, 90.0, 110.0, 130.0, 150.0, 170.0, 190.0, 210.0, 230.0, 250.0, 270.0, 290.0)
ESPEAK_RATE_GRID = (synth.ESPEAK_RATE_RANGE[0], 100, 125, 150, 175, 210, 250, 300, 360, synth.ESPEAK_RATE_RANGE[1])
FLITE_STRETCH_GRID = (synth.FLITE_STRETCH_RANGE[1], 2.4, 2.0, 1.7, 1.4, 1.2, 1.0, 0.85, 0.7, 0.55,
                      synth.FLITE_STRETCH_RANGE[0])
"""Rate grids spanning the whole range the corpus uses (its look-ups clamp at the ends)."""
ESPEAK_PITCH_RATES = (80, 175, 330)
FLITE_PITCH_STRETCHES = (2.0, 1.0, 0.6)
"""Rate settings at which the pitch grid is measured."""
FLITE_DEFAULT_STRETCH = 1.0
PITCH_DECIMALS, RATE_DECIMALS = 1, 2
"""Decimals kept in the calibration file of a median F0 (Hz) and of a rate (syllables per second)."""
DEFAULT_OUT = Path(synth.__file__).with_name(synth.CALIBRATION_RESOURCE)
"""The calibration file the corpus reads (`--out` default)."""
JSON_WIDTH = 110
"""The calibration file's number lists wrap at this line width."""
JSON_INDENT = "  "
"""Indentation of one nesting level in the calibration file."""


def median_f0(wav: np.ndarray) -> float:
    """Median F0 (Hz) over voiced frames; NaN when nothing is voiced."""
    import parselmouth

    snd = parselmouth.Sound(wav.astype(np.float64), sampling_frequency=SAMPLE_RATE)
    f0 = snd.to_pitch(time_step=F0_STEP_S, pitch_floor=F0_FLOOR_HZ, pitch_ceiling=F0_CEILING_HZ)
    f0 = f0.selected_array["frequency"]
    f0 = f0[f0 > 0]
    return float(np.median(f0)) if f0.size else float("nan")


def _defaults(voice: synth.Voice) -> tuple[float | None, float]:
    if voice.engine == synth.ESPEAK:
        return synth.ESPEAK_DEFAULT_PITCH, synth.ESPEAK_DEFAULT_RATE
    return None, FLITE_DEFAULT_STRETCH


def calibrate_voice(job: tuple[str, list[str]]) -> dict:
    """Pitch and rate rows of one voice (runs in a worker)."""
    name, sentences = job
    voice = synth.VOICES_BY_NAME[name]
    default_pitch, _ = _defaults(voice)
    if voice.engine == synth.ESPEAK:
        pitch_grid, rate_grid, pitch_rates = ESPEAK_PITCH_GRID, ESPEAK_RATE_GRID, ESPEAK_PITCH_RATES
    else:
        pitch_grid = FLITE_F0_GRID if voice.pitch_control else (None,)
        rate_grid, pitch_rates = FLITE_STRETCH_GRID, FLITE_PITCH_STRETCHES

    pitch_rows: dict[float, list[tuple]] = {}
    for rate in pitch_rates:
        pitch_rows[rate] = []
        for setting in pitch_grid:
            f0 = [median_f0(synth.cut_speech(synth.tts(voice, s, setting, rate))) for s in sentences]
            pitch_rows[rate].append((setting, float(np.nanmedian(f0)), float(np.nanmin(f0)), float(np.nanmax(f0))))
    rate_rows = []
    for setting in rate_grid:
        spans = [len(synth.cut_speech(synth.tts(voice, s, default_pitch, setting))) / SAMPLE_RATE for s in sentences]
        per_sentence = [count_syllables(s) / d for s, d in zip(sentences, spans)]
        rate_rows.append((setting, sum(count_syllables(s) for s in sentences) / sum(spans),
                          min(per_sentence), max(per_sentence)))
    return {"voice": name, "pitch": pitch_rows, "rate": rate_rows}


def rising_rows(rows: list[tuple]) -> list[tuple]:
    """The longest run at the top end of the grid where F0 rises with the setting."""
    if rows and rows[0][0] is None:
        return rows
    keep = [rows[-1]]
    for row in reversed(rows[:-1]):
        if not row[1] < keep[0][1]:
            break
        keep.insert(0, row)
    return keep


def calibration_tables(results: list[dict], engines: dict[str, str]) -> synth.Calibration:
    """The calibration of `calibrate_voice` results: pitch rows cut to where F0 rises with the
    setting (`rising_rows`), medians rounded to `PITCH_DECIMALS` and `RATE_DECIMALS`."""
    pitch = {r["voice"]: {rate: tuple((s, round(m, PITCH_DECIMALS)) for s, m, _, _ in rising_rows(rows))
                          for rate, rows in r["pitch"].items()} for r in results}
    rate = {r["voice"]: tuple((s, round(m, RATE_DECIMALS)) for s, m, _, _ in r["rate"]) for r in results}
    return synth.Calibration(pitch=pitch, rate=rate, engines=engines)


def _json_depth(value: Any) -> int:
    """How deep JSON containers nest in `value` (0 for a number or string)."""
    if isinstance(value, dict):
        return 1 + max(map(_json_depth, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(_json_depth, value), default=0)
    return 0


def _compact_json(value: Any) -> str:
    """`value` as one line of JSON (NaN and infinities are an error: the file must stay standard JSON)."""
    return json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(", ", ": "))


def _json_text(value: Any, indent: str, column: int) -> str:
    """`value` as JSON text that starts at `column` of a line indented by `indent`: containers that
    nest more than two deep one member per line, the others on one line wrapped at `JSON_WIDTH`."""
    if not isinstance(value, (dict, list)):
        return _compact_json(value)
    opening, closing = "{}" if isinstance(value, dict) else "[]"
    if not value:
        return opening + closing
    members = list(value.items()) if isinstance(value, dict) else [(None, v) for v in value]
    if _json_depth(value) > 2:
        inner = indent + JSON_INDENT
        lines = []
        for key, member in members:
            head = inner + ("" if key is None else f"{_compact_json(key)}: ")
            lines.append(head + _json_text(member, inner, len(head)))
        return opening + "\n" + ",\n".join(lines) + "\n" + indent + closing
    cells = [_compact_json(member) if key is None else f"{_compact_json(key)}: {_compact_json(member)}"
             for key, member in members]
    cells = [cell + "," for cell in cells[:-1]] + [cells[-1] + closing]
    start = column + len(opening)
    lines, width = [[]], start
    for cell in cells:
        if lines[-1] and width + 1 + len(cell) > JSON_WIDTH:
            lines.append([])
            width = start
        width += len(cell) + (1 if lines[-1] else 0)
        lines[-1].append(cell)
    return opening + ("\n" + " " * start).join(" ".join(line) for line in lines)


def calibration_text(calibration: synth.Calibration) -> str:
    """The calibration file's text: `synth.calibration_to_json`, nested objects one member per line
    and the number lists wrapped, so that the file reads like a table."""
    return _json_text(synth.calibration_to_json(calibration), "", 0) + "\n"


def write_calibration(path: Path, calibration: synth.Calibration) -> None:
    """Write `calibration` to `path` atomically: a temporary file beside it, read back as the corpus
    reads it (every voice, well-formed), then os.replace."""
    text = calibration_text(calibration)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        synth.read_calibration(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def calibrate(n_sentences: int, workers: int, out: Path) -> None:
    """Measure every voice, print the summary, and write the calibration file `out`."""
    synth.require_engines()
    synth.check_voices()
    all_sentences = synth.load_sentences()
    step = len(all_sentences) // n_sentences
    sentences = [all_sentences[i * step] for i in range(n_sentences)]
    jobs = [(v.name, sentences) for v in synth.VOICES]
    with mp.get_context("spawn").Pool(workers) as pool:
        results = pool.map(calibrate_voice, jobs)

    engines = synth.require_engines()
    print(f"# {n_sentences} calibration sentences; engines: {engines}")
    print("\n## pitch: setting -> median F0 Hz (min-max over sentences), per rate setting")
    for r in results:
        for rate, rows in r["pitch"].items():
            cells = [f"{'-' if s is None else s:>5}: {m:6.1f} ({lo:.0f}-{hi:.0f})" for s, m, lo, hi in rows]
            print(f"{r['voice']:32} rate {rate:>5}  " + " | ".join(cells))
    print("\n## rate: setting -> syllables/s of speech time (min-max over sentences); pitch at default")
    for r in results:
        cells = [f"{s:>5}: {m:5.2f} ({lo:.1f}-{hi:.1f})" for s, m, lo, hi in r["rate"]]
        print(f"{r['voice']:32} " + " | ".join(cells))
    seen: dict[str, str] = {}
    for r in results:
        key = repr((r["pitch"], r["rate"]))
        if key in seen:
            print(f"\nWARNING: {r['voice']} renders exactly like {seen[key]}: the engine ignores part of its name")
        seen.setdefault(key, r["voice"])

    write_calibration(out, calibration_tables(results, engines))
    print(f"\nwrote the calibration of {len(results)} voices to {out}")


_VAD = None


def _vad_speech_seconds(wav: np.ndarray) -> float:
    """Seconds of speech that Silero VAD (default settings) finds in a 16 kHz clip."""
    global _VAD
    import torch
    from silero_vad import get_speech_timestamps, load_silero_vad

    if _VAD is None:
        torch.set_num_threads(1)
        _VAD = load_silero_vad()
    stamps = get_speech_timestamps(torch.from_numpy(wav), _VAD, sampling_rate=SAMPLE_RATE, return_seconds=True)
    return float(sum(s["end"] - s["start"] for s in stamps))


def _verify_clip(job: tuple[str, dict]) -> dict:
    path, labels = job
    wav = load_audio(path)
    syllables = count_syllables(labels["transcript"])
    vad_s = _vad_speech_seconds(wav)
    return {"f0": median_f0(wav), "sps": syllables / (labels["speech_end_s"] - labels["speech_start_s"]),
            "sps_vad": syllables / vad_s if vad_s > 0 else float("inf")}


def verify(out_dir: Path, workers: int) -> None:
    records = []
    for split in synth.SPLITS:
        path = out_dir / f"{split}.jsonl"
        if path.exists():
            records += [json.loads(ln) for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    if not records:
        raise SystemExit(f"{out_dir}: no train.jsonl / test.jsonl records")
    jobs = [(str(out_dir / r["audio"]), r["labels"]) for r in records]
    with mp.get_context("spawn").Pool(workers) as pool:
        measured = pool.map(_verify_clip, jobs, chunksize=8)

    groups: dict[str, list[tuple[dict, dict]]] = defaultdict(list)
    for r, m in zip(records, measured):
        lab = r["labels"]
        for key in ("all", f"split={lab['split']}", f"engine={lab['engine']}", f"noise={lab['noise']}"):
            groups[key].append((lab, m))
    print(f"{len(records)} clips in {out_dir}")
    print(f"{'group':18} {'clips':>5} {'pitch bin ok':>13} {'speed bin ok':>13} {'speed ok (VAD)':>15} "
          f"{'F0 err median/p95 %':>20} {'rate err median/p95 %':>22}")
    for key in sorted(groups, key=lambda k: (k != "all", k)):
        rows = groups[key]
        pitch_ok = [np.isfinite(m["f0"]) and to_bin(m["f0"], PITCH_BINS_HZ, PITCH_NAMES) == lab["pitch"]
                    for lab, m in rows]
        speed_ok = [to_bin(m["sps"], SPEED_BINS_SYLL_PER_S, SPEED_NAMES) == lab["speed"] for lab, m in rows]
        vad_ok = [to_bin(m["sps_vad"], SPEED_BINS_SYLL_PER_S, SPEED_NAMES) == lab["speed"] for lab, m in rows]
        f0_err = [abs(m["f0"] / lab["f0_hz_target"] - 1) * 100 for lab, m in rows if np.isfinite(m["f0"])]
        sps_err = [abs(m["sps"] / lab["syllables_per_second_target"] - 1) * 100 for lab, m in rows]
        print(f"{key:18} {len(rows):5d} {100 * np.mean(pitch_ok):12.1f}% {100 * np.mean(speed_ok):12.1f}% "
              f"{100 * np.mean(vad_ok):14.1f}% "
              f"{np.median(f0_err):9.1f} / {np.percentile(f0_err, 95):5.1f} "
              f"{np.median(sps_err):11.1f} / {np.percentile(sps_err, 95):5.1f}")
    misses = [(lab, m) for lab, m in groups["all"]
              if not (np.isfinite(m["f0"]) and to_bin(m["f0"], PITCH_BINS_HZ, PITCH_NAMES) == lab["pitch"])
              or to_bin(m["sps"], SPEED_BINS_SYLL_PER_S, SPEED_NAMES) != lab["speed"]]
    for lab, m in misses:
        print(f"  miss: {lab['voice']:32} pitch {lab['pitch']:6} target {lab['f0_hz_target']:6.1f} got {m['f0']:6.1f}"
              f" | speed {lab['speed']:6} target {lab['syllables_per_second_target']:4.2f} got {m['sps']:4.2f}"
              f" | noise {lab['noise']} {lab['snr_db']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sentences", type=int, default=10, help="calibration sentences per setting")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT,
                    help="calibration file to write (default: the corpus's own, %(default)s)")
    ap.add_argument("--verify", type=Path, metavar="OUT_DIR", help="check a generated corpus instead")
    args = ap.parse_args()
    if args.verify is not None:
        verify(args.verify, args.workers)
    else:
        calibrate(args.sentences, args.workers, args.out)


if __name__ == "__main__":
    main()
