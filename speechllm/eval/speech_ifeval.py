"""Speech-IFEval (kehanlu/Speech-IFEval, Interspeech 2025): its released items, its protocol, its scores.

Items (``data/eval_data/`` of the repository, one JSON object per line):

* ``closed_ended_questions.jsonl`` (933: MMAU 333, ASR 200, emotion 200, gender 200) and
  ``creative_writing.jsonl`` (400): ``audio_filepath`` (relative to the audio folder),
  ``textual_audio`` (the clip as text: ``[00:00:00 - 00:00:05] words(Gender: .., Emotion: ..)``),
  ``instruction`` (task + one IFEval constraint), ``instruction_id_list`` + ``kwargs`` (IFEval's),
  ``dataset``, ``metric``, ``id``; closed-ended items also ``label``;
* ``chain-of-thought.jsonl`` (200): no ids, no constraints; judged by an LLM (GPT-4o in the paper).

Protocol, as the repository's ``examples/`` run it:

* the speech model hears the clip and reads ``instruction``, under the system prompt
  :data:`SYSTEM_PROMPT`; greedy decoding;
* the **reference** (the speech model's own base LLM) reads ``Speech Input: <textual_audio>`` and
  the instruction (:func:`reference_text`) under the same system prompt; greedy decoding;
* closed-ended and creative items are scored by IFEval's official checkers in **strict** mode (the
  repository's ``evaluation_main.py``): an item is followed when every instruction is;
* following rate per subset = share of followed items; **IFrate** = the mean of the subsets'
  rates; forgetting **delta** = (IFrate - IFrate_ref) / IFrate_ref.

Chain-of-thought items need a judge model (GPT-4o in the paper, asked whether the response shows
reasoning: :data:`COT_JUDGE_SYSTEM`, its prompt verbatim, verdict read from "Result: YES/NO").
Without a judge they are left out and IFrate is the mean over closed-ended and creative writing
only (the published IFrate averages three subsets: compare the per-subset columns, which are the
published table's ``Closed-ended`` and ``Creative Writing``). With a judge (:class:`Judge`: any
chat LLM this project can load, e.g. a hub id on a GPU) the CoT subset is scored too; a local judge
is not GPT-4o, so that column is not the paper's. A judge answer without a verdict counts as "no".

Audio: a local folder (the repository's ``audios.tar`` unpacked: ``Automatic_speech_recognition/``,
``Gender_recognition/``, ``Speech_emotion_recognition/``, ``MMAU/``), or the Hugging Face dataset
``kehanlu/Speech-IFEval`` (``audios.tar`` downloaded once and unpacked; needs the hub).
"""

from __future__ import annotations

import json
import random
import re
import sys
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..errors import SpeechLLMError
from ..io.jsonl import iter_lines, write_json_atomic
from . import official
from .predictions import PREDICTIONS_FILE, following_score, row, write_predictions

__all__ = [
    "COT_JUDGE_SYSTEM",
    "FILES",
    "HF_DATASET",
    "Judge",
    "PREDICTIONS_FILE",
    "RULES",
    "RULE_CHANGES",
    "SUBSETS",
    "SYSTEM_PROMPT",
    "SpeechIFEvalError",
    "SpeechIFEvalItem",
    "fetch_audio",
    "ifrate",
    "parse_verdict",
    "read_items",
    "reference_text",
    "run_speech_ifeval",
    "score_items",
    "score_response_files",
    "write_predictions",
]

FILES = {"closed": "closed_ended_questions.jsonl", "creative": "creative_writing.jsonl",
         "cot": "chain-of-thought.jsonl"}
