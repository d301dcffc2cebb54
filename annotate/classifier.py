"""Any transformers audio-classification model as an annotator.

    speechllm annotate clips.jsonl --out meta.jsonl --classifier emotion=superb/wav2vec2-base-superb-er \
        --classifier accent=./my-accent-model --device cuda

Each `KEY=MODEL` (a hub id or a local folder holding a model that `AutoModelForAudioClassification`
loads, with its feature extractor) becomes an annotator named KEY: the top label of the model's
`id2label` is the annotation's value and bin, its probability the confidence, and the description
gains the field KEY ("Emotion: hap", with the attribute table's field name when KEY is one of its
rows, else KEY in title case). A KEY that names a built-in annotator (e.g. gender) replaces it.
Clips are classified in the pipeline's batches, on `annotate.device`.
"""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np

from speechllm.config import AnnotateConfig
from speechllm.errors import SpeechLLMError
from speechllm.hub import weights
from speechllm.io.audio import SAMPLE_RATE, prepare_waveform
from speechllm.labels import generic

from .base import Annotation, Annotator, Clip

VERSION = "1"
"""Bumped when what a classifier annotator writes changes."""
TOP_SCORES = 3
"""Labels kept with their probabilities in the annotation's `extra.scores`."""


class ClassifierError(SpeechLLMError, ValueError):
    """A classifier that cannot be used (no such folder, not an audio-classification model,
    no labels); the message names the KEY=MODEL and the cause."""


def _load_error(key: str, model: str, err: Exception) -> ClassifierError:
    return ClassifierError(f"--classifier {key}={model}: cannot load an audio-classification model "
                           f"({type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''})")


def check_classifier(key: str, model: str) -> dict[int, str]:
    """Before workers start: that `model` resolves (a local folder, or a hub id in the local
    cache or on a reachable hub), is an audio-classification model and names its labels; its
    `id2label`. Reads the config only, not the weights."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_AUDIO_CLASSIFICATION_MAPPING_NAMES

    try:
        weights.check_available(model)
        config = AutoConfig.from_pretrained(weights.resolve(model, prepare_missing=False))
    except SpeechLLMError as err:
        raise ClassifierError(f"--classifier {key}={model}: {err}") from None
    except (OSError, ValueError, KeyError) as err:
        raise _load_error(key, model, err) from None
    if config.model_type not in MODEL_FOR_AUDIO_CLASSIFICATION_MAPPING_NAMES:
        raise ClassifierError(f"--classifier {key}={model}: a '{config.model_type}' model is not an "
                              "audio-classification model (AutoModelForAudioClassification does not load it)")
    heads = set(MODEL_FOR_AUDIO_CLASSIFICATION_MAPPING_NAMES.values())
    architectures = list(getattr(config, "architectures", None) or [])
    if architectures and not heads & set(architectures):
        raise ClassifierError(f"--classifier {key}={model}: its weights are a {', '.join(architectures)}, which has "
                              "no audio-classification head (loading it would classify with random weights)")
    labels = {int(i): str(v) for i, v in (config.id2label or {}).items()}
    if not labels or any(not v.strip() for v in labels.values()):
        raise ClassifierError(f"--classifier {key}={model}: the model's config names no labels (id2label)")
    return labels


class AudioClassifier:
    """A transformers audio-classification model and its feature extractor, batched.

    Args:
        model: hub id or local folder.
        device: torch device (cpu, cuda, cuda:1, ...).
        key: the annotation key, for error messages.
    """

    def __init__(self, model: str, device: str = "cpu", key: str = "classifier"):
        import torch
        from transformers import AutoFeatureExtractor, AutoModelForAudioClassification

        self.model_name, self.device = model, torch.device(device)
        self.labels = check_classifier(key, model)
        path = weights.resolve(model, prepare_missing=False)
        try:
            self.feature_extractor = AutoFeatureExtractor.from_pretrained(path)
            self.model = AutoModelForAudioClassification.from_pretrained(path).to(self.device).eval()
        except (OSError, ValueError, KeyError) as err:
            raise _load_error(key, model, err) from None
        self.sampling_rate = int(getattr(self.feature_extractor, "sampling_rate", SAMPLE_RATE) or SAMPLE_RATE)
        self._accepts = set(inspect.signature(self.model.forward).parameters)
        # the extractor's own padding when it has one (Whisper's: to 30 s), else to the batch's longest
        padding = inspect.signature(self.feature_extractor.__call__).parameters.get("padding")
        default = padding.default if padding is not None else False
        self._padding = default if default not in (False, None, "do_not_pad", inspect.Parameter.empty) else "longest"
        self._multi_label = getattr(self.model.config, "problem_type", None) == "multi_label_classification"

    def classify(self, waveforms: list[np.ndarray]) -> list[list[tuple[str, float]]]:
        """Per 16 kHz clip: (label, probability) pairs, most probable first."""
        import torch

        if not waveforms:
            return []
        if self.sampling_rate != SAMPLE_RATE:
            waveforms = [prepare_waveform(w, SAMPLE_RATE, sample_rate=self.sampling_rate) for w in waveforms]
        inputs = self.feature_extractor(waveforms, sampling_rate=self.sampling_rate, return_tensors="pt",
                                        padding=self._padding)
        inputs = {k: v.to(self.device) for k, v in inputs.items() if k in self._accepts}
        with torch.no_grad():
            logits = self.model(**inputs).logits.float()
        probs = (logits.sigmoid() if self._multi_label else logits.softmax(-1)).cpu().numpy()
        out = []
        for row in probs:
            order = np.argsort(-row, kind="stable")
            out.append([(self.labels.get(int(i), str(int(i))), float(row[i])) for i in order])
        return out


class Classifier(Annotator):
    """Annotator KEY from an audio-classification model (see the module docstring). Unlike the
    built-ins it is not in the registry: each `--classifier KEY=MODEL` makes one."""

    version = VERSION

    def __init__(self, key: str, model: str, device: str = "cpu"):
        self.name = key
        self.field = generic(key).field
        self.model = model
        self.classifier = AudioClassifier(model, device, key)

    @property
    def tag(self) -> str:
        return f"{self.name}/classifier-{self.version}"

    def annotate(self, clips: list[Clip], prior) -> list[Annotation]:
        out = []
        for ranked in self.classifier.classify([c.wav for c in clips]):
            label, score = ranked[0]
            out.append(Annotation(value=label, bin=label.strip(), confidence=round(score, 4),
                                  extra={"model": self.model,
                                         "scores": {lab: round(p, 4) for lab, p in ranked[:TOP_SCORES]}}))
        return out


def classifier_options(opts: AnnotateConfig) -> dict[str, dict[str, Any]]:
    """KEY -> the `Classifier` arguments of every `annotate.classifiers` entry."""
    return {key: {"model": model, "device": opts.device} for key, model in opts.classifier_specs().items()}
