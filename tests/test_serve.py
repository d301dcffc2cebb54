"""`speechllm serve`: the HTTP API on a tiny checkpoint (default tier) and the page in a real
headless browser (slow tier: Debian's chromium + chromedriver, driven by selenium)."""

from __future__ import annotations

import http.client
import io
import json
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from urllib.parse import urlencode

import numpy as np
import pytest
import soundfile as sf

from conftest import ROOT, SAMPLE

from speechllm.io.audio import SAMPLE_RATE
from speechllm.cli import main as cli_main
from speechllm.config import load_config
from speechllm.serve.app import DEFAULT_HOST, DEFAULT_PORT, ERROR_KINDS, Answerer, SpeechServer

MAX_SECONDS = 10.0
"""The test server's duration limit (below the 30 s encoder window, so it is the one enforced)."""
MAX_UPLOAD_BYTES = 2**20
"""The test server's size limit (1 MB; the sample clip is 170 KB)."""
INSTRUCTION = "What can you hear?"


def wav_bytes(seconds: float, amplitude: float = 0.0) -> bytes:
    """A WAV file of white noise at `amplitude` (0: silence)."""
    samples = amplitude * np.random.default_rng(0).standard_normal(int(seconds * SAMPLE_RATE)).astype(np.float32)
    buf = io.BytesIO()
    sf.write(buf, samples, SAMPLE_RATE, format="WAV")
    return buf.getvalue()


@pytest.fixture(scope="module")
def tiny_checkpoint(tiny_cfg, tmp_path_factory):
    import torch

    from speechllm.model import build_model

    torch.manual_seed(0)
    return build_model(tiny_cfg).save_pretrained(tmp_path_factory.mktemp("serve") / "ckpt")


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tiny_cfg):
    """The server on a free port, in this process (no transcript: the tiny Whisper cannot do ASR)."""
    from speechllm.model import SpeechLLM

    model = SpeechLLM.from_pretrained(tiny_checkpoint)
    srv = SpeechServer(Answerer(model, tiny_cfg.generation, max_seconds=MAX_SECONDS, asr_model=None, label="tiny"),
                       "127.0.0.1", 0, MAX_UPLOAD_BYTES)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join()


def request(srv, method: str, path: str, body: bytes | None = None) -> tuple[int, dict | str, dict]:
    conn = http.client.HTTPConnection(*srv.server_address[:2], timeout=120)
    try:
        conn.request(method, path, body=body)
        reply = conn.getresponse()
        raw = reply.read().decode()
        kind = reply.headers.get("Content-Type", "")
        return reply.status, json.loads(raw) if kind.startswith("application/json") else raw, dict(reply.headers)
    finally:
        conn.close()


def ask(srv, body: bytes, filename: str = "clip.wav", instruction: str = INSTRUCTION) -> tuple[int, dict]:
    status, data, _ = request(srv, "POST", "/api/answer?" + urlencode({"instruction": instruction,
                                                                      "filename": filename}), body)
    return status, data


# ----------------------------------------------------------------------------- the HTTP API (default tier)

def test_good_upload_gives_both_answers_the_description_and_latencies(server):
    from speechllm.model import Example

    status, data = ask(server, SAMPLE.read_bytes(), "librivox.wav")
    assert status == 200, data
    assert data["filename"] == "librivox.wav" and data["duration"] == pytest.approx(5.3)
    assert data["description"].startswith("[00:00-00:06] (Gender: ") and "Noise: " in data["description"]
    assert data["transcript"] is None  # this server runs no ASR
    # the page shows exactly what the two systems say
    answerer = server.answerer
    wav = answerer.decode(SAMPLE.read_bytes(), "librivox.wav")
    assert data["speech"]["text"] == answerer.model.generate([Example(instruction=INSTRUCTION, audio=wav)],
                                                             answerer.gen)[0]
    assert data["reference"]["text"] == answerer.reference.answer([data["description"]], [INSTRUCTION],
                                                                  answerer.gen, batch_size=1)[0].text
    for system in ("speech", "reference"):
        assert 0 < data[system]["seconds"] <= data[system]["total_seconds"]
    assert data["reference"]["total_seconds"] == pytest.approx(data["timings"]["annotate"]
                                                               + data["reference"]["seconds"])


def test_corrupt_upload_is_a_clear_error_and_the_server_keeps_serving(server):
    status, data = ask(server, b"ID3 not really an mp3" * 50, "broken.mp3")
    assert status == 422 and data["kind"] == "audio"
    assert data["error"].startswith("broken.mp3: cannot decode audio") and "BytesIO" not in data["error"]
    status, data = ask(server, b"", "empty.wav")
    assert status == 422 and data["error"] == "empty.wav: empty file (0 bytes)"
    status, data = ask(server, SAMPLE.read_bytes())
    assert status == 200 and data["reference"]["text"] is not None


