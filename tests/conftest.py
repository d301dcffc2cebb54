"""Shared fixtures. The default tier builds tiny random-init models offline into a temporary
$SPEECHLLM_HOME; the slow tier (`-m slow`) uses the real embedded models from the user's cache."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "samples" / "librivox_austen_0890.wav"
SAMPLE_TEXT = "unless to be rather cold hearted and rather selfish is to be ill disposed"
TINY_CONFIG = ROOT / "configs" / "tiny.yaml"


def pytest_configure(config):
    # The default tier never touches the user's cache; the slow tier shares it (real weights are big).
    if "slow" not in (config.getoption("-m") or "") or "not slow" in (config.getoption("-m") or ""):
        home = Path(config.cache.mkdir("speechllm-home")) if config.cache else None
        if home is not None:
            os.environ["SPEECHLLM_HOME"] = str(home)


@pytest.fixture()
def home(tmp_path, monkeypatch):
    """An empty $SPEECHLLM_HOME (tmp_path/home) and local wheelhouse (tmp_path/wheels): what a
    test fetches or prepares stays in tmp_path. Returns tmp_path."""
    monkeypatch.setenv("SPEECHLLM_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("SPEECHLLM_WHEELHOUSE", str(tmp_path / "wheels"))
    (tmp_path / "wheels").mkdir()
    return tmp_path


@pytest.fixture(scope="session")
def tiny_cfg():
    from speechllm.config import load_config

    return load_config(TINY_CONFIG)


@pytest.fixture()
def tiny_model(tiny_cfg):
    """A fresh tiny SpeechLLM (adapter seeded) per test: tests may train or modify it."""
    import torch

    from speechllm.model import build_model

    torch.manual_seed(0)
    return build_model(tiny_cfg)


@pytest.fixture(scope="session")
def sample_wav():
    from speechllm.io.audio import load_audio

    return load_audio(SAMPLE)
