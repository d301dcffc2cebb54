"""`speechllm serve`: a local web page to try a speech model on your own audio.

Upload a file or record from the microphone, type an instruction, and the page shows side by side

* the **speech model**'s answer (audio embeddings + ASR transcript + instruction), and
* the **text reference**: the base LLM reading the clip's annotated description (the same user
  turn the self-output targets are made from),

with the description line and the latency of each. The clip is annotated in-process by the same
annotators and description code as `speechllm annotate`, loaded once at start.

The server is the standard library's `ThreadingHTTPServer` and one page of HTML + JS, not
Gradio: the page is one form, and a stdlib server adds no dependency (Gradio brings FastAPI,
uvicorn, pydantic, httpx and more, whose versions move with every release), works offline, and
lets the upload limits be checked before the body is read. The page records with
`MediaRecorder`, decodes the recording in the browser and uploads it as a 16 kHz WAV, so the
server only ever reads formats libsndfile knows (wav/flac/ogg/mp3).

HTTP API (what the page uses; handy with curl):

    GET  /                 the page
    GET  /api/info         models, limits
    POST /api/answer?instruction=TEXT&filename=NAME    body: the audio file's bytes
         200 {"speech": {"text", "seconds", "total_seconds"}, "reference": {...}, "description",
              "transcript", "duration", "timings": {"decode", "annotate", "asr"}}
         4xx {"error": "a sentence", "kind": "too_large" | "too_long" | "audio" | "no_speech" | "request"}

    curl --data-binary @clip.wav 'http://127.0.0.1:7860/api/answer?instruction=What+can+you+hear%3F'
"""

from __future__ import annotations

import argparse
import io
import json
import socket
import sys
import threading
import time
import traceback
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from .cli import add_model_source, fail, info, load_model

DEFAULT_HOST = "127.0.0.1"
"""Loopback only: the page runs a model for whoever reaches it."""
DEFAULT_PORT = 7860
"""The port local model demos usually take."""
DEFAULT_MAX_UPLOAD_MB = 25.0
"""Largest upload; 30 s of 48 kHz stereo float32 WAV is 11.5 MB."""
MAX_INSTRUCTION_CHARS = 2000
"""Longest instruction accepted."""
MAX_FILENAME_CHARS = 200
"""Uploaded file names are cut to this length for messages."""
DRAIN_LIMIT_BYTES = 256 * 2**20
"""A refused body up to this size is read and dropped, so that the client sees the 413 reply
instead of a reset connection; a larger one is not read at all (the connection is closed)."""
READ_CHUNK_BYTES = 2**16
"""Socket read size while dropping a refused body."""
SOCKET_TIMEOUT_S = 60
"""A client silent this long (mid-upload or idle between requests) is disconnected."""
BYTES_PER_MB = 2**20
"""MB in the limits means MiB."""
DEFAULT_INSTRUCTION = "What can you hear?"
"""Pre-filled in the page's instruction box."""
ERROR_KINDS = ("too_large", "too_long", "too_short", "audio", "no_speech", "annotator", "request", "internal")
"""The `kind` of an error reply."""


class ServeError(Exception):
    """A request the server refuses; `message` is shown to the user as it is."""

    def __init__(self, status: HTTPStatus, kind: str, message: str):
        super().__init__(message)
        self.status, self.kind, self.message = status, kind, message


# ----------------------------------------------------------------------------- the engine