def test_too_long_and_too_large_uploads_are_refused_with_a_clear_message(server):
    status, data = ask(server, wav_bytes(MAX_SECONDS + 2, 0.1), "long.wav")
    assert status == 422 and data["kind"] == "too_long"
    assert data["error"] == f"long.wav: {MAX_SECONDS + 2:.1f} s is longer than the maximum {MAX_SECONDS:.1f} s"
    status, data = ask(server, b"\0" * (2 * MAX_UPLOAD_BYTES), "big.wav")
    assert status == 413 and data["kind"] == "too_large"
    assert data["error"] == "big.wav: 2.0 MB is larger than the upload limit 1.0 MB"
    status, data = ask(server, wav_bytes(0.05, 0.1), "blip.wav")
    assert status == 422 and data["kind"] == "too_short" and "too short" in data["error"]
    assert ask(server, SAMPLE.read_bytes())[0] == 200


def test_silence_and_bad_requests_are_explained(server):
    status, data = ask(server, wav_bytes(2.0), "silence.wav")
    assert status == 422 and data["kind"] == "no_speech" and data["error"].startswith("silence.wav: no speech")
    status, data = ask(server, SAMPLE.read_bytes(), instruction="   ")
    assert status == 400 and data["kind"] == "request" and "instruction" in data["error"]
    status, data, _ = request(server, "POST", "/api/nothing", b"x")
    assert status == 404 and data["kind"] in ERROR_KINDS
    assert ask(server, SAMPLE.read_bytes())[0] == 200


def test_page_and_info_carry_the_limits_and_models(server):
    status, page, headers = request(server, "GET", "/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    for element in ('id="audio-file"', 'id="record"', 'id="instruction"', 'id="submit"', 'id="speech-answer"',
                    'id="reference-answer"', 'id="description"', 'id="error"'):
        assert element in page
    assert '"max_upload_bytes": 1048576' in page and "Content-Security-Policy" in headers
    status, info, _ = request(server, "GET", "/api/info")
    assert status == 200
    assert info["max_seconds"] == MAX_SECONDS and info["max_upload_bytes"] == MAX_UPLOAD_BYTES
    assert info["llm"] == "tiny-random-llama" and info["encoder"] == "tiny-random-whisper" and info["asr"] is None


def test_command_line_binds_to_this_machine_by_default(tiny_checkpoint, capsys):
    import argparse

    from speechllm.cli.common import section_updates
    from speechllm.cli.serve import add_parser

    args = add_parser(argparse.ArgumentParser().add_subparsers()).parse_args(["--checkpoint", "x"])
    serve = load_config(None, None, section_updates(args)).serve
    assert (serve.host, serve.port) == (DEFAULT_HOST, DEFAULT_PORT) == ("127.0.0.1", 7860)
    args = add_parser(argparse.ArgumentParser().add_subparsers()).parse_args(["--checkpoint", "x", "--port", "80"])
    assert load_config(None, None, section_updates(args)).serve.port == 80
    assert cli_main(["serve", "--checkpoint", str(tiny_checkpoint), "--no-transcript", "--max-seconds", "31"]) == 2
    assert "--max-seconds must be in (0, 30]" in capsys.readouterr().err
    assert cli_main(["serve", "--checkpoint", str(tiny_checkpoint.parent)]) == 2
    assert "not a speechllm checkpoint" in capsys.readouterr().err


# ----------------------------------------------------------------------------- the page in a browser (slow tier)

CHROMIUM = "chromium"
CHROMEDRIVER = "chromedriver"
ANSWER_TIMEOUT_S = 300
"""Upper bound for one answer in the browser test (a hang fails instead of blocking CI)."""
SERVER_START_TIMEOUT_S = 600
"""Upper bound for the server to load (the first run may prepare whisper-tiny.en)."""
BROWSER_MAX_UPLOAD_MB = 0.5
"""The browser test server's size limit (the sample clip is 0.17 MB)."""
RECORD_SECONDS = 3
"""How long the browser test records from the fake microphone (which plays the sample clip)."""


def _browser(tmp_path: Path):
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail("selenium is missing: `pip install -e '.[test]'` (make setup) installs it")
    chromium, driver = shutil.which(CHROMIUM), shutil.which(CHROMEDRIVER)
    if chromium is None or driver is None:
        pytest.fail(f"{CHROMIUM} and {CHROMEDRIVER} are needed for the browser test: run "
                    "`bash scripts/install_system_deps.sh` (make setup does) to apt-install chromium chromium-driver")
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,860",
                "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
                f"--use-file-for-fake-audio-capture={SAMPLE}", f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        opts.add_argument(arg)
    return webdriver.Chrome(options=opts, service=Service(driver))


