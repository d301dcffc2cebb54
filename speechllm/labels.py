"""The attribute table: every attribute a clip can be described by, in one place.

Each row (:class:`Attribute`) names an attribute once for every stage: its values (the word
bins), the numeric edges that turn a measurement into a value, the description field
("Gender: Female"), the question the evaluation asks, the synonyms an answer may use for a value,
the cue words that commit an answer to a value (the `selective` strategy's agreement check), and
the phrases of the `label` strategy's template sentence. The annotators measure with the edges,
the synthetic corpus labels its clips with the same edges, the targets and evaluation stages read
the words from here.

Measured attributes and their bins (every edge an absolute number, not a corpus percentile):

- pitch: the clip's median F0 in Hz; low < 120 <= normal <= 200 < high;
- speed: syllables per second of speech time (the duration of the detected speech); slow < 3 <=
  normal <= 5 < fast; syllables are counted on the transcript with `count_syllables`, so every
  stage counts them the same way;
- volume: integrated loudness in LUFS (ITU-R BS.1770, as pyloudnorm measures it);
  quiet < -33 <= normal <= -20 < loud;
- noise: signal-to-noise ratio in dB; noisy < 20 <= clean;
- gender: from pitch (the annotator abstains near 160 Hz), or a label.

Label-only attributes (emotion, age, accent: no offline model exists) come from manifest labels.
A value on an edge belongs to the inner bin (`to_bin` documents the rule).
"""

from __future__ import annotations

import bisect
import math
import re
import string
from collections.abc import Sequence
from dataclasses import dataclass, field

PITCH_BINS_HZ = (120.0, 200.0)
"""Median-F0 edges (Hz) between `PITCH_NAMES`."""
PITCH_NAMES = ("low", "normal", "high")

SPEED_BINS_SYLL_PER_S = (3.0, 5.0)
"""Speaking-rate edges (syllables per second of speech time) between `SPEED_NAMES`."""
SPEED_NAMES = ("slow", "normal", "fast")

VOLUME_BINS_LUFS = (-33.0, -20.0)
"""Integrated-loudness edges (LUFS) between `VOLUME_NAMES`."""
VOLUME_NAMES = ("quiet", "normal", "loud")

NOISE_SNR_DB = 20.0
"""A clip whose speech-to-noise ratio is below this many dB is noisy."""
NOISE_NAMES = ("noisy", "clean")
"""Bin names for `to_bin(snr_db, (NOISE_SNR_DB,), NOISE_NAMES)`; a clip with no noise is clean."""

GENDER_NAMES = ("female", "male")

_VOWEL_GROUPS = re.compile(r"[aeiouy]+")
_TOKENS = re.compile(r"[A-Za-z']+|\d+")
_SOUNDED_ES_ENDINGS = ("ses", "zes", "ces", "ges", "shes", "ches", "xes")
"""-es endings that add a syllable ("voices", "boxes"); after other letters the e is silent."""
_DIGIT_SYLLABLES = {"0": 2, "1": 1, "2": 1, "3": 1, "4": 1, "5": 1, "6": 1, "7": 2, "8": 1, "9": 1}
"""A run of digits is read digit by digit ("zero" and "seven" have two syllables)."""


def to_bin(value: float, edges: Sequence[float], names: Sequence[str]) -> str:
    """The name of the bin that `value` falls in.

    `edges` are strictly ascending and split the line into `len(edges) + 1` bins named by `names`.
    A value below the first edge falls in the first bin and one above the last edge in the last
    bin. A value exactly on an edge belongs to the bin above the first edge and to the bin below
    any later edge; with the two-edge bins of this module that makes the middle bin closed
    (`to_bin(120.0, PITCH_BINS_HZ, PITCH_NAMES) == to_bin(200.0, ...) == "normal"`), and with a
    single edge a value on it falls in the upper bin (20 dB SNR is clean).
    """
    if len(names) != len(edges) + 1:
        raise ValueError(f"{len(edges)} edges need {len(edges) + 1} names, got {len(names)}: {list(names)}")
    if any(b <= a for a, b in zip(edges, edges[1:])):
        raise ValueError(f"bin edges must be strictly ascending, got {list(edges)}")
    if not math.isfinite(value):
        raise ValueError(f"cannot bin a non-finite value ({value})")
    if value < edges[0]:
        return names[0]
    return names[max(1, bisect.bisect_left(edges, value))]


