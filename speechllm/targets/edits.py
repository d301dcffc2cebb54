"""Minimum-change edits of a self-output: keep the base LLM's own words and change only what the
labels show to be wrong (the `minimum-change` strategy).

Attribute words are fixed by code, word by word: a word that states another value of a labelled
attribute than the label's is replaced by the word of the same paradigm (`PARADIGMS`) that states
the label's value, in the original's case (`He` -> `She`, `MALE` -> `FEMALE`); every other byte of
the answer stays as it was. What is mapped (each row one paradigm, values in the attribute
table's words):

- gender: male/female, man/woman, men/women, males/females, he/she, his/her, him/her,
  himself/herself, boy/girl, gentleman/lady, masculine/feminine. "her" becomes "him" when the
  next word is a function word or the sentence ends (`HER_OBJECT_NEXT`), else "his";
- pitch: low-pitched/normal-pitched/high-pitched; and, only in a sentence about pitch (below),
  low/normal/high and deep (-> normal-pitched / high-pitched);
- speed: slowly/"at a normal pace"/quickly (also rapidly); slow/fast; and in a sentence about
  speed, normal, quick, rapid, low/high ("a high speed");
- volume: quietly/"at a normal volume"/loudly; quiet/loud; and in a sentence about volume,
  normal, soft, softly, low/high ("a low volume");
- noise: noisy/clean.

A word marked "in a sentence about X" (`CONTEXT_WORDS`: words that name values of several
attributes, and `AMBIGUOUS_WORDS`, which mean other things outside a description of a voice: "a
deep understanding", "a soft shade") is edited only when a field name before a colon
names X ("Pitch: Low", as a description echoed back writes it), else when the nearest attribute
noun in its sentence (`ATTRIBUTE_NOUNS`: pitch; speed, pace, rate, tempo; volume, loudness) names
X, or when its sentence names none and the instruction asks about X. "clear" is never edited (a clear voice is
not a noise level), nor are phrases such as "background noise".

Also: a right value under a negation ("The recording is not noisy." for a noisy clip; `not`,
`never`, `no` or an `n't` verb within `NEGATION_WINDOW` words before it) loses the negation, and a
negated wrong value ("not noisy" for a clean clip) is right as it stands. A sentence that lists
two values of an attribute with "or" (the options echoed back) states neither and is not
edited. Nothing inside double quotes (“...” too) and no occurrence of the clip's transcript is
edited: those are the words spoken.

A missed transcript (the instruction asks what was said, `labels.attribute_of`, and the answer
does not contain the transcript after Whisper's English normalisation) is fixed by
`insert_transcript`: the longest quoted span's content becomes the transcript, or, with nothing
quoted, the sentence `The speaker says: "..."` is added (after the answer; before it when the
answer was cut at the length limit, so that it is not lost with the cut). The other way, a
minimal-edit prompt to the base LLM (`MINIMAL_EDIT_PROMPT`, `targets.transcript_fix=prompt`), is
accepted only when its answer contains the transcript and is no further from the original than
the code's edit; the README gives what it did on the embedded LLM.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..labels import TRANSCRIPT, TRANSCRIPT_ANSWER, attribute_of

NEGATORS = frozenset({"not", "never", "no"})
"""Words that negate a value word after them ("not noisy")."""
NEGATION_WINDOW = 2
"""A negator counts when it is at most this many words before the value word ("not very noisy")."""
CONTRACTED_NEGATION = "n't"
UNNEGATED = {"isn't": "is", "aren't": "are", "wasn't": "was", "weren't": "were", "doesn't": "does", "don't": "do",
             "didn't": "did"}
"""Negated verbs and the verb without the negation (other `n't` verbs negate but are not rewritten)."""
ATTRIBUTE_NOUNS = {"pitch": "pitch", "speed": "speed", "pace": "speed", "rate": "speed", "tempo": "speed",
                   "volume": "volume", "loudness": "volume"}
"""Nouns that tell which attribute a sentence is about (for words that need context)."""
HER_OBJECT_NEXT = frozenset({"and", "or", "but", "to", "as", "with", "in", "on", "at", "for", "from", "that", "who",
                             "because", "than", "so", "is", "was"})
"""After "her", these words (or the end of the sentence) make it an object: female -> male gives "him"."""
OPTION_JOINER = "or"
"""A sentence with this word and two values of one attribute lists options (states neither)."""
AMBIGUOUS_WORDS = frozenset({"deep", "soft", "softly", "quick", "rapid"})
"""Words edited only in a sentence about their attribute, as those of several attributes are."""


@dataclass(frozen=True)
class Paradigm:
    """One row of corresponding words: the word for each value of an attribute."""
    attribute: str
    words: dict[str, str]
    """value -> the word (or phrase) that states it in this row."""


def _row(attribute: str, **words: str) -> Paradigm:
    return Paradigm(attribute, words)


PARADIGMS: tuple[Paradigm, ...] = (
    _row("gender", female="female", male="male"),
    _row("gender", female="woman", male="man"),
    _row("gender", female="women", male="men"),
    _row("gender", female="females", male="males"),
    _row("gender", female="she", male="he"),
    _row("gender", female="her", male="his"),
    _row("gender", female="her", male="him"),
    _row("gender", female="herself", male="himself"),
    _row("gender", female="girl", male="boy"),
    _row("gender", female="lady", male="gentleman"),
    _row("gender", female="feminine", male="masculine"),
    _row("pitch", low="low-pitched", normal="normal-pitched", high="high-pitched"),
    _row("pitch", low="low", normal="normal", high="high"),
    _row("pitch", low="deep", normal="normal-pitched", high="high-pitched"),
    _row("speed", slow="slowly", normal="at a normal pace", fast="quickly"),
    _row("speed", slow="slowly", normal="at a normal pace", fast="rapidly"),
    _row("speed", slow="slow", normal="normal", fast="fast"),
    _row("speed", slow="slow", normal="normal", fast="quick"),
    _row("speed", slow="slow", normal="normal", fast="rapid"),
    _row("speed", slow="low", normal="normal", fast="high"),
    _row("volume", quiet="quietly", normal="at a normal volume", loud="loudly"),
    _row("volume", quiet="softly", normal="at a normal volume", loud="loudly"),
    _row("volume", quiet="quiet", normal="normal", loud="loud"),
    _row("volume", quiet="soft", normal="normal", loud="loud"),
    _row("volume", quiet="low", normal="normal", loud="high"),
    _row("noise", noisy="noisy", clean="clean"),
)
"""Every mapped word, by attribute; a word found in a row is replaced by that row's word for the
label's value (the first row that has the word, of the attribute its sentence is about)."""