@pytest.fixture()
def served(tiny_checkpoint, tmp_path):
    """`python -m speechllm.serve` on a free port, as a user starts it; yields its URL."""
    log = (tmp_path / "server.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "speechllm.serve", "--checkpoint", str(tiny_checkpoint),
                             "--port", "0", "--asr-model", "whisper-tiny.en", "--max-seconds", str(MAX_SECONDS),
                             "--max-upload-mb", str(BROWSER_MAX_UPLOAD_MB)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=log, text=True)
    watchdog = threading.Timer(SERVER_START_TIMEOUT_S, proc.kill)
    watchdog.start()
    line = proc.stdout.readline()
    watchdog.cancel()
    try:
        if not line.startswith("serve: http://127.0.0.1:"):
            proc.kill()
            pytest.fail(f"the server did not start: {line!r}\n{(tmp_path / 'server.log').read_text()[-3000:]}")
        yield line.split()[1]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


@pytest.mark.slow
def test_page_in_a_real_browser_uploads_records_and_shows_both_answers(served, tmp_path, record_property):
    import time

    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser = _browser(tmp_path)
    text = lambda id_: browser.find_element(By.ID, id_).text  # noqa: E731

    def submit() -> str:
        """Click Answer and wait until the page says done or error; returns that state."""
        browser.find_element(By.ID, "submit").click()
        WebDriverWait(browser, ANSWER_TIMEOUT_S).until(
            lambda b: b.find_element(By.ID, "status").get_attribute("data-state") in ("done", "error"))
        return browser.find_element(By.ID, "status").get_attribute("data-state")

    try:
        browser.get(served)
        assert "whisper-tiny.en" in text("model-line") and f"{MAX_SECONDS:g} s" in text("limits")

        broken = tmp_path / "broken.wav"
        broken.write_bytes(b"RIFF this is not a wav file" * 20)
        browser.find_element(By.ID, "audio-file").send_keys(str(broken))
        assert submit() == "error"
        assert text("error").startswith("broken.wav: cannot decode audio")

        long = tmp_path / "long.wav"
        long.write_bytes(wav_bytes(MAX_SECONDS + 2, 0.1))
        browser.find_element(By.ID, "audio-file").send_keys(str(long))
        assert submit() == "error"
        assert text("error") == f"long.wav: {MAX_SECONDS + 2:.1f} s is longer than the maximum {MAX_SECONDS:.1f} s"

        big = tmp_path / "big.wav"  # refused by the page itself, before any upload
        big.write_bytes(b"\0" * int(1.2 * BROWSER_MAX_UPLOAD_MB * 2**20))
        browser.find_element(By.ID, "audio-file").send_keys(str(big))
        browser.find_element(By.ID, "submit").click()
        assert text("error") == f"big.wav: 0.6 MB is larger than the upload limit {BROWSER_MAX_UPLOAD_MB} MB."

        browser.find_element(By.ID, "audio-file").send_keys(str(SAMPLE))
        instruction = browser.find_element(By.ID, "instruction")
        instruction.clear()
        instruction.send_keys("Describe the speaker.")
        assert submit() == "done"
        assert not browser.find_element(By.ID, "error").is_displayed()
        description = text("description")
        assert description.startswith("[00:00-00:06] \"") and "selfish" in description.lower()  # ASR transcript
        assert "Gender: " in description and "Speaking speed: " in description
        for system in ("speech", "reference"):
            assert text(f"{system}-answer")  # the tiny models' words, or "(empty answer)"
            assert re.fullmatch(r"\d+\.\d\d s from audio = (ASR|annotation) \d+\.\d\d s \+ answer \d+\.\d\d s",
                                text(f"{system}-latency"))
        shot = tmp_path / "serve.png"
        browser.save_screenshot(str(shot))
        record_property("screenshot", str(shot))
        print(f"screenshot: {shot}")

        browser.find_element(By.ID, "record").click()  # the fake microphone plays the sample clip
        WebDriverWait(browser, ANSWER_TIMEOUT_S).until(
            lambda b: b.find_element(By.ID, "record-state").get_attribute("data-state") == "recording")
        time.sleep(RECORD_SECONDS)
        browser.find_element(By.ID, "record").click()
        WebDriverWait(browser, ANSWER_TIMEOUT_S).until(
            lambda b: b.find_element(By.ID, "record-state").get_attribute("data-state") == "recorded")
        assert submit() == "done", text("error")
        assert text("status").startswith("recording.wav (") and text("description").startswith("[00:00-00:0")
    finally:
        browser.quit()