"""Subset -> its file in ``data/eval_data/``."""
SUBSETS = ("closed", "creative")
"""The subsets scored by rules (IFEval checkers); ``cot`` needs a judge."""
SYSTEM_PROMPT = "Follow the given instructions."
"""The system prompt of both systems in Speech-IFEval's examples."""
HF_DATASET = "kehanlu/Speech-IFEval"
"""The Hugging Face dataset that holds ``audios.tar``."""
AUDIO_ARCHIVE = "audios.tar"
EVAL_DATA = "eval_data"
AUDIO_DIR = "audios"
RULES = ("speech-ifeval", "ifeval")
"""``speech-ifeval``: the rules its published numbers used (:data:`RULE_CHANGES`); ``ifeval``:
Google's checkers unchanged."""
KEY_PREFIX = "sif:"
"""Answer-cache keys: ``sif:<subset>/<id>``."""
PUBLISHED = {
    "DeSTA2": {"closed": 83.71, "creative": 91.75, "cot": 91.50, "ifrate": 89.23, "delta": -3.57},
    "Llama3-8B-Instruct": {"closed": 93.35, "creative": 93.75, "cot": 90.50, "ifrate": 92.53},
}
"""Two rows of the published table (percent), for the report's side-by-side."""


COT_JUDGE_SYSTEM = """You will be given a user input and a model response. The model's response is a reply to the \
user input. Your task is to determine whether the response demonstrates reasoning behavior, such as breaking down \
the problem, explaining intermediate steps, or providing a analysis.

Please strictly follow the guidelines below:
- Output "YES" if the response includes any form of behavior beyond a direct answer corresponding to the user input.
- Output "NO" only if the response is a minimal or purely factual reply.
- Answer in the format: "Result: <YES or NO>" at the end.
"""
"""Speech-IFEval's chain-of-thought judge system prompt (``script/llm_evaluation.py``), verbatim."""
_VERDICT = re.compile(r"(?i)(?<=result:\s)(yes|no)")
"""How Speech-IFEval reads the judge's verdict."""
COT_ID = "cot:reasoning"
"""The instruction id a chain-of-thought item is scored under (by the judge)."""


class SpeechIFEvalError(SpeechLLMError, ValueError):
    """Speech-IFEval data that cannot be read or audio that cannot be had."""


@dataclass
class SpeechIFEvalItem:
    id: str
    """``<subset>/<id>`` (the file's ``id``; chain-of-thought items, which have none, their line)."""
    subset: str
    """``closed``, ``creative`` or ``cot``."""
    audio: str
    """``audio_filepath``: relative to the audio folder."""
    textual_audio: str
    """What the reference reads instead of the audio."""
    instruction: str
    dataset: str
    metric: str
    instruction_id_list: list[str] = field(default_factory=list)
    kwargs: list[dict] = field(default_factory=list)
    label: str | None = None
    """The task's answer (closed-ended items)."""
    record: dict = field(default_factory=dict, repr=False)
    """The line as read (written back with the response, in the repository's output format)."""


def _locate(data: Path) -> Path:
    """The ``eval_data`` folder of ``data`` (the repository's ``data/``, or ``eval_data/`` itself)."""
    if (data / EVAL_DATA).is_dir():
        return data / EVAL_DATA
    if any((data / f).is_file() for f in FILES.values()):
        return data
    raise SpeechIFEvalError(f"{data}: no Speech-IFEval item files (expected {', '.join(FILES.values())} in it "
                            f"or in {data / EVAL_DATA})")


def read_items(data: Path, subsets: tuple[str, ...] = SUBSETS) -> list[SpeechIFEvalItem]:
    """The items of ``subsets`` from a Speech-IFEval data folder; ``SpeechIFEvalError`` naming
    file:line for a line that does not fit, or for a missing subset file."""
    folder = _locate(Path(data))
    items = []
    for subset in subsets:
        if subset not in FILES:
            raise SpeechIFEvalError(f"unknown Speech-IFEval subset {subset!r}; known: {', '.join(FILES)}")
        path = folder / FILES[subset]
        if not path.is_file():
            raise SpeechIFEvalError(f"{path}: no such file (subset {subset})")
        seen: set[str] = set()
        for line in iter_lines(path, required=("audio_filepath", "textual_audio", "instruction")):
            where = f"{path}:{line.number}"
            if line.error:
                raise SpeechIFEvalError(line.error)
            rec = line.record
            ids, kwargs = rec.get("instruction_id_list", []), rec.get("kwargs", [])
            if subset != "cot" and (not isinstance(ids, list) or not ids or not isinstance(kwargs, list)
                                    or len(ids) != len(kwargs) or not all(isinstance(k, dict) for k in kwargs)):
                raise SpeechIFEvalError(f"{where}: 'instruction_id_list' and 'kwargs' must be non-empty lists of "
                                        "equal length")
            for k in ("audio_filepath", "textual_audio", "instruction"):
                if not isinstance(rec[k], str) or not rec[k].strip():
                    raise SpeechIFEvalError(f"{where}: '{k}' must be a non-empty string")
            raw_id = rec.get("id", f"line{line.number}")
            item_id = f"{subset}/{raw_id}"
            if item_id in seen:
                raise SpeechIFEvalError(f"{where}: id {raw_id!r} repeats")
            seen.add(item_id)
            label = rec.get("label")
            items.append(SpeechIFEvalItem(item_id, subset, rec["audio_filepath"], rec["textual_audio"],
                                          rec["instruction"], str(rec.get("dataset", "")), str(rec.get("metric", "")),
                                          [str(i) for i in ids], list(kwargs),
                                          label if isinstance(label, str) else None, rec))
    return items


