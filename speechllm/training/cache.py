"""Encoder feature cache: the frozen Whisper encoder's tapped states, computed once per clip.

The encoder never trains, so each clip's tapped hidden states can be reused across epochs and
runs. Layout under `root`:

```
root/<key>/cache.json                      what the key was made of (human-readable)
root/<key>/<sha[:2]>/<sha>.safetensors     one entry per distinct audio content
```

`key` hashes the encoder weights' fingerprint, the tapped layers, the encoder's compute dtype, the
feature extractor's log-mel settings and `CACHE_FORMAT_VERSION`: changing any of them starts a new
folder. The model's name is not part of the key: the same weights under another name (an
embedded name and a local copy of its folder) share the folder. `sha` is the sha256 of the audio file's bytes, so one content at two paths shares an entry
and an edited file gets a new one. An entry holds one fp16 tensor per tap, `layer_<i>` of shape
(frames, width), trimmed to the clip's real encoder frames, with the frame count in its metadata.

Entries are written to a per-process temporary file in the same folder and renamed into place, so
concurrent writers (e.g. accelerate ranks) and killed runs never leave a partial entry under the
final name; an entry that still fails to read (truncated, foreign, wrong shapes) is recomputed.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..hub import weights
from ..io.audio import load_audio
from ..io.jsonl import json_digest
from ..model.encoder import WhisperTappedEncoder

CACHE_FORMAT_VERSION = 1
"""Bumped when the entry layout or how states are computed changes; old folders are then ignored."""
CACHE_INFO = "cache.json"
"""Written into each cache folder: the ingredients of its key."""
ENTRY_SUFFIX = ".safetensors"
STORE_DTYPE = torch.float16
"""On-disk dtype of the states (half the bytes of float32; about 3 significant digits)."""
STORE_DTYPE_TAG = "F16"
"""safetensors' name for `STORE_DTYPE` in a file header."""
RETURN_DTYPE = torch.float32
KEY_HEX_CHARS = 16
"""Hex digits of the folder key kept in the folder name."""
SHARD_HEX_CHARS = 2
"""Entries are spread over sub-folders named by the first digits of their sha256."""
FRAMES_META = "frames"
"""safetensors metadata field holding the entry's encoder frame count."""
FEATURE_SETTINGS = ("feature_size", "hop_length", "n_fft", "sampling_rate", "dither")
"""`WhisperFeatureExtractor` attributes that change the log-mel features, hence the states."""
BUILD_WINDOW_BATCHES = 8
"""`build` loads this many batches of clips at a time and sorts them by length before batching."""


@dataclass
class CacheStats:
    """Counts of one `build`, or of every `get` since the cache was made (`FeatureCache.stats`)."""
    hits: int = 0
    """Clips served from an entry that was already on disk and usable."""
    computed: int = 0
    """Entries computed and written (content shared by several clips of one call is computed once)."""
    corrupt: int = 0
    """Entries found unreadable on disk and recomputed (also counted in `computed`)."""
    seconds: float = 0.0
    """Wall time spent."""

    def add(self, other: "CacheStats") -> None:
        self.hits += other.hits
        self.computed += other.computed
        self.corrupt += other.corrupt
        self.seconds += other.seconds


def _layer_name(layer: int) -> str:
    return f"layer_{layer}"


