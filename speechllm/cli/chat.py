"""`speechllm chat`: answer a question about one audio file."""

from __future__ import annotations

import argparse
import time

from .common import add_model_source, add_overrides, fail, info, load_model, new_parser


def add_parser(sub) -> None:
    p = new_parser(
        sub, "chat", "answer a question about one audio file",
        "Answer a question about one audio file (wav/flac/ogg/mp3, any rate, mono or stereo).\n"
        "The clip is transcribed with Whisper (unless --transcript/--no-transcript), then the\n"
        "speech model reads [audio embeddings][transcript][question] and answers.",
        ["speechllm chat --untrained --audio samples/librivox_austen_0890.wav \"What can you hear?\"",
         "speechllm chat --checkpoint runs/demo/self-output --audio clip.mp3 \"Describe the voice.\" \\",
         "    generation.do_sample=true generation.temperature=0.6"])
    add_model_source(p)
    p.add_argument("--audio", required=True, metavar="FILE", help="the audio file")
    p.add_argument("question", help="the instruction, e.g. \"What can you hear?\"")
    p.add_argument("--transcript", help="use this transcript instead of running Whisper")
    p.add_argument("--no-transcript", action="store_true", help="give the model no transcript")
    p.add_argument("--asr-model", metavar="NAME", help="Whisper model for the transcript (default: the encoder's)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: cpu)")
    add_overrides(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from ..io.audio import SAMPLE_RATE, audio_seconds, load_audio
    from ..model import Example
    from ..records import MAX_INSTRUCTION_CHARS

    question = args.question.strip()
    if not question:
        return fail("the question is empty; ask one, e.g. \"What can you hear?\"")
    if len(question) > MAX_INSTRUCTION_CHARS:
        return fail(f"the question has {len(question)} characters; at most {MAX_INSTRUCTION_CHARS}")
    audio_seconds(args.audio)  # an unusable file is reported before the models load
    t0 = time.perf_counter()
    model, cfg = load_model(args)
    t_load = time.perf_counter() - t0

    wav = load_audio(args.audio, max_seconds=model.config.encoder.max_seconds)
    t1 = time.perf_counter()
    transcript = args.transcript
    if transcript is None and not args.no_transcript:
        from annotate.asr import SpeechRecognizer

        transcript = SpeechRecognizer(args.asr_model or model.config.encoder.name).transcribe([wav])[0]
        info(f"transcript: {transcript!r}")
    t_asr = time.perf_counter() - t1
    if args.checkpoint is None:
        info("untrained adapter: the audio embeddings are random; the answer rests on the transcript")
    t2 = time.perf_counter()
    with torch.inference_mode():
        answer = model.generate([Example(instruction=question, audio=wav, transcript=transcript)],
                                cfg.generation)[0]
    t_gen = time.perf_counter() - t2
    print(answer)
    info(f"load {t_load:.1f} s, asr {t_asr:.2f} s, answer {t_gen:.2f} s for a {len(wav) / SAMPLE_RATE:.1f} s clip")
    return 0
