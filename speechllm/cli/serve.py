"""`speechllm serve`: a local web page to try a speech model on your own audio (see speechllm.serve.app)."""

from __future__ import annotations

import argparse
import logging
import sys

from .common import add_model_source, add_overrides, add_section_flags, fail, info, load_model, new_parser


def add_parser(sub) -> argparse.ArgumentParser:
    p = new_parser(
        sub, "serve", "a local web page: upload or record audio, compare the speech model with the text reference",
        "Serve a page where you upload or record a clip and type an instruction. The page shows side\n"
        "by side the speech model's answer (audio + transcript) and the text reference (the base LLM\n"
        "reading the clip's annotated description), with the description and the latency of each.\n"
        "Models and annotators load once; requests are answered one at a time. Binds to 127.0.0.1\n"
        "unless --host says otherwise. JSON API: POST /api/answer?instruction=... with the audio as body.\n"
        "Options below override the config's `serve:` section.",
        ["speechllm serve --checkpoint runs/self-output              # then open http://127.0.0.1:7860/",
         "speechllm serve --untrained --port 8000 generation.max_new_tokens=64",
         "speechllm serve --checkpoint runs/NAME --max-seconds 15 --max-upload-mb 5",
         "curl --data-binary @clip.wav 'http://127.0.0.1:7860/api/answer?instruction=Describe+the+voice.'"])
    add_model_source(p)
    add_section_flags(p, "serve", metavars={"host": "ADDRESS", "asr_model": "NAME"})
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: cpu)")
    add_overrides(p)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Load the model and annotators once, then serve until Ctrl-C."""
    import ipaddress

    from ..serve.app import BYTES_PER_MB, Answerer, SpeechServer

    model, cfg = load_model(args)
    opts = cfg.serve
    label = str(args.checkpoint) if args.checkpoint else "untrained adapter (random audio embeddings)"
    if opts.max_upload_mb <= 0:
        return fail(f"--max-upload-mb must be positive, got {opts.max_upload_mb:g}")
    max_seconds = opts.max_seconds if opts.max_seconds is not None else model.config.encoder.max_seconds
    asr = None if opts.no_transcript else (opts.asr_model or model.config.encoder.name)
    try:
        answerer = Answerer(model, cfg.generation, max_seconds=max_seconds, asr_model=asr, label=label)
    except ValueError as err:
        return fail(str(err))
    try:
        server = SpeechServer(answerer, opts.host, opts.port, int(opts.max_upload_mb * BYTES_PER_MB))
    except OSError as err:
        return fail(f"cannot listen on {opts.host}:{opts.port} ({err.strerror or err})")
    try:
        loopback = ipaddress.ip_address(server.server_address[0]).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        info(f"listening on {opts.host}: anyone who can reach this machine can use the page "
             "(browsers allow the microphone only on localhost or https)")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("[speechllm] %(message)s"))
    log = logging.getLogger("speechllm.serve")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    print(f"serve: {server.url} (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
