"""Annotation accuracy against manifest labels: transcript WER (jiwer), gender accuracy (with
coverage: the annotator may abstain), pitch / speed / volume / noise bin accuracy, and confusion
tables."""

from __future__ import annotations

import functools
from collections import Counter

from speechllm.labels import MEASURED as BIN_ATTRIBUTES

ABSTAIN = "(none)"
"""Predicted value shown when an annotator abstained or was not run."""


@functools.lru_cache(maxsize=1)
def _whisper_normalizer():
    from transformers.models.whisper.english_normalizer import EnglishTextNormalizer

    return EnglishTextNormalizer({})


def normalize_text(text: str) -> str:
    """Whisper's English normalisation (the field's usual WER convention): lowercase, punctuation
    and hyphens dropped, numbers as digits ("ten" and "10" agree), "mr." as "mister"."""
    return _whisper_normalizer()(text)


def _predicted(rec: dict, attr: str) -> str:
    ann = rec["annotations"].get(attr)
    if ann is None:
        return ABSTAIN
    if ann.get("extra", {}).get("source") == "label":  # --trust-labels: score the annotator's own guess
        return ann["extra"].get("annotator_bin") or ABSTAIN
    return str(ann.get("bin") or ABSTAIN).lower()


def classifier_keys(records: list[dict]) -> list[str]:
    """Annotation keys made by classifier annotators (`--classifier KEY=MODEL`), first seen first."""
    keys: dict[str, None] = {}
    for rec in records:
        for key, ann in rec["annotations"].items():
            if isinstance(ann, dict) and "/classifier-" in str(ann.get("annotator", "")):
                keys.setdefault(key)
    return [k for k in keys if k not in BIN_ATTRIBUTES]


def evaluate(records: list[dict]) -> dict:
    """Scores over records that carry labels; attributes without labels are skipped."""
    import jiwer

    report: dict = {"clips": len(records)}
    refs, hyps = [], []
    for rec in records:
        label = (rec.get("labels") or {}).get("transcript")
        ann = rec["annotations"].get("transcript")
        if label and ann is not None:
            hyp = ann["value"] if ann.get("extra", {}).get("source") != "label" else None
            if hyp is not None:
                refs.append(normalize_text(label))
                hyps.append(normalize_text(hyp))
    if refs:
        report["transcript"] = {"clips": len(refs), "wer": round(jiwer.wer(refs, hyps), 4),
                                "cer": round(jiwer.cer(refs, hyps), 4)}
    for attr in (*BIN_ATTRIBUTES, *classifier_keys(records)):
        pairs = [(str(rec["labels"][attr]).lower(), _predicted(rec, attr)) for rec in records
                 if (rec.get("labels") or {}).get(attr) not in (None, "")]
        if not pairs:
            continue
        correct = sum(t == p for t, p in pairs)
        claimed = [(t, p) for t, p in pairs if p != ABSTAIN]
        confusion = Counter(pairs)
        truths = sorted({t for t, _ in pairs})
        preds = sorted({p for _, p in pairs})
        report[attr] = {
            "clips": len(pairs),
            "accuracy": round(correct / len(pairs), 4),
            "coverage": round(len(claimed) / len(pairs), 4),
            "accuracy_when_claimed": round(sum(t == p for t, p in claimed) / len(claimed), 4) if claimed else None,
            "confusion": {t: {p: confusion[(t, p)] for p in preds} for t in truths},
        }
    return report


def format_report(report: dict) -> str:
    """Markdown: a summary table and one confusion table per attribute."""
    lines = ["| attribute | clips | score | coverage |", "|---|---|---|---|"]
    if "transcript" in report:
        t = report["transcript"]
        lines.append(f"| transcript | {t['clips']} | WER {t['wer']:.1%} (CER {t['cer']:.1%}) | |")
    attrs = [k for k in report if isinstance(report[k], dict) and "confusion" in report[k]]
    for attr in attrs:
        r = report[attr]
        lines.append(f"| {attr} | {r['clips']} | accuracy {r['accuracy']:.1%} | {r['coverage']:.1%} |")
    for attr in attrs:
        conf = report[attr]["confusion"]
        preds = sorted({p for row in conf.values() for p in row})
        lines += ["", f"{attr}: rows = label, columns = annotation", "",
                  "| label | " + " | ".join(preds) + " |", "|---|" + "---|" * len(preds)]
        for truth, row in conf.items():
            lines.append(f"| {truth} | " + " | ".join(str(row.get(p, 0)) for p in preds) + " |")
    return "\n".join(lines)