class Answerer:
    """Everything behind the page, without HTTP: decode an uploaded clip, annotate it, and answer
    the instruction twice (speech model and text reference). One request at a time (the models
    are shared); annotators and the reference are loaded once, here.

    Args:
        model: the speech model (eval mode is set here).
        gen: decoding settings for both answers.
        max_seconds: longest clip accepted (at most `model.config.encoder.max_seconds`).
        asr_model: Whisper for the transcript (embedded name, folder or hub id); None: no
            transcript (neither in the description nor for the speech model).
        label: how the page names the model (e.g. the checkpoint folder).
    """

    def __init__(self, model, gen, max_seconds: float, asr_model: str | None, label: str = ""):
        from annotate.base import ANNOTATORS, order_annotators
        from annotate.pipeline import DEFAULT_ANNOTATORS

        from .eval.answer import Reference

        limit = model.config.encoder.max_seconds
        if not 0 < max_seconds <= limit:
            raise ValueError(f"--max-seconds must be in (0, {limit:g}] (the encoder's window), got {max_seconds:g}")
        self.model = model.eval()
        self.gen = gen
        self.max_seconds = max_seconds
        self.asr_model = asr_model
        self.label = label
        names = list(DEFAULT_ANNOTATORS)
        if asr_model is None:  # no transcript, nor what needs one (speaking speed counts syllables of it)
            names = [n for n in names if n != "transcript" and "transcript" not in ANNOTATORS[n].requires]
        options = {"transcript": {"model": asr_model}, "noise": {"dnsmos": False}}
        self.annotators = [ANNOTATORS[n](**options.get(n, {})) for n in order_annotators(names)]
        if asr_model is not None:
            self._check_asr(asr_model)
        self.reference = Reference.for_model(model)
        self._lock = threading.Lock()

    def _check_asr(self, asr_model: str) -> None:
        """Transcribe a second of silence: a model that cannot transcribe fails here, at start, not
        on the first upload (and the first real request does not pay the warm-up)."""
        import numpy as np

        from .audio import SAMPLE_RATE

        asr = next(a for a in self.annotators if a.name == "transcript").asr
        try:
            asr.transcribe([np.zeros(SAMPLE_RATE, dtype=np.float32)])
        except Exception as err:
            raise ValueError(f"ASR model '{asr_model}' cannot transcribe ({type(err).__name__}: {err}); choose "
                             "another with --asr-model, or run without transcripts (--no-transcript)") from None

    def info(self) -> dict[str, Any]:
        """What the page shows about the models."""
        cfg = self.model.config
        return {"label": self.label, "llm": cfg.llm.name, "encoder": cfg.encoder.name, "adapter": cfg.adapter.kind,
                "asr": self.asr_model, "max_seconds": self.max_seconds,
                "max_new_tokens": self.gen.max_new_tokens}

    def decode(self, data: bytes, filename: str):
        """The upload as a 16 kHz mono float32 waveform; `ServeError` naming `filename` if unusable."""
        import soundfile as sf

        from .audio import AudioError, prepare_waveform

        if not data:
            raise ServeError(HTTPStatus.UNPROCESSABLE_ENTITY, "audio", f"{filename}: empty file (0 bytes)")
        try:
            with sf.SoundFile(io.BytesIO(data)) as f:
                seconds = f.frames / f.samplerate
                if seconds > self.max_seconds:  # refused before decoding (an mp3 within the size limit can be long)
                    raise ServeError(HTTPStatus.UNPROCESSABLE_ENTITY, "too_long",
                                     f"{filename}: {seconds:.1f} s is longer than the maximum {self.max_seconds:.1f} s")
                samples, sr = f.read(dtype="float32", always_2d=True), f.samplerate
        except ServeError:
            raise
        except Exception as err:  # libsndfile raises several types for corrupt or foreign data
            reason = getattr(err, "error_string", None) or str(err)  # libsndfile's own words, without the BytesIO
            raise ServeError(HTTPStatus.UNPROCESSABLE_ENTITY, "audio",
                             f"{filename}: cannot decode audio ({reason}); send wav, flac, ogg or mp3") from None
        try:
            return prepare_waveform(samples, sr, filename, max_seconds=self.max_seconds)
        except AudioError as err:
            text = str(err)
            kind = "too_long" if "longer than" in text else "too_short" if "too short" in text else "audio"
            raise ServeError(HTTPStatus.UNPROCESSABLE_ENTITY, kind, text) from None

    def annotate(self, wav, filename: str) -> tuple[dict, float]:
        """The clip's metadata record (as `speechllm annotate` writes it) and the seconds ASR took."""
        from annotate.base import Clip, ClipError
        from annotate.pipeline import clip_record

        clip = Clip(id="upload", audio=filename, wav=wav)
        results: dict = {}
        asr_seconds = 0.0
        for ann in self.annotators:
            t0 = time.perf_counter()
            try:
                results[ann.name] = ann.annotate([clip], [results])[0]
            except ClipError as err:
                kind = "no_speech" if ann.name == "vad" else "annotator"
                raise ServeError(HTTPStatus.UNPROCESSABLE_ENTITY, kind, f"{filename}: {err}") from None
            if ann.name == "transcript":
                asr_seconds = time.perf_counter() - t0
        return clip_record(clip, results, self.annotators), asr_seconds

    def answer(self, data: bytes, filename: str, instruction: str) -> dict[str, Any]:
        """Both answers to `instruction` about the uploaded clip, with the description and timings."""
        import torch

        from .model import Example

        instruction = instruction.strip()
        if not instruction:
            raise ServeError(HTTPStatus.BAD_REQUEST, "request", "type an instruction, e.g. \"What can you hear?\"")
        if len(instruction) > MAX_INSTRUCTION_CHARS:
            raise ServeError(HTTPStatus.BAD_REQUEST, "request",
                             f"the instruction has {len(instruction)} characters; at most {MAX_INSTRUCTION_CHARS}")
        with self._lock:
            t0 = time.perf_counter()
            wav = self.decode(data, filename)
            t_decode = time.perf_counter() - t0
            t1 = time.perf_counter()
            record, t_asr = self.annotate(wav, filename)
            t_annotate = time.perf_counter() - t1
            transcript = record["annotations"]["transcript"]["value"] if "transcript" in record["annotations"] else None
            with torch.inference_mode():
                t2 = time.perf_counter()
                speech = self.model.generate([Example(instruction=instruction, audio=wav, transcript=transcript)],
                                             self.gen)[0]
                t_speech = time.perf_counter() - t2
                t3 = time.perf_counter()
                reference = self.reference.answer([record["description"]], [instruction], self.gen, batch_size=1)[0]
                t_reference = time.perf_counter() - t3
        return {
            "filename": filename,
            "instruction": instruction,
            "duration": record["duration"],
            "transcript": transcript,
            "description": record["description"],
            # the speech model needs the transcript (ASR) first; the reference needs the whole annotation
            "speech": {"text": speech, "seconds": t_speech, "total_seconds": t_asr + t_speech},
            "reference": {"text": reference.text, "seconds": t_reference, "total_seconds": t_annotate + t_reference},
            "timings": {"decode": t_decode, "annotate": t_annotate, "asr": t_asr},
        }