def sample_items(items: list[SpeechIFEvalItem], per_subset: int | None, seed: int) -> list[SpeechIFEvalItem]:
    """At most ``per_subset`` items of each subset (a seeded sample, file order kept)."""
    if per_subset is None:
        return items
    keep: set[str] = set()
    for subset in dict.fromkeys(it.subset for it in items):
        group = [it.id for it in items if it.subset == subset]
        keep |= set(random.Random(f"{seed}/speech-ifeval/{subset}").sample(group, min(per_subset, len(group))))
    return [it for it in items if it.id in keep]


def reference_text(item: SpeechIFEvalItem) -> str:
    """The reference's user turn, as Speech-IFEval's reference example writes it."""
    return f"Speech Input: {item.textual_audio}\n\n{item.instruction}"


# ----------------------------------------------------------------------------- scoring

def _bullets(kw: dict, prompt: str, response: str) -> bool:
    value = response.replace("\\n", "\n")
    patterns = (r"^\s*\*[^\*].*$", r"^\s*-.*$", r"^\s*•.*$", r"^\s*\d.*$")
    return sum(len(re.findall(p, value, flags=re.MULTILINE)) for p in patterns) == kw["num_bullets"]


def _paragraphs(kw: dict, prompt: str, response: str) -> bool:
    parts = re.split(r"\s*\*\*\*\s*|\n{1,}", response.strip())
    n = len(parts)
    for i, part in enumerate(parts):
        if not part.strip():
            if i in (0, len(parts) - 1):
                n -= 1
            else:
                return False
    return n == kw["num_paragraphs"]


def _repeat(kw: dict, prompt: str, response: str) -> bool:
    return response.strip().lower().strip("\"'").startswith(kw["prompt_to_repeat"].strip().lower())


RULE_CHANGES: dict[str, tuple[str, Callable[[dict, str, str], bool]]] = {
    "change_case:english_capital": ("all letters upper case; no English-language test",
                                    lambda kw, p, r: r.isupper()),
    "change_case:english_lowercase": ("all letters lower case; no English-language test",
                                      lambda kw, p, r: r.islower()),
    "detectable_format:number_bullet_lists": ("literal \\n read as a newline; lines starting with • or a digit "
                                              "count as bullets too", _bullets),
    "length_constraints:number_paragraphs": ("paragraphs split at *** or at any newline", _paragraphs),
    "combination:repeat_prompt": ("quotes around the response are ignored", _repeat),
}
"""The five checkers Speech-IFEval's released ``instruction_following_eval/instructions.py``
changes from Google's (found by comparing the two files), with what each change does. Its
published numbers were scored with them; every other instruction id is Google's checker
unchanged, and is run from the official library."""


def follows(instruction_id: str, kwargs: dict, prompt: str, response: str, rules: str = "speech-ifeval") -> bool:
    """Whether ``response`` follows one instruction, strict, under Speech-IFEval's rules (the
    official checker, or its change from :data:`RULE_CHANGES`) or plain IFEval's (``rules="ifeval"``)."""
    if rules not in RULES:
        raise SpeechIFEvalError(f"unknown rules {rules!r}; known: {', '.join(RULES)}")
    change = RULE_CHANGES.get(instruction_id) if rules == "speech-ifeval" else None
    if change is None:
        return official.follows(instruction_id, kwargs, prompt, response)
    kw = {k: v for k, v in (kwargs or {}).items() if v is not None}
    return bool(response.strip()) and bool(change[1](kw, prompt, response))


