"""Real recorded speech with known labels, from Debian packages (installed by
scripts/install_system_deps.sh), as a manifest the annotate stage reads.

- pocketsphinx-testdata: five LibriVox clips of Jane Austen's *Sense and Sensibility* (public
  domain) read by one male reader, with CMU Sphinx's transcripts (its five "cards" clips are left
  out: their speaker's gender is not documented, and an unlabelled clip would be scored against
  the annotators' own guess);
- alsa-utils: eight clips of a female voice naming loudspeaker channels ("Front Left"), the ALSA
  speaker-test sounds (its "Noise" clip is noise, not speech, and is left out).

Synthetic speech says little about how a speech model hears people; these 13 clips are the real
recordings that can be had offline here. They are few: read their accuracies with their
intervals.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from ..io.jsonl import write_jsonl_atomic
from ..records import ManifestRecord

POCKETSPHINX = Path("/usr/share/pocketsphinx/test/data")
ALSA = Path("/usr/share/sounds/alsa")
LIBRIVOX_GENDER = "male"
"""The reader of pocketsphinx-testdata's LibriVox chapter."""
ALSA_GENDER = "female"
"""The voice of alsa-utils' speaker-test sounds."""
ALSA_CHANNELS = ("Front_Center", "Front_Left", "Front_Right", "Rear_Center", "Rear_Left", "Rear_Right",
                 "Side_Left", "Side_Right")
"""The speech clips of alsa-utils (each says its channel's name)."""
PACKAGES = ("pocketsphinx-testdata", "alsa-utils")


@dataclass(frozen=True)
class RealClip:
    """One real recording: where it lies and what is known about it."""
    id: str
    path: Path
    labels: dict


def _sphinx_transcripts(path: Path) -> dict[str, str]:
    """CMU Sphinx's `<s> words </s> (file-id)` lines -> {file id: words}."""
    out = {}
    for line in path.read_text().splitlines():
        if "(" in line and line.rstrip().endswith(")"):
            words, _, rest = line.rpartition("(")
            out[rest.rstrip(")").strip()] = words.replace("<s>", "").replace("</s>", "").strip()
    return out


def real_clips(pocketsphinx: Path = POCKETSPHINX, alsa: Path = ALSA) -> list[RealClip]:
    """Every labelled real clip whose package is installed (none when neither is)."""
    clips = []
    folder = pocketsphinx / "librivox"
    if (folder / "transcription").is_file():
        for file_id, words in sorted(_sphinx_transcripts(folder / "transcription").items()):
            wav = folder / f"{file_id}.wav"
            if wav.is_file():
                clips.append(RealClip(f"librivox-{file_id}", wav, {"transcript": words, "gender": LIBRIVOX_GENDER}))
    for channel in ALSA_CHANNELS:
        wav = alsa / f"{channel}.wav"
        if wav.is_file():
            clips.append(RealClip(f"alsa-{channel.lower()}", wav, {"transcript": channel.replace("_", " ").lower(),
                                                                    "gender": ALSA_GENDER}))
    return clips


def write_real_manifest(out_dir: Path, clips: list[RealClip] | None = None) -> Path | None:
    """Copy the real clips into `out_dir/audio/` and write `out_dir/manifest.jsonl`; None (and
    nothing written) when no package is installed."""
    clips = real_clips() if clips is None else clips
    if not clips:
        return None
    audio = out_dir / "audio"
    audio.mkdir(parents=True, exist_ok=True)
    records = []
    for clip in clips:
        target = audio / f"{clip.id}{clip.path.suffix}"
        if not target.exists():
            shutil.copyfile(clip.path, target)
        records.append(ManifestRecord(clip.id, f"audio/{target.name}", clip.labels).to_json())
    manifest = out_dir / "manifest.jsonl"
    write_jsonl_atomic(manifest, records)
    return manifest