# ----------------------------------------------------------------------------- HTTP

class _Handler(BaseHTTPRequestHandler):
    """Routes: the page, /api/info and /api/answer. Every error is a JSON reply; the server goes on."""

    server: "SpeechServer"
    protocol_version = "HTTP/1.1"
    timeout = SOCKET_TIMEOUT_S

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (the base class's name)
        info(f"{self.address_string()} {format % args}")

    def _send(self, status: HTTPStatus, body: bytes, content_type: str, close: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        if content_type.startswith("text/html"):
            self.send_header("Content-Security-Policy", "default-src 'self'; script-src 'unsafe-inline'; "
                                                        "style-src 'unsafe-inline'; media-src 'self' blob:")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: HTTPStatus, obj: dict, close: bool = False) -> None:
        self._send(status, json.dumps(obj).encode(), "application/json; charset=utf-8", close)

    def _error(self, err: ServeError, close: bool = False) -> None:
        self._json(err.status, {"error": err.message, "kind": err.kind}, close)

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        path = urlsplit(self.path).path
        if path in ("/", "/index.html"):
            self._send(HTTPStatus.OK, self.server.page, "text/html; charset=utf-8")
        elif path == "/api/info":
            self._json(HTTPStatus.OK, {**self.server.answerer.info(), "max_upload_bytes": self.server.max_upload_bytes})
        elif path == "/favicon.ico":
            self._send(HTTPStatus.NO_CONTENT, b"", "image/x-icon")
        else:
            self._error(ServeError(HTTPStatus.NOT_FOUND, "request", f"no page {path}"))

    def do_POST(self) -> None:  # noqa: N802
        url = urlsplit(self.path)
        if url.path != "/api/answer":
            drained = self._drain(self._length() or 0)
            self._error(ServeError(HTTPStatus.NOT_FOUND, "request", f"no endpoint {url.path}"), close=not drained)
            return
        query = parse_qs(url.query)
        instruction = query.get("instruction", [""])[0]
        filename = Path(query.get("filename", ["upload"])[0] or "upload").name[:MAX_FILENAME_CHARS] or "upload"
        length = self._length()
        limit = self.server.max_upload_bytes
        if length is None:
            self._error(ServeError(HTTPStatus.LENGTH_REQUIRED, "request",
                                   "send the audio as the request body with a Content-Length"), close=True)
            return
        if length > limit:
            drained = self._drain(length)
            self._error(ServeError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "too_large",
                                   f"{filename}: {length / BYTES_PER_MB:.1f} MB is larger than the upload limit "
                                   f"{limit / BYTES_PER_MB:.1f} MB"), close=not drained)
            return
        data = self.rfile.read(length)
        try:
            result = self.server.answerer.answer(data, filename, instruction)
        except ServeError as err:
            self._error(err)
            return
        except Exception as err:  # a bug or a model failure: say so, keep serving
            traceback.print_exc()
            self._error(ServeError(HTTPStatus.INTERNAL_SERVER_ERROR, "internal",
                                   f"{filename}: the server failed: {type(err).__name__}: {err}"))
            return
        info(f"answered {filename} ({result['duration']:.1f} s): speech model {result['speech']['seconds']:.2f} s, "
              f"reference {result['reference']['seconds']:.2f} s, annotation {result['timings']['annotate']:.2f} s")
        self._json(HTTPStatus.OK, result)

    def _length(self) -> int | None:
        value = self.headers.get("Content-Length")
        try:
            return int(value) if value is not None and int(value) >= 0 else None
        except ValueError:
            return None

    def _drain(self, length: int) -> bool:
        """Read and drop a body we will not use; False when it is too large to bother."""
        if length > DRAIN_LIMIT_BYTES:
            return False
        while length > 0:
            chunk = self.rfile.read(min(READ_CHUNK_BYTES, length))
            if not chunk:
                return False
            length -= len(chunk)
        return True