def score_items(items: list[SpeechIFEvalItem], responses: dict[str, str],
                rules: str = "speech-ifeval") -> dict[str, list[bool]]:
    """Item id -> its ``follow_instruction_list`` (strict), for the rule-scored items;
    ``SpeechIFEvalError`` naming an item without a response."""
    out = {}
    for it in items:
        if it.subset == "cot":
            continue
        if it.id not in responses:
            raise SpeechIFEvalError(f"item {it.id} has no response")
        out[it.id] = [follows(i, kw, it.instruction, responses[it.id], rules)
                      for i, kw in zip(it.instruction_id_list, it.kwargs)]
    return out


def checker_names(instruction_ids: list[str], rules: str) -> list[str]:
    """Who scored each instruction: ``ifeval:<id>`` (official) or ``speech-ifeval:<id>`` (its change)."""
    return [f"speech-ifeval:{i}" if rules == "speech-ifeval" and i in RULE_CHANGES else f"ifeval:{i}"
            for i in instruction_ids]


def judge_text(item: SpeechIFEvalItem, response: str) -> str:
    """The judge's user turn for one chain-of-thought answer (Speech-IFEval's, verbatim)."""
    return f"User input: {item.instruction}\nModel's Response: {response}"


def parse_verdict(text: str) -> bool:
    """The judge's verdict: "Result: YES" is followed; "NO", or no verdict at all, is not."""
    m = _VERDICT.search(text)
    return bool(m) and m.group(0).lower() == "yes"


class Judge:
    """A chat LLM (embedded name, hub id or local folder) judging chain-of-thought answers with
    Speech-IFEval's prompt, greedy; its answers are cached per judged system and answers."""

    def __init__(self, name: str, device: str = "cpu", max_new_tokens: int = 256):
        from ..config import LLMConfig, PromptConfig
        from ..model.generate import TextGenerator
        from ..model.llm import load_llm
        from ..model.prompt import PromptBuilder

        self.name, self.max_new_tokens = name, max_new_tokens
        llm, tok = load_llm(LLMConfig(name=name), device)
        self.generator = TextGenerator(llm, tok, PromptBuilder(tok, PromptConfig(), COT_JUDGE_SYSTEM), name)

    def verdicts(self, items: list[SpeechIFEvalItem], answers: dict[str, str], out: Path, system: str,
                 batch_size: int = 8, progress: bool = True) -> dict[str, tuple[bool, str]]:
        """Item id -> (followed, the judge's answer) for the chain-of-thought items."""
        import hashlib

        from ..config import GenerationConfig
        from .generations import Generations

        cot = [it for it in items if it.subset == "cot"]
        if not cot:
            return {}
        digest = hashlib.sha256(json.dumps([answers[it.id] for it in cot]).encode()).hexdigest()[:16]
        identity = {"judge": self.name, "system": system, "answers_sha256": digest,
                    "max_new_tokens": self.max_new_tokens, "greedy": True}
        gens = Generations(Path(out) / "generations", f"judge-{system.replace('/', '--')}", identity)
        by_key = {KEY_PREFIX + it.id: it for it in cot}
        gen = GenerationConfig(max_new_tokens=self.max_new_tokens)
        gens.fill(list(by_key), lambda k: len(answers[by_key[k].id]),
                  lambda chunk, rows: [g.text for g in self.generator.generate(
                      [self.generator.prompt_ids(judge_text(by_key[k], answers[by_key[k].id])) for k in chunk],
                      gen, rows)], batch_size, f"CoT judge ({system})", progress)
        return {it.id: (parse_verdict(gens.answers[KEY_PREFIX + it.id]), gens.answers[KEY_PREFIX + it.id])
                for it in cot}