def _index(rows: tuple[Paradigm, ...]) -> dict[str, list[tuple[Paradigm, str]]]:
    """word -> the rows that have it, in order, with the value it states there (phrases are
    replacements only, never looked up)."""
    index: dict[str, list[tuple[Paradigm, str]]] = {}
    for row in rows:
        for value, word in row.words.items():
            if " " not in word and all(other is not row for other, _ in index.get(word, [])):
                index.setdefault(word, []).append((row, value))
    return index


_LOOKUP = _index(PARADIGMS)
CONTEXT_WORDS = frozenset({w for w, rows in _LOOKUP.items() if len({p.attribute for p, _ in rows}) > 1}
                          | AMBIGUOUS_WORDS)
"""Words edited only in a sentence about their attribute: low, normal, high (pitch, speed and
volume all have them) and `AMBIGUOUS_WORDS`."""

_TOKEN = re.compile(r"[A-Za-z]+(?:-[A-Za-z]+)*(?:['’][A-Za-z]+)?")
"""A word, hyphenated words as one ("high-pitched"), with an apostrophe ending ("man's", "isn't")."""
_SENTENCE_END = re.compile(r"[.!?;\n]")
_FIELD_COLON = re.compile(r"\s*:")
"""After a noun, a colon makes it a field name ("Pitch: Low"): it governs the word that follows."""
_QUOTED = re.compile(r"\"[^\"]*\"|“[^”]*”")
"""A quoted span: "..." or “...”."""


@dataclass(frozen=True)
class Fix:
    """One change made to a self-output."""
    attribute: str
    """The attribute (or `transcript`) it fixes."""
    before: str
    after: str
    how: str
    """`word` (a value word replaced), `negation` (a negation removed), `code` or `prompt` (transcript)."""

    def to_json(self) -> dict:
        return {"attribute": self.attribute, "from": self.before, "to": self.after, "how": self.how}


@dataclass
class _Token:
    start: int
    end: int
    """Span of the word without its apostrophe ending."""
    text: str
    """The whole token, ending included."""
    sentence: int
    protected: bool
    field: bool = False
    """A colon follows the word ("Pitch:")."""

    @property
    def stem(self) -> str:
        return self.text[: self.end - self.start].lower()


