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

import io
import logging
import json
import socket
import threading
import time
import traceback
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from ..config import ServeConfig
from ..errors import SpeechLLMError
from ..records import MAX_INSTRUCTION_CHARS, MetadataRecord

log = logging.getLogger("speechllm.serve")

DEFAULT_HOST = ServeConfig.host
"""Loopback only: the page runs a model for whoever reaches it."""
DEFAULT_PORT = ServeConfig.port
"""The port local model demos usually take."""
DEFAULT_MAX_UPLOAD_MB = ServeConfig.max_upload_mb
"""Largest upload; 30 s of 48 kHz stereo float32 WAV is 11.5 MB."""
PAGE_RESOURCE = "page.html"
"""The page's HTML + JS, beside this module."""
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
        import annotate.pipeline  # noqa: F401 (registers the built-in annotators)
        from annotate.base import ANNOTATORS, order_annotators
        from ..config import DEFAULT_ANNOTATORS

        from ..eval.answer import Reference

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

        from ..io.audio import SAMPLE_RATE

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

        from ..io.audio import AudioError, prepare_waveform

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

    def annotate(self, wav, filename: str) -> tuple[MetadataRecord, float]:
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

        from ..model import Example

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
            transcript = record.asr_transcript
            with torch.inference_mode():
                t2 = time.perf_counter()
                try:
                    speech = self.model.generate([Example(instruction=instruction, audio=wav, transcript=transcript)],
                                                 self.gen)[0]
                except SpeechLLMError as err:  # longer than the LLM's context
                    raise ServeError(HTTPStatus.BAD_REQUEST, "request", f"{filename}: {err}") from None
                t_speech = time.perf_counter() - t2
                t3 = time.perf_counter()
                reference = self.reference.answer([record.description], [instruction], self.gen, batch_size=1)[0]
                t_reference = time.perf_counter() - t3
        return {
            "filename": filename,
            "instruction": instruction,
            "duration": record.duration,
            "transcript": transcript,
            "description": record.description,
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
        log.info("%s %s", self.address_string(), format % args)

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
        log.info(f"answered {filename} ({result['duration']:.1f} s): speech model {result['speech']['seconds']:.2f} s, "
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
    """The page (`page.html` beside this module), with the limits and model names filled in (as
    JSON for its script)."""
    from importlib import resources

    page = resources.files(__package__).joinpath(PAGE_RESOURCE).read_text(encoding="utf-8")
    config = {**info, "max_upload_bytes": max_upload_bytes, "default_instruction": DEFAULT_INSTRUCTION}
    return page.replace("__CONFIG__", json.dumps(config).replace("<", "\\u003c")).encode()