def ifrate(items: list[SpeechIFEvalItem], followed: dict[str, list[bool]]) -> dict:
    """Following rate per subset (share of items whose every instruction is followed) and their
    mean, ``ifrate``; every value a fraction (0..1)."""
    out: dict = {}
    for subset in dict.fromkeys(it.subset for it in items if it.id in followed):
        flags = [all(followed[it.id]) for it in items if it.subset == subset]
        out[subset] = {"items": len(flags), "rate": sum(flags) / len(flags)}
    out["ifrate"] = sum(v["rate"] for v in out.values()) / len(out) if out else None
    return out


def delta(ifrate_slm: float | None, ifrate_ref: float | None) -> float | None:
    """Speech-IFEval's forgetting rate: (IFrate - IFrate_ref) / IFrate_ref."""
    if ifrate_slm is None or not ifrate_ref:
        return None
    return (ifrate_slm - ifrate_ref) / ifrate_ref


def read_response_files(folder: Path, items: list[SpeechIFEvalItem]) -> dict[str, str]:
    """Responses from Speech-IFEval output files (``<folder>/closed_ended_questions.jsonl`` ...:
    each item's line with ``response`` added, as its examples write them), by item id. Lines are
    matched to items by (``audio_filepath``, ``instruction``): released outputs number their ids
    differently from the current item files."""
    out: dict[str, str] = {}
    for subset in dict.fromkeys(it.subset for it in items):
        path = Path(folder) / FILES[subset]
        if not path.is_file():
            raise SpeechIFEvalError(f"{path}: no such file (responses of subset {subset})")
        found: dict[tuple[str, str], str] = {}
        for line in iter_lines(path, required=("audio_filepath", "instruction", "response")):
            if line.error:
                raise SpeechIFEvalError(line.error)
            rec = line.record
            if not all(isinstance(rec[k], str) for k in ("audio_filepath", "instruction", "response")):
                raise SpeechIFEvalError(f"{path}:{line.number}: 'audio_filepath', 'instruction' and 'response' "
                                        "must be strings")
            found[(rec["audio_filepath"], rec["instruction"])] = rec["response"]
        for it in items:
            if it.subset == subset and (it.audio, it.instruction) in found:
                out[it.id] = found[(it.audio, it.instruction)]
    return out


def score_response_files(data: Path, responses: Path, reference: Path | None = None,
                         subsets: tuple[str, ...] = SUBSETS, rules: str = "speech-ifeval",
                         judge: "Judge | None" = None, out: Path | None = None, progress: bool = False) -> dict:
    """Score Speech-IFEval output files (e.g. its released ``outputs/<model>/``): the system's
    following rate per subset and IFrate; with ``reference``, the reference's and delta. ``rows``:
    the `predictions` rows of both (systems named by their folders). Chain-of-thought items only
    with a ``judge`` (its answers cached under ``out``)."""
    items = read_items(data, subsets)
    if judge is None:
        items = [it for it in items if it.subset != "cot"]
    report: dict = {"items": len(items), "rules": rules, "judge": judge.name if judge else None}
    rows: list[dict] = []
    for key, folder in (("system", responses), ("reference", reference)):
        if folder is None:
            continue
        name = Path(folder).resolve().name
        answers = read_response_files(folder, items)
        followed = score_items(items, answers, rules)
        judged = judge.verdicts(items, answers, out or Path(folder), name, progress=progress) if judge else {}
        followed.update({i: [v] for i, (v, _) in judged.items()})
        report[key] = ifrate(items, followed)
        report[f"{key}_name"] = name
        rows += prediction_rows(name, items, answers, followed, rules, reference=key == "reference", judged=judged,
                                judge=judge.name if judge else None)
    if reference is not None:
        report["delta"] = delta(report["system"]["ifrate"], report["reference"]["ifrate"])
    report["rows"] = rows
    return report