def word_syllables(word: str) -> int:
    """Syllables of one English word: its vowel groups, less a silent final e ("make", but not
    "table" or "free"), or else less an -ed / -es that adds no syllable ("walked", "makes", but
    not "wanted", "voices"). Digits count as read one by one. About one syllable in ten off on
    running text."""
    word = word.lower()
    if word.isdigit():
        return sum(_DIGIT_SYLLABLES[d] for d in word)
    word = re.sub(r"[^a-z]", "", word)
    if not word:
        return 0
    count = len(_VOWEL_GROUPS.findall(word))
    if count > 1:
        consonant_le = word.endswith("le") and len(word) > 2 and word[-3] not in "aeiouy"
        if word.endswith("e") and not word.endswith(("ee", "ye")) and not consonant_le:
            count -= 1
        elif word.endswith("ed") and not word.endswith(("ted", "ded")):
            count -= 1
        elif word.endswith("es") and not word.endswith(_SOUNDED_ES_ENDINGS):
            count -= 1
    return max(1, count)


def count_syllables(text: str) -> int:
    """Estimated number of spoken syllables in English `text` (`word_syllables` of each word).

    The one definition of a syllable for the speed bins: the synthetic corpus's targets and the
    annotators' measurements both count with it, so its errors cancel between them.
    """
    return sum(word_syllables(w) for w in _TOKENS.findall(text))


# ----------------------------------------------------------------------------- the table

@dataclass(frozen=True)
class Attribute:
    """One row of the attribute table."""

    name: str
    """Key in manifest labels, annotations and task names ("gender")."""
    field: str
    """Name in the description line ("Gender" in "(Gender: Female, ...)")."""
    question: str
    """The evaluation's question (the answer-format line with the values is added to it)."""
    values: tuple[str, ...] = ()
    """The values in a natural order; empty for open label sets (emotion, age, accent)."""
    measured: bool = True
    """An offline annotator measures it; False: it comes only from manifest labels."""
    synonyms: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """value -> other words that name it in an answer ("woman" for female)."""
    cues: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """value -> words that commit an answer to that value; an answer with another value's cues
    contradicts the label. A value without cues ("normal") commits to nothing."""
    phrases: dict[str, str] = field(default_factory=dict)
    """value -> its phrase in the `label` strategy's template sentence."""
    questions: tuple[str, ...] = ()
    """Other phrasings of `question` (the evaluation draws from all of them, seeded per item, so
    that a model answering one phrasing by rote is not rewarded)."""
    answer: str = ""
    """A short answer stating a value, `{value}` filled in ("The speaker is {value}."): the
    answers of the teacher's worked examples."""
    keywords: tuple[str, ...] = ()
    """Words that tell an instruction asks about this attribute ("male", "gender")."""

    @property
    def phrasings(self) -> tuple[str, ...]:
        """Every phrasing of the attribute's question, `question` first."""
        return (self.question, *self.questions)