class SpeechServer(ThreadingHTTPServer):
    """The HTTP server holding one `Answerer` (requests are threads; answers are one at a time)."""

    daemon_threads = True

    def __init__(self, answerer: Answerer, host: str, port: int, max_upload_bytes: int):
        if ":" in host:  # an IPv6 address such as ::1
            self.address_family = socket.AF_INET6
        super().__init__((host, port), _Handler)
        self.answerer = answerer
        self.max_upload_bytes = max_upload_bytes
        self.page = render_page(answerer.info(), max_upload_bytes)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{'[' + host + ']' if ':' in host else host}:{port}/"


def render_page(info: dict[str, Any], max_upload_bytes: int) -> bytes:
    """The page, with the limits and model names filled in (as JSON for the script)."""
    config = {**info, "max_upload_bytes": max_upload_bytes, "default_instruction": DEFAULT_INSTRUCTION}
    return PAGE.replace("__CONFIG__", json.dumps(config).replace("<", "\\u003c")).encode()


PAGE = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>speechllm serve</title>
<style>
  :root { --fg: #1d2430; --muted: #5b6576; --line: #d9dee7; --accent: #2f5fd0; --bad: #b3261e; }
  * { box-sizing: border-box; }
  body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", "DejaVu Sans", sans-serif; color: var(--fg);
         margin: 0; background: #f5f7fa; }
  main { max-width: 1100px; margin: 0 auto; padding: 20px 24px 32px; }
  h1 { font-size: 21px; margin: 0 0 2px; }
  .muted { color: var(--muted); font-size: 13px; }
  .card { background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: 14px 16px; margin-top: 14px; }
  .row { display: flex; gap: 10px; align-items: center; flex-wrap: wrap; }
  label.h { font-weight: 600; display: block; margin-bottom: 6px; }
  input[type=text] { flex: 1; min-width: 260px; font: inherit; padding: 7px 9px; border: 1px solid var(--line);
                     border-radius: 6px; }
  button { font: inherit; padding: 7px 14px; border-radius: 6px; border: 1px solid var(--accent);
           background: #fff; color: var(--accent); cursor: pointer; }
  button.primary { background: var(--accent); color: #fff; }
  button:disabled { opacity: .5; cursor: default; }
  audio { height: 34px; }
  #error { color: var(--bad); background: #fdecea; border-color: #f4c7c3; white-space: pre-wrap; }
  #description { font-family: "DejaVu Sans Mono", ui-monospace, monospace; font-size: 13px; white-space: pre-wrap;
                 word-break: break-word; }
  .answers { display: grid; grid-template-columns: 1fr 1fr; gap: 14px; }
  .answers .card { margin-top: 0; }
  .answer { white-space: pre-wrap; min-height: 3em; }
  .latency { font-variant-numeric: tabular-nums; color: var(--muted); font-size: 13px; margin-top: 8px; }
  h2 { font-size: 16px; margin: 0 0 2px; }
  [hidden] { display: none !important; }
</style>
</head>
<body>
<main>
  <h1>speechllm serve</h1>
  <div class="muted" id="model-line"></div>

  <div class="card">
    <label class="h" for="audio-file">Audio</label>
    <div class="row">
      <input type="file" id="audio-file" accept="audio/*,.wav,.flac,.ogg,.mp3">
      <span class="muted">or</span>
      <button type="button" id="record">Record</button>
      <span class="muted" id="record-state"></span>
      <audio id="preview" controls hidden></audio>
    </div>
    <div class="muted" id="limits"></div>
    <label class="h" for="instruction" style="margin-top:12px">Instruction</label>
    <div class="row">
      <input type="text" id="instruction">
      <button type="button" class="primary" id="submit">Answer</button>
    </div>
    <div class="muted" id="status" data-state="idle"></div>
  </div>

  <div class="card" id="error" role="alert" hidden></div>

  <div id="results" hidden>
    <div class="card">
      <label class="h">Description <span class="muted">(what the annotators heard; the reference reads this)</span></label>
      <div id="description"></div>
    </div>
    <div class="answers" style="margin-top:14px">
      <div class="card">
        <h2>Speech model</h2>
        <div class="muted">audio + transcript &rarr; adapter &rarr; LLM</div>
        <p class="answer" id="speech-answer"></p>
        <div class="latency" id="speech-latency"></div>
      </div>
      <div class="card">
        <h2>Text reference</h2>
        <div class="muted">the base LLM reading the description</div>
        <p class="answer" id="reference-answer"></p>
        <div class="latency" id="reference-latency"></div>
      </div>
    </div>
  </div>
</main>
<script>
"use strict";
const CONFIG = __CONFIG__;
const SAMPLE_RATE = 16000;           // what the server's models read; recordings are resampled to it
const $ = (id) => document.getElementById(id);
let clip = null;                     // {blob, name}: the file or recording to send
let recorder = null, recordTimer = null;

const mb = (bytes) => (bytes / 1048576).toFixed(1) + " MB";
const secs = (s) => s.toFixed(2) + " s";
$("model-line").textContent = (CONFIG.label ? CONFIG.label + " \u2014 " : "") + "LLM " + CONFIG.llm +
  ", encoder " + CONFIG.encoder + ", adapter " + CONFIG.adapter +
  (CONFIG.asr ? ", transcripts by " + CONFIG.asr : ", no transcripts");
$("limits").textContent = "wav, flac, ogg or mp3; at most " + mb(CONFIG.max_upload_bytes) + " and " +
  CONFIG.max_seconds + " s (recording stops there).";
$("instruction").value = CONFIG.default_instruction;

function setStatus(state, text) { $("status").dataset.state = state; $("status").textContent = text; }
function showError(text) { $("error").textContent = text; $("error").hidden = false; }
function clearError() { $("error").hidden = true; $("error").textContent = ""; }
function useClip(blob, name) {
  clip = {blob, name};
  $("preview").src = URL.createObjectURL(blob);
  $("preview").hidden = false;
}

$("audio-file").addEventListener("change", () => {
  const f = $("audio-file").files[0];
  clearError();
  if (f) useClip(f, f.name);
});

// Recording: MediaRecorder gives webm/ogg (opus), which the server's decoder may not read, so the
// browser decodes it (resampling to 16 kHz) and sends a 16-bit mono WAV.
function wavBytes(buffer) {
  const n = buffer.length, ch = buffer.numberOfChannels;
  const view = new DataView(new ArrayBuffer(44 + 2 * n));
  const text = (o, s) => { for (let i = 0; i < s.length; i++) view.setUint8(o + i, s.charCodeAt(i)); };
  text(0, "RIFF"); view.setUint32(4, 36 + 2 * n, true); text(8, "WAVE"); text(12, "fmt ");
  view.setUint32(16, 16, true); view.setUint16(20, 1, true); view.setUint16(22, 1, true);
  view.setUint32(24, buffer.sampleRate, true); view.setUint32(28, 2 * buffer.sampleRate, true);
  view.setUint16(32, 2, true); view.setUint16(34, 16, true); text(36, "data"); view.setUint32(40, 2 * n, true);
  const chans = Array.from({length: ch}, (_, c) => buffer.getChannelData(c));
  for (let i = 0; i < n; i++) {
    let v = 0;
    for (const d of chans) v += d[i];
    v = Math.max(-1, Math.min(1, v / ch));
    view.setInt16(44 + 2 * i, v < 0 ? v * 32768 : v * 32767, true);
  }
  return new Blob([view], {type: "audio/wav"});
}

async function toWav(blob) {
  const decoder = new OfflineAudioContext(1, 1, SAMPLE_RATE);
  return wavBytes(await decoder.decodeAudioData(await blob.arrayBuffer()));
}

$("record").addEventListener("click", async () => {
  clearError();
  if (recorder && recorder.state === "recording") { recorder.stop(); return; }
  if (!navigator.mediaDevices || !window.MediaRecorder) {
    showError("This browser cannot record here (the microphone needs http://127.0.0.1 or localhost, or https).");
    return;
  }
  let stream;
  try { stream = await navigator.mediaDevices.getUserMedia({audio: true}); }
  catch (err) { showError("No microphone: " + err.message); return; }
  const chunks = [];
  recorder = new MediaRecorder(stream);
  recorder.ondataavailable = (e) => { if (e.data.size) chunks.push(e.data); };
  recorder.onstop = async () => {
    clearTimeout(recordTimer);
    stream.getTracks().forEach((t) => t.stop());
    $("record").textContent = "Record";
    try {
      useClip(await toWav(new Blob(chunks, {type: recorder.mimeType})), "recording.wav");
      $("record-state").textContent = "recorded";
      $("record-state").dataset.state = "recorded";
    } catch (err) { showError("Could not decode the recording: " + err.message); }
  };
  recorder.start();
  $("record").textContent = "Stop";
  $("record-state").textContent = "recording\u2026";
  $("record-state").dataset.state = "recording";
  recordTimer = setTimeout(() => recorder.state === "recording" && recorder.stop(), CONFIG.max_seconds * 1000);
});

$("submit").addEventListener("click", async () => {
  clearError();
  if (!clip) { showError("Choose an audio file or record one first."); return; }
  if (clip.blob.size > CONFIG.max_upload_bytes) {
    showError(clip.name + ": " + mb(clip.blob.size) + " is larger than the upload limit " +
              mb(CONFIG.max_upload_bytes) + ".");
    return;
  }
  const instruction = $("instruction").value.trim();
  if (!instruction) { showError("Type an instruction, e.g. \u201cWhat can you hear?\u201d"); return; }
  $("submit").disabled = true;
  setStatus("busy", "Annotating and answering " + clip.name + "\u2026");
  const t0 = performance.now();
  try {
    const url = "/api/answer?" + new URLSearchParams({instruction, filename: clip.name});
    const reply = await fetch(url, {method: "POST", body: clip.blob,
                                    headers: {"Content-Type": "application/octet-stream"}});
    let data;
    try { data = await reply.json(); } catch { throw new Error("the server sent no JSON (HTTP " + reply.status + ")"); }
    if (!reply.ok) { showError(data.error || ("HTTP " + reply.status)); setStatus("error", "Not answered."); return; }
    $("description").textContent = data.description;
    $("speech-answer").textContent = data.speech.text || "(empty answer)";
    $("reference-answer").textContent = data.reference.text || "(empty answer)";
    const t = data.timings;
    $("speech-latency").textContent = CONFIG.asr
      ? secs(data.speech.total_seconds) + " from audio = ASR " + secs(t.asr) + " + answer " + secs(data.speech.seconds)
      : secs(data.speech.seconds) + " from audio (no ASR)";
    $("reference-latency").textContent = secs(data.reference.total_seconds) + " from audio = annotation " +
      secs(t.annotate) + " + answer " + secs(data.reference.seconds);
    $("results").hidden = false;
    setStatus("done", data.filename + " (" + data.duration.toFixed(1) + " s): answered in " +
              secs((performance.now() - t0) / 1000) + " round trip.");
  } catch (err) {
    showError("Request failed: " + err.message);
    setStatus("error", "Not answered.");
  } finally {
    $("submit").disabled = false;
  }
});
</script>
</body>
</html>
"""


# ----------------------------------------------------------------------------- command line

def cmd_serve(args: argparse.Namespace) -> int:
    """`speechllm serve`: load the model and annotators once, then serve until Ctrl-C."""
    import ipaddress

    model, cfg = load_model(args)
    label = str(args.checkpoint) if args.checkpoint else "untrained adapter (random audio embeddings)"
    if args.max_upload_mb <= 0:
        return fail(f"--max-upload-mb must be positive, got {args.max_upload_mb:g}")
    max_seconds = args.max_seconds if args.max_seconds is not None else model.config.encoder.max_seconds
    asr = None if args.no_transcript else (args.asr_model or model.config.encoder.name)
    try:
        answerer = Answerer(model, cfg.generation, max_seconds=max_seconds, asr_model=asr, label=label)
    except ValueError as err:
        return fail(str(err))
    try:
        server = SpeechServer(answerer, args.host, args.port, int(args.max_upload_mb * BYTES_PER_MB))
    except OSError as err:
        return fail(f"cannot listen on {args.host}:{args.port} ({err.strerror or err})")
    try:
        loopback = ipaddress.ip_address(server.server_address[0]).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        info(f"listening on {args.host}: anyone who can reach this machine can use the page "
              "(browsers allow the microphone only on localhost or https)")
    print(f"serve: {server.url} (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def add_parser(sub) -> argparse.ArgumentParser:
    """Register `serve` on the `speechllm` command's subparsers."""
    srv = sub.add_parser(
        "serve", help="a local web page: upload or record audio, compare the speech model with the text reference",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Serve a page where you upload or record a clip and type an instruction. The page shows side\n"
                    "by side the speech model's answer (audio + transcript) and the text reference (the base LLM\n"
                    "reading the clip's annotated description), with the description and the latency of each.\n"
                    "Models and annotators load once; requests are answered one at a time. Binds to 127.0.0.1\n"
                    "unless --host says otherwise. JSON API: POST /api/answer?instruction=... with the audio as body.",
        epilog="examples:\n"
               "  speechllm serve --checkpoint runs/self-output              # then open http://127.0.0.1:7860/\n"
               "  speechllm serve --untrained --port 8000 generation.max_new_tokens=64\n"
               "  speechllm serve --checkpoint runs/NAME --max-seconds 15 --max-upload-mb 5\n"
               "  curl --data-binary @clip.wav 'http://127.0.0.1:7860/api/answer?instruction=Describe+the+voice.'",
    )
    add_model_source(srv)
    srv.add_argument("--host", default=DEFAULT_HOST, help="address to bind (default: %(default)s, this machine only)")
    srv.add_argument("--port", type=int, default=DEFAULT_PORT, help="port (default: %(default)s; 0 picks a free one)")
    srv.add_argument("--max-upload-mb", type=float, default=DEFAULT_MAX_UPLOAD_MB,
                     help="largest upload in MB (default: %(default)s)")
    srv.add_argument("--max-seconds", type=float,
                     help="longest clip in seconds (default and maximum: the encoder's window, 30 s for Whisper)")
    srv.add_argument("--asr-model", metavar="NAME", help="Whisper model for the transcript (default: the encoder's)")
    srv.add_argument("--no-transcript", action="store_true",
                     help="no ASR: no transcript in the description nor for the speech model")
    srv.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: cpu)")
    srv.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                     help="config overrides, e.g. generation.max_new_tokens=64")
    srv.set_defaults(func=cmd_serve)
    return srv


def main(argv: list[str] | None = None) -> int:
    """`python -m speechllm.serve ARGS` is `speechllm serve ARGS`."""
    from .cli import main as cli_main

    return cli_main(["serve", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