class FeatureCache:
    """Tapped encoder states per clip, stored trimmed to the clip's length as fp16 safetensors.

    Args:
        root: folder that holds one sub-folder per encoder configuration.
        encoder: the frozen tapped encoder that computes missing entries.
        encoder_name: the name the encoder was loaded from (embedded name, folder or hub id);
            its `weights.fingerprint` identifies the weights in the cache key.
    """

    def __init__(self, root: Path, encoder: WhisperTappedEncoder, encoder_name: str):
        self.root = Path(root)
        self.encoder = encoder
        self.encoder_name = encoder_name
        fe = encoder.feature_extractor
        self.info = {
            "format_version": CACHE_FORMAT_VERSION,
            "fingerprint": weights.fingerprint(encoder_name),
            "layers": list(encoder.layers),
            "dtype": str(encoder.encoder.conv1.weight.dtype).removeprefix("torch."),
            "width": encoder.width,
            "feature_extractor": {k: getattr(fe, k, None) for k in FEATURE_SETTINGS},
            "store_dtype": str(STORE_DTYPE).removeprefix("torch."),
        }
        """What the folder key is made of; written to `cache.json` with the encoder's name."""
        digest = json_digest(self.info)
        self._folder = self.root / digest[:KEY_HEX_CHARS]
        self._hashes: dict[tuple[str, int, int], str] = {}
        self.stats = CacheStats()
        """Running totals of every `get` on this instance."""

    @property
    def folder(self) -> Path:
        """root / <key of weights fingerprint, layers, dtype, log-mel settings, format version>."""
        return self._folder

    # ------------------------------------------------------------------ keys and entries

    def key(self, audio_path: str | Path) -> str:
        """sha256 hex of the audio file's bytes, memoised per (resolved path, size, mtime_ns)."""
        path = Path(audio_path).resolve()
        try:
            st = path.stat()
        except OSError as err:
            raise FileNotFoundError(f"{audio_path}: cannot read audio for the feature cache ({err})") from None
        memo = (str(path), st.st_size, st.st_mtime_ns)
        if memo not in self._hashes:
            self._hashes[memo] = weights.sha256_file(path)
        return self._hashes[memo]

    def entry_path(self, sha: str) -> Path:
        """Where the entry of the audio content `sha` lives."""
        return self.folder / sha[:SHARD_HEX_CHARS] / f"{sha}{ENTRY_SUFFIX}"

    def _read(self, sha: str, load: bool = True) -> list[torch.Tensor] | None:
        """The entry's states (float32, one (frames, width) per tap), or None when it is missing or
        unusable (truncated, foreign, other layers, dtype or width). `load=False` checks the
        header only and returns [] for a usable entry."""
        from safetensors import SafetensorError, safe_open

        path = self.entry_path(sha)
        if not path.is_file():
            return None
        names = [_layer_name(i) for i in self.encoder.layers]
        try:
            with safe_open(str(path), framework="pt") as f:
                frames = int((f.metadata() or {})[FRAMES_META])
                slices = [f.get_slice(name) for name in names]
                if any(sl.get_dtype() != STORE_DTYPE_TAG or sl.get_shape() != [frames, self.encoder.width]
                       for sl in slices):
                    return None
                states = [f.get_tensor(name) for name in names] if load else []
        except (OSError, SafetensorError, KeyError, ValueError):
            return None
        return [s.to(RETURN_DTYPE) for s in states]

    def _write(self, sha: str, states: list[torch.Tensor]) -> list[torch.Tensor]:
        """Store one clip's states (each (frames, width)) atomically; return them as read back
        would give them (fp16-rounded float32), so a hit and a miss yield identical values."""
        from safetensors.torch import save_file

        stored = [s.detach().to("cpu", STORE_DTYPE).contiguous() for s in states]
        tensors = {_layer_name(i): s for i, s in zip(self.encoder.layers, stored)}
        final = self.entry_path(sha)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.with_name(f".{final.name}.{os.getpid()}.{threading.get_ident()}.tmp")  # one per writer
        save_file(tensors, str(tmp), metadata={FRAMES_META: str(stored[0].shape[0])})
        os.replace(tmp, final)
        return [s.to(RETURN_DTYPE) for s in stored]

    def _write_info(self) -> None:
        """Write `cache.json` once per folder (atomically): the key's ingredients and the name the
        encoder had for the first writer."""
        info = self.folder / CACHE_INFO
        if info.is_file():
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = info.with_name(f".{CACHE_INFO}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({**self.info, "encoder_name": self.encoder_name}, indent=2) + "\n")
        os.replace(tmp, info)

    # ------------------------------------------------------------------ computing

    def _compute(self, paths: dict[str, Path], batch_size: int) -> dict[str, list[torch.Tensor]]:
        """Encode the clips `paths` (sha -> one path with that content) in length-sorted batches of
        `batch_size`, store each, and return sha -> states as stored."""
        if batch_size < 1:
            raise ValueError(f"feature cache: batch_size must be at least 1, got {batch_size}")
        self._write_info()
        waves = {sha: load_audio(path, max_seconds=self.encoder.max_seconds) for sha, path in paths.items()}
        order = sorted(waves, key=lambda sha: len(waves[sha]))
        out = {}
        for start in range(0, len(order), batch_size):
            shas = order[start:start + batch_size]
            with torch.no_grad():
                enc = self.encoder.encode([waves[sha] for sha in shas])
            for b, sha in enumerate(shas):
                n = int(enc.lengths[b])
                out[sha] = self._write(sha, [s[b, :n] for s in enc.states])
        return out

    def _fetch(self, audio_paths: list[str | Path], batch_size: int,
               load: bool = True) -> tuple[list[list[torch.Tensor]], CacheStats]:
        """States per clip (reading hits, computing misses) and the counts of this call.
        `load=False` only checks that hits are usable and returns [] for them."""
        t0 = time.perf_counter()
        stats = CacheStats()
        shas = [self.key(p) for p in audio_paths]
        found: dict[str, list[torch.Tensor]] = {}
        missing: dict[str, Path] = {}
        for sha, path in zip(shas, audio_paths):
            if sha in found or sha in missing:
                continue
            states = self._read(sha, load)
            if states is not None:
                found[sha] = states
            else:
                stats.corrupt += int(self.entry_path(sha).exists())
                missing[sha] = Path(path)
        stats.hits = sum(sha in found for sha in shas)
        stats.computed = len(missing)
        if missing:
            found.update(self._compute(missing, batch_size))
        stats.seconds = time.perf_counter() - t0
        return [found[sha] for sha in shas], stats

    # ------------------------------------------------------------------ public API

    def get(self, audio_paths: list[str | Path], batch_size: int = 8) -> list[list[torch.Tensor]]:
        """Per clip: one float32 tensor per tapped layer (in `encoder.layers` order), each
        (frames, width) over the clip's real encoder frames; stored as fp16 on disk.

        Missing or unreadable entries are computed through `encoder.encode` on waveforms from
        `speechllm.audio.load_audio`, in length-sorted batches of `batch_size`, and stored. Values
        are the stored (fp16-rounded) ones whether they were read or computed. Counts accumulate
        in `self.stats`. An unreadable audio file raises `AudioError` naming it."""
        per_clip, stats = self._fetch(list(audio_paths), batch_size)
        self.stats.add(stats)
        return per_clip

    def build(self, audio_paths, batch_size: int = 8, progress: bool = True) -> CacheStats:
        """Fill the cache for many clips, `BUILD_WINDOW_BATCHES` batches in memory at a time.

        Resumable: entries already on disk are hits (their headers are checked, the data is not
        loaded) and are not recomputed, so a killed build loses at most the window in flight. Returns this build's counts and prints a
        one-line summary when `progress` is set."""
        from tqdm import tqdm

        paths = list(audio_paths)
        total = CacheStats()
        window = max(1, batch_size) * BUILD_WINDOW_BATCHES
        t0 = time.perf_counter()
        with tqdm(total=len(paths), desc="features", unit="clip", file=sys.stderr, disable=not progress) as bar:
            for start in range(0, len(paths), window):
                chunk = paths[start:start + window]
                _, stats = self._fetch(chunk, batch_size, load=False)
                total.add(stats)
                bar.update(len(chunk))
        total.seconds = time.perf_counter() - t0
        if progress:
            print(f"[speechllm] feature cache: {len(paths)} clips, {total.hits} cached, {total.computed} computed "
                  f"({total.corrupt} corrupt replaced) in {total.seconds:.1f} s -> {self.folder}",
                  file=sys.stderr, flush=True)
        return total