ATTRIBUTES: dict[str, Attribute] = {a.name: a for a in (
    Attribute("gender", "Gender", "Is the speaker male or female?", GENDER_NAMES,
              synonyms={"female": ("woman", "women", "feminine", "girl", "lady"),
                        "male": ("man", "men", "masculine", "boy", "gentleman")},
              cues={"female": ("female", "woman", "women", "she", "her", "lady", "girl", "feminine"),
                    "male": ("male", "man", "men", "he", "his", "him", "gentleman", "boy", "masculine")},
              phrases={"female": "a woman", "male": "a man"},
              questions=("Is the speaker female or male?", "What is the speaker's gender?",
                         "Is this a man's voice or a woman's voice?", "Is it a woman or a man speaking?"),
              answer="The speaker is {value}.", keywords=("male", "female", "gender", "man", "woman", "men", "women")),
    Attribute("pitch", "Pitch", "Is the speaker's voice low, normal or high in pitch?", PITCH_NAMES,
              synonyms={"high": ("high-pitched", "high pitched"), "low": ("low-pitched", "low pitched", "deep")},
              cues={"low": ("low-pitched", "deep", "low pitch"), "high": ("high-pitched", "high pitch", "squeaky")},
              questions=("How high or low is the speaker's voice?", "Is the voice high, normal or low in pitch?",
                         "What is the pitch of the speaker's voice?"),
              answer="The speaker's voice is {value} in pitch.", keywords=("pitch", "high or low", "low or high")),
    Attribute("speed", "Speaking speed", "Does the speaker talk slowly, at a normal speed, or fast?", SPEED_NAMES,
              synonyms={"fast": ("quick", "quickly", "rapid", "rapidly", "fast-paced", "fast paced"),
                        "slow": ("slowly", "slow-paced", "slow paced")},
              cues={"slow": ("slowly", "slow pace", "slow"), "fast": ("quickly", "fast", "rapid", "rapidly")},
              phrases={"slow": "slowly", "fast": "fast", "normal": "at a normal pace"},
              questions=("How fast is the speaker talking?", "Is the speaking rate fast, normal or slow?",
                         "At what speed does the speaker talk?"),
              answer="The speaker talks at a {value} speed.", keywords=("fast", "slow", "slowly", "quickly", "speed", "pace", "rate")),
    Attribute("volume", "Volume", "Is the recording quiet, normal or loud in volume?", VOLUME_NAMES,
              synonyms={"quiet": ("quietly", "soft", "softly"), "loud": ("loudly",)},
              cues={"quiet": ("quiet", "quietly", "soft", "softly", "whisper"), "loud": ("loud", "loudly", "shouting")},
              phrases={"quiet": "quietly", "loud": "loudly", "normal": "at a normal volume"},
              questions=("How loud is the speaker?", "Is the recording loud, normal or quiet?",
                         "What is the volume of the recording?"),
              answer="The recording is {value} in volume.", keywords=("loud", "loudly", "quiet", "volume")),
    Attribute("noise", "Noise", "Is the recording clean or noisy?", ("clean", "noisy"),
              synonyms={"noisy": ("noisily",)},
              cues={"noisy": ("noisy", "background noise", "static", "hiss"),
                    "clean": ("clean", "clear", "no background noise")},
              phrases={"noisy": "There is noticeable background noise.",
                       "clean": "The recording is clean, without background noise."},
              questions=("Is the recording noisy or clean?", "Is there background noise in the recording?",
                         "Is the audio clean, or is there noise?"),
              answer="The recording is {value}.", keywords=("noise", "noisy", "clean")),
    Attribute("emotion", "Emotion", "What emotion does the speaker's voice express?", measured=False,
              questions=("How does the speaker feel?", "What is the speaker's emotion?"),
              answer="The speaker sounds {value}.", keywords=("emotion", "feel", "mood")),
    Attribute("age", "Age", "How old does the speaker sound?", measured=False,
              questions=("What age group does the speaker belong to?",), answer="The speaker sounds {value}.",
              keywords=("age", "old", "young")),
    Attribute("accent", "Accent", "What accent does the speaker have?", measured=False,
              questions=("Where is the speaker's accent from?",), answer="The speaker has a {value} accent.",
              keywords=("accent",)),
)}
"""The attributes in description order (gender first)."""

MEASURED = tuple(a.name for a in ATTRIBUTES.values() if a.measured)
"""Attributes an offline annotator measures: gender, pitch, speed, volume, noise."""
LABEL_ONLY = tuple(a.name for a in ATTRIBUTES.values() if not a.measured)
"""Attributes taken from manifest labels as given: emotion, age, accent."""
TRANSCRIPT = "transcript"
"""The label / annotation key of the words spoken."""

NOT_ATTRIBUTES = frozenset({"transcript", "split", "voice", "engine", "engine_settings", "noise_type", "speaker",
                            "speaker_id", "id", "audio", "file", "path", "source"})
"""Label columns that describe how a clip was made or where it sits, not what it sounds like."""


SYNONYMS: dict[str, tuple[str, ...]] = {value: words for a in ATTRIBUTES.values() for value, words in a.synonyms.items()}
"""Words that count as a label in lenient extraction (only when the label is in the item's set)."""