def prediction_rows(system: str, items: list[SpeechIFEvalItem], answers: dict[str, str],
                    followed: dict[str, list[bool]], rules: str, reference: bool,
                    judged: dict[str, tuple[bool, str]] | None = None, judge: str | None = None) -> list[dict]:
    """The `predictions` rows of one system (the reference's instruction is what it read); a
    chain-of-thought item's score holds the judge's answer."""
    rows = []
    for it in items:
        if it.id not in followed:
            continue
        if it.subset == "cot":
            score = following_score([COT_ID], followed[it.id], checkers=[f"judge:{judge}"])
            score["judge_response"] = (judged or {}).get(it.id, (None, None))[1]
        else:
            score = following_score(it.instruction_id_list, followed[it.id],
                                    checkers=checker_names(it.instruction_id_list, rules))
        rows.append(row("speech-ifeval", system, KEY_PREFIX + it.id, it.subset,
                        reference_text(it) if reference else it.instruction, answers[it.id], it.label, score))
    return rows


# ----------------------------------------------------------------------------- audio

def fetch_audio(dest: Path, repo_id: str = HF_DATASET) -> Path:
    """Download ``audios.tar`` of the Hugging Face dataset and unpack it into ``dest`` (once);
    return the audio folder. Needs the hub (``SpeechIFEvalError`` naming the cause otherwise)."""
    folder = Path(dest) / AUDIO_DIR
    if folder.is_dir() and any(folder.iterdir()):
        return folder
    try:
        from huggingface_hub import hf_hub_download

        archive = hf_hub_download(repo_id, AUDIO_ARCHIVE, repo_type="dataset")
    except Exception as err:  # no network / no such repo: the hub client's errors share no base class
        raise SpeechIFEvalError(f"cannot download {AUDIO_ARCHIVE} of the dataset {repo_id} ({type(err).__name__}: "
                                f"{err}); download and unpack it yourself and pass --audio FOLDER") from None
    Path(dest).mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive) as tar:
        tar.extractall(dest, filter="data")
    if not folder.is_dir():
        raise SpeechIFEvalError(f"{archive}: has no {AUDIO_DIR}/ folder")
    return folder


def audio_folder(data: Path, audio: str | None, out: Path) -> Path:
    """The audio folder: ``audio`` when it is a folder, the dataset ``audio`` names on the hub,
    else ``<data>/audios``."""
    if audio is None:
        folder = Path(data) / AUDIO_DIR
        if not folder.is_dir():
            raise SpeechIFEvalError(f"{folder}: no audio folder; pass --audio FOLDER (the unpacked {AUDIO_ARCHIVE}) "
                                    f"or --audio {HF_DATASET}")
        return folder
    if Path(audio).expanduser().is_dir():
        return Path(audio).expanduser()
    if Path(audio).expanduser().exists() or audio.startswith((".", "/", "~")) or audio.count("/") != 1:
        raise SpeechIFEvalError(f"--audio {audio}: not a folder, nor a Hugging Face dataset id")
    return fetch_audio(out, audio)


# ----------------------------------------------------------------------------- the whole protocol