def word_edit_distance(a: str, b: str) -> int:
    """Word-level Levenshtein distance (words split on whitespace; a changed word, an added or a
    removed one counts 1)."""
    from rapidfuzz.distance import Levenshtein

    return Levenshtein.distance(a.split(), b.split())


def _protected_spans(text: str, transcript: str | None) -> list[tuple[int, int]]:
    spans = [m.span() for m in _QUOTED.finditer(text)]
    said = (transcript or "").strip().rstrip(".!?,;:").strip()
    if said:
        pattern = r"\s+".join(re.escape(w) for w in said.split())
        spans += [m.span() for m in re.finditer(pattern, text, re.IGNORECASE)]
    return spans


def _tokens(text: str, transcript: str | None) -> list[_Token]:
    spans = _protected_spans(text, transcript)
    ends = [m.start() for m in _SENTENCE_END.finditer(text)]
    out = []
    for m in _TOKEN.finditer(text):
        word = m.group()
        cut = max(word.find("'"), word.find("’"))
        stem_end = m.start() + (cut if cut > 0 and not word.lower().endswith(CONTRACTED_NEGATION) else len(word))
        sentence = sum(e < m.start() for e in ends)
        protected = any(a <= m.start() < b for a, b in spans)
        out.append(_Token(m.start(), stem_end, word, sentence, protected, bool(_FIELD_COLON.match(text, m.end()))))
    return out


def _cased(word: str, like: str) -> str:
    """`word` in the case of `like`: all capitals, a capital first letter, or as it is."""
    if len(like) > 1 and like.isupper():
        return word.upper()
    if like[:1].isupper():
        return word[:1].upper() + word[1:]
    return word


def _sentence(tokens: list[_Token], i: int) -> list[int]:
    return [j for j, t in enumerate(tokens) if t.sentence == tokens[i].sentence]


def _context(tokens: list[_Token], i: int, asked: str | None) -> str | None:
    """The attribute the sentence of token i is about: a field name just before it ("Pitch:
    Low"), else the nearest attribute noun in the sentence (a later one on a tie: "a low
    volume"), else the attribute the instruction asks about."""
    before = tokens[i - 1] if i > 0 else None
    if before is not None and before.field and before.stem in ATTRIBUTE_NOUNS:
        return ATTRIBUTE_NOUNS[before.stem]
    named = [(abs(j - i), -j, ATTRIBUTE_NOUNS[tokens[j].stem]) for j in _sentence(tokens, i)
             if tokens[j].stem in ATTRIBUTE_NOUNS]
    if named:
        return min(named)[2]
    return asked


def _reading(tokens: list[_Token], i: int, attrs: dict[str, str], asked: str | None) -> tuple[Paradigm, str] | None:
    """(row, value stated) of token i for a labelled attribute, or None when it states none here."""
    for paradigm, value in _LOOKUP.get(tokens[i].stem, ()):
        if attrs.get(paradigm.attribute) not in paradigm.words:
            continue
        if tokens[i].stem in CONTEXT_WORDS and _context(tokens, i, asked) != paradigm.attribute:
            continue
        return paradigm, value
    return None


def _lists_options(tokens: list[_Token], i: int, attribute: str) -> bool:
    """Whether token i's sentence joins two values of `attribute` with "or"."""
    same = _sentence(tokens, i)
    if not any(tokens[j].stem == OPTION_JOINER for j in same):
        return False
    values = {v for j in same for p, v in _LOOKUP.get(tokens[j].stem, ()) if p.attribute == attribute}
    return len(values) > 1


def _negator(tokens: list[_Token], i: int) -> int | None:
    """The index of a negation just before token i in its sentence, or None."""
    for j in range(i - 1, max(-1, i - 1 - NEGATION_WINDOW), -1):
        if tokens[j].sentence != tokens[i].sentence:
            break
        word = tokens[j].text.lower().replace("’", "'")
        if word in NEGATORS or word.endswith(CONTRACTED_NEGATION):
            return j
    return None


def _replacement(paradigm: Paradigm, right: str, tokens: list[_Token], i: int) -> str:
    word = paradigm.words[right]
    if tokens[i].stem == "her" and right == "male":
        nxt = tokens[i + 1] if i + 1 < len(tokens) and tokens[i + 1].sentence == tokens[i].sentence else None
        if nxt is None or nxt.stem in HER_OBJECT_NEXT:
            word = "him"
    return word