TRANSCRIPT_ANSWER = 'The speaker says: "{value}"'
"""A worked example's answer to a question about the words spoken."""
TRANSCRIPT_QUESTION = "What did the speaker say?"
"""The question about the words spoken when an instruction pool has none."""
TRANSCRIPT_KEYWORDS = ("say", "said", "says", "transcribe", "transcription", "transcript", "words", "spoken")
"""Words that tell an instruction asks for the words spoken."""


def attribute_of(instruction: str) -> str | None:
    """The one attribute (or `transcript`) an instruction asks about, from the table's keywords;
    None for an open instruction ("What can you hear?") or one that names several."""
    text = instruction.lower()

    def said(keywords: tuple[str, ...]) -> bool:
        return any(re.search(rf"(?<![a-z]){re.escape(k)}(?![a-z])", text) for k in keywords)

    found = {a.name for a in ATTRIBUTES.values() if said(a.keywords)}
    if said(TRANSCRIPT_KEYWORDS):
        found.add(TRANSCRIPT)
    return found.pop() if len(found) == 1 else None


def options_line(labels: list[str] | tuple[str, ...]) -> str:
    """The answer-format line listing the labels in the given order."""
    options = f"{labels[0]} or {labels[1]}" if len(labels) == 2 else ", ".join(labels[:-1]) + f" or {labels[-1]}"
    return f"Answer with one word: {options}."


def label_instruction(question: str, labels: list[str] | tuple[str, ...]) -> str:
    """The question with its answer-format line listing the labels."""
    return f"{question} {options_line(labels)}"


_LETTER = re.compile(r"^\(?([a-z])\)?[.:]?$")
"""A lettered-choice answer: ``B``, ``(B)``, ``B.``, ``b:`` (after `normalize_label`)."""


def _lettered(instruction: str, labels: list[str]) -> bool:
    return bool(labels) and f"(A) {labels[0]}".lower() in instruction.lower()


def extract_strict(answer: str, labels: list[str], instruction: str = "") -> str | None:
    """The label the answer is, exactly (case, surrounding quotes/punctuation ignored), else None."""
    norm = normalize_label(answer)
    for label in labels:
        if norm == normalize_label(label):
            return label
    m = _LETTER.match(norm) if _lettered(instruction, labels) else None
    if m and ord(m.group(1)) - ord("a") < len(labels):
        return labels[ord(m.group(1)) - ord("a")]
    return None


def extract_lenient(answer: str, labels: list[str], instruction: str = "") -> str | None:
    """The label mentioned in the answer: exact answers first (as strict), then whole-word
    mentions of labels or their synonyms; several distinct labels -> the first mentioned; every
    label word itself (the options repeated) -> None."""
    strict = extract_strict(answer, labels, instruction)
    if strict is not None:
        return strict
    text = " " + re.sub(r"\s+", " ", answer.lower()) + " "
    first: dict[str, int] = {}
    literal: set[str] = set()
    for label in labels:
        for word in (label.lower(), *SYNONYMS.get(label.lower(), ())):
            m = re.search(r"(?<![\w-])" + re.escape(word) + r"(?![\w-])", text)
            if m:
                first[label] = min(first.get(label, m.start()), m.start())
                literal |= {label} if word == label.lower() else set()
    if not first or (len(labels) > 1 and len(literal) == len(labels)):  # nothing, or the options echoed back
        return None
    return min(first, key=first.get)


def normalize_label(text: str) -> str:
    """A label or an answer as compared with labels: lower case, single spaces, no surrounding
    whitespace, quotes or punctuation ("  'Female.' " -> "female")."""
    return re.sub(r"\s+", " ", text.lower()).strip(_LABEL_STRIP)


_LABEL_STRIP = string.whitespace + string.punctuation + "“”‘’«»"


def generic(name: str) -> Attribute:
    """The row of `name`, or a generic one for a label column the table does not know (its
    question asks for the speaker's `name`; its values come from the data)."""
    return ATTRIBUTES.get(name) or Attribute(name, name.replace("_", " ").title(), f"What is the speaker's {name}?",
                                             measured=False)