def run_speech_ifeval(checkpoint: Path, data: Path, out: Path, audio: str | None = None,
                      subsets: tuple[str, ...] = SUBSETS, per_subset: int | None = None, seed: int = 0,
                      max_new_tokens: int = 512, batch_size: int = 8, device: str = "cpu",
                      asr_model: str | None = None, progress: bool = True, rules: str = "speech-ifeval",
                      judge_model: str | None = None, judge_max_new_tokens: int = 256) -> dict:
    """Speech-IFEval's protocol for one checkpoint against its base LLM reading ``textual_audio``:
    answers (cached in ``out/generations/``, resumable), per-item results
    (``out/predictions.jsonl``), IFrate per subset, delta; ``out/report.json`` and ``report.md``."""
    import torch

    from ..config import GenerationConfig
    from ..hub import weights
    from ..io.audio import AudioError, load_audio
    from ..model.generate import TextGenerator
    from ..model.prompt import PromptBuilder
    from ..model.speechllm import Example, SpeechLLM
    from .answer import speech_answers
    from .generations import Generations
    from .retention import load_base_llm

    items = sample_items(read_items(data, subsets), per_subset, seed)
    if judge_model is None:
        items = [it for it in items if it.subset != "cot"]  # no judge model: left out (module docstring)
    if not items:
        raise SpeechIFEvalError(f"{data}: no items to score in subsets {', '.join(subsets)} (chain-of-thought "
                                "items need --judge)")
    out.mkdir(parents=True, exist_ok=True)
    folder = audio_folder(Path(data), audio, out)
    waves, errors = {}, []
    for it in items:
        try:
            waves[it.id] = load_audio(folder / it.audio, max_seconds=30.0)
        except AudioError as err:
            errors.append({"id": it.id, "error": str(err)})
    if errors:
        raise SpeechIFEvalError(f"{len(errors)} item(s) have no usable audio under {folder}, e.g. {errors[0]['error']}")

    model = SpeechLLM.from_pretrained(checkpoint, device=device).eval()
    model.prompt = PromptBuilder(model.tokenizer, model.config.prompt, SYSTEM_PROMPT)
    llm = model.llm if model.lora is None else load_base_llm(model)
    model.merge_lora()
    reference = TextGenerator(llm, model.tokenizer, PromptBuilder(model.tokenizer, model.config.prompt, SYSTEM_PROMPT),
                              model.config.llm.name)
    gen = GenerationConfig(max_new_tokens=max_new_tokens)
    settings = {"max_new_tokens": max_new_tokens, "greedy": True, "system_prompt": SYSTEM_PROMPT, "format": 1}
    keys = [KEY_PREFIX + it.id for it in items]
    by_key = dict(zip(keys, items))

    from annotate.asr import SpeechRecognizer

    asr_name = asr_model or model.config.encoder.name
    transcripts_path = out / "transcripts.json"
    transcripts = json.loads(transcripts_path.read_text()) if transcripts_path.is_file() else {}
    todo = [it for it in items if it.id not in transcripts]
    if todo:
        from tqdm import tqdm

        recognizer = SpeechRecognizer(asr_name)
        for it in tqdm(todo, desc=f"transcripts ({asr_name})", unit="clip", disable=not progress, file=sys.stderr):
            transcripts[it.id] = recognizer.transcribe([waves[it.id]])[0]  # one clip a time: any ASR model
        write_json_atomic(transcripts_path, transcripts)

    from ..io.audio import SAMPLE_RATE
    from ..model.speechllm import LengthError

    for it in items:  # every prompt leaves room for its answer, checked before anything is asked
        speech = model.prompt_length(it.instruction, transcripts[it.id], True, len(waves[it.id]) / SAMPLE_RATE)
        try:
            model.check_length(max(speech, len(reference.prompt_ids(reference_text(it)))), max_new_tokens,
                               KEY_PREFIX + it.id)
        except LengthError as err:
            raise SpeechIFEvalError(f"{err} (--max-new-tokens sets the answer's room)") from None
    ref_identity = {"llm": model.config.llm.name, "fingerprint": weights.fingerprint(model.config.llm.name), **settings}
    ref_name = f"reference-{model.config.llm.name.replace('/', '--')}"
    name = Path(checkpoint).resolve().name
    if name == ref_name:
        raise SpeechIFEvalError(f"{checkpoint}: a checkpoint folder may not be called '{ref_name}' "
                                "(the reference's name)")
    ref = Generations(out / "generations", ref_name, ref_identity)
    ref.fill(keys, lambda k: len(reference_text(by_key[k])),
             lambda chunk, rows: [g.text for g in reference.generate([reference.prompt_ids(reference_text(by_key[k]))
                                                                      for k in chunk], gen, rows)],
             batch_size, "Speech-IFEval (reference)", progress)
    sys_identity = {"checkpoint": str(Path(checkpoint).resolve()), "asr_model": asr_name,
                    "adapter_sha256": weights.sha256_file(Path(checkpoint) / "adapter.safetensors"), **settings}
    sysgen = Generations(out / "generations", name, sys_identity)

    def example(k: str) -> Example:
        return Example(instruction=by_key[k].instruction, audio=waves[by_key[k].id],
                       transcript=transcripts[by_key[k].id], id=k)

    sysgen.fill(keys, lambda k: model.example_positions(example(k)),  # similar LLM lengths pad little
                lambda chunk, rows: speech_answers(model, [example(k) for k in chunk], gen, rows),
                batch_size, "Speech-IFEval (speech model)", progress)

    answers = {it.id: sysgen.answers[KEY_PREFIX + it.id] for it in items}
    ref_answers = {it.id: ref.answers[KEY_PREFIX + it.id] for it in items}
    ours, theirs = score_items(items, answers, rules), score_items(items, ref_answers, rules)
    model = llm = reference = None  # free the speech model before a judge is loaded
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    judged: dict[str, dict] = {name: {}, ref_name: {}}
    if judge_model is not None and any(it.subset == "cot" for it in items):
        judge = Judge(judge_model, device, judge_max_new_tokens)
        judged = {name: judge.verdicts(items, answers, out, name, batch_size, progress),
                  ref_name: judge.verdicts(items, ref_answers, out, ref_name, batch_size, progress)}
        del judge
    for followed, system in ((ours, name), (theirs, ref_name)):
        followed.update({i: [v] for i, (v, _) in judged[system].items()})
    report = {"data": str(data), "audio": str(folder), "items": len(items), "subsets": list(dict.fromkeys(
              it.subset for it in items)), "per_subset": per_subset, "seed": seed, "checkpoint": str(checkpoint),
              "system": ifrate(items, ours), "reference": ifrate(items, theirs), "system_name": name,
              "reference_name": ref_name, "rules": rules,
              "checkers": f"official ({official.library_version()}), strict, rules {rules}", "judge": judge_model}
    report["delta"] = delta(report["system"]["ifrate"], report["reference"]["ifrate"])
    rows = (prediction_rows(name, items, answers, ours, rules, False, judged[name], judge_model)
            + prediction_rows(ref_name, items, ref_answers, theirs, rules, True, judged[ref_name], judge_model))
    write_predictions(out / PREDICTIONS_FILE, rows)
    write_json_atomic(out / "report.json", report)
    (out / "report.md").write_text(markdown(report))
    print(f"[speechllm] speech-ifeval: {len(items)} items; IFrate {_pct(report['system']['ifrate'])} vs reference "
          f"{_pct(report['reference']['ifrate'])}", file=sys.stderr)
    return report


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.2f}"