def fix_attributes(text: str, attrs: dict[str, str], instruction: str,
                   transcript: str | None = None) -> tuple[str, list[Fix]]:
    """`text` with every word that states a wrong value of a labelled attribute replaced (see the
    module docstring), and the fixes made; a right answer comes back byte-identical with none.
    `attrs` maps attribute -> the label's value (lower case, the attribute table's words)."""
    tokens = _tokens(text, transcript)
    asked = attribute_of(instruction)
    edits: dict[tuple[int, int], tuple[str, Fix]] = {}
    for i, tok in enumerate(tokens):
        if tok.protected:
            continue
        reading = _reading(tokens, i, attrs, asked)
        if reading is None:
            continue
        paradigm, value = reading
        attribute, right = paradigm.attribute, attrs[paradigm.attribute]
        if _lists_options(tokens, i, attribute):
            continue
        neg = _negator(tokens, i)
        original = text[tok.start: tok.end]
        if value == right and neg is not None and not tokens[neg].protected:
            n = tokens[neg]
            plain = UNNEGATED.get(n.text.lower().replace("’", "'"))
            if n.text.lower() in NEGATORS:
                end = n.start + len(n.text)
                end += text[end: end + 1] == " "
                edits[(n.start, end)] = ("", Fix(attribute, n.text, "", "negation"))
            elif plain is not None:
                edits[(n.start, n.start + len(n.text))] = (_cased(plain, n.text), Fix(attribute, n.text, plain,
                                                                                       "negation"))
        elif value != right and neg is None:
            new = _cased(_replacement(paradigm, right, tokens, i), original)
            edits[(tok.start, tok.end)] = (new, Fix(attribute, original, new, "word"))
    out = text
    for (start, end), (new, _) in sorted(edits.items(), reverse=True):
        out = out[:start] + new + out[end:]
    return out, [fix for _, (_, fix) in sorted(edits.items())]


def asks_transcript(instruction: str) -> bool:
    """Whether the instruction asks for the words spoken."""
    return attribute_of(instruction) == TRANSCRIPT


def contains_transcript(answer: str, transcript: str) -> bool:
    """Whether the answer holds the transcript's words in order, contiguously (after Whisper's
    English normalisation)."""
    from annotate.evaluate import normalize_text

    said = normalize_text(transcript).split()
    return bool(said) and f" {' '.join(said)} " in f" {normalize_text(answer)} "


def insert_transcript(text: str, transcript: str, finished: bool = True) -> tuple[str, Fix]:
    """The code fix of a missed transcript: the longest quoted span's content becomes the
    transcript; with nothing quoted, `The speaker says: "..."` is added after the answer (before
    it when the answer was cut, `finished=False`)."""
    said = transcript.strip()
    quoted = max(_QUOTED.finditer(text), key=lambda m: m.end() - m.start(), default=None)
    if quoted is not None:
        start, end = quoted.start() + 1, quoted.end() - 1
        return text[:start] + said + text[end:], Fix(TRANSCRIPT, text[start:end], said, "code")
    sentence = TRANSCRIPT_ANSWER.format(value=said)
    return (f"{text} {sentence}" if finished else f"{sentence} {text}"), Fix(TRANSCRIPT, "", sentence, "code")


MINIMAL_EDIT_PROMPT = ('Here is an answer to the question "{instruction}":\n\n{answer}\n\n'
                       'The speaker actually said: "{transcript}"\n'
                       "Correct the answer so that it gives exactly the words the speaker said. Change as little "
                       "as possible and keep everything else as it is.")
"""The minimal-edit request to the base LLM for a missed transcript (`targets.transcript_fix=prompt`)."""


def minimal_edit_prompt(instruction: str, answer: str, transcript: str) -> str:
    return MINIMAL_EDIT_PROMPT.format(instruction=instruction, answer=answer, transcript=transcript.strip())


def better_edit(original: str, prompted: str, coded: str, transcript: str) -> bool:
    """Whether the LLM's minimal edit is accepted over the code's: it contains the transcript and
    is no further from the original (in words) than the code's edit."""
    return contains_transcript(prompted, transcript) and (word_edit_distance(original, prompted)
                                                         <= word_edit_distance(original, coded))