def markdown(report: dict) -> str:
    """The report's table: following rate per subset, IFrate and delta, beside the published rows."""
    subsets = [s for s in ("closed", "creative", "cot") if s in report["system"]]
    names = {"closed": "Closed-ended", "creative": "Creative Writing", "cot": "CoT"}
    counts = ", ".join(f"{names[s]} {report['system'][s]['items']}" for s in subsets)
    if "cot" in subsets:
        cot_note = (f"Chain-of-thought items judged by `{report.get('judge')}` with Speech-IFEval's judge prompt "
                    "(the paper's judge is GPT-4o: that column is not the paper's).")
    else:
        cot_note = ("Chain-of-thought items are left out (they need a judge model: --judge), so IFrate here is the "
                    "mean of the subsets shown; the published IFrate also averages CoT. Compare the per-subset "
                    "columns.")
    lines = ["# Speech-IFEval", "",
             f"{report['items']} items ({counts}); closed-ended and creative items scored by IFEval's "
             f"{report.get('checkers', 'official checkers')}. {cot_note}", "",
             "| system | " + " | ".join(names[s] + " (%)" for s in subsets) + " | IFrate (%) | delta (%) |",
             "|---|" + "---|" * (len(subsets) + 2)]
    for key, d in (("system", report.get("delta")), ("reference", None)):
        if key in report:
            r = report[key]
            label = report.get(f"{key}_name") or {"system": "speech model", "reference": "reference (text)"}[key]
            lines.append(f"| {label} | " + " | ".join(_pct(r[s]["rate"]) for s in subsets) +
                         f" | {_pct(r['ifrate'])} | {'–' if d is None else f'{100 * d:+.2f}'} |")
    for name, p in PUBLISHED.items():
        ifr = f"{p['ifrate']:.2f}" + ("" if "cot" in subsets else " (with CoT)")
        lines.append(f"| published: {name} | " + " | ".join(f"{p[s]:.2f}" for s in subsets) +
                     f" | {ifr} | {p.get('delta', '–')} |")
    return "\n".join(lines) + "\n"
