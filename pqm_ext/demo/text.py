"""Sentences for the demo corpus, from offline text (Debian's fortunes-min by default).

A fortune is split into sentences; a sentence is kept only when a TTS voice will say exactly its
normalised transcript: 5-20 words, no digits, no abbreviations or acronyms (``Mr.``, ``USA`` would be
read differently from how they are written), no quotes around words, only common punctuation.
Sentences are de-duplicated on their normalised transcript and put in a fixed order (sorted, then
shuffled with the seed), so the pool depends only on the source files and the seed.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import List, Sequence, Union

from pqm_ext.data.text import normalise_text

FORTUNES_MIN = ("/usr/share/games/fortunes/fortunes", "/usr/share/games/fortunes/literature",
                "/usr/share/games/fortunes/riddles")
# Every database of Debian's fortunes and fortunes-min (ascii-art aside): ~13k usable sentences, enough
# text variety for the pretraining pool a Conformer base is trained on.
FORTUNES_ALL = tuple(f"/usr/share/games/fortunes/{name}" for name in (
    "art", "computers", "cookie", "debian", "definitions", "disclaimer", "drugs", "education",
    "ethnic", "food", "fortunes", "goedel", "humorists", "kids", "knghtbrd", "law",
    "linux", "linuxcookie", "literature", "love", "magic", "medicine", "men-women", "miscellaneous",
    "news", "paradoxum", "people", "perl", "pets", "platitudes", "politics", "pratchett",
    "riddles", "science", "songs-poems", "sports", "startrek", "tao", "translate-me", "wisdom",
    "work", "zippy",
))
MIN_WORDS, MAX_WORDS = 5, 20

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_ALLOWED = re.compile(r"^[A-Za-z][A-Za-z ,.;:!?'-]*$")
_ACRONYM = re.compile(r"\b[A-Z]{2,}")
_QA_MARK = re.compile(r"\b[A-Z]:")
_EDGE_QUOTE = re.compile(r"(^|\s)'|'(\s|[,.;:!?]|$)")


@dataclass(frozen=True)
class Sentence:
    spoken: str      # what the TTS voice reads (punctuation kept for prosody)
    transcript: str  # normalised reference


def clean_sentence(raw: str) -> Union[Sentence, None]:
    """A usable Sentence, or None when the text would not be read as written."""
    s = re.sub(r"\s+", " ", raw.replace('"', " ")).strip()
    s = re.sub(r"^(Q|A):\s*", "", s)
    if not s or s.startswith("-") or not _ALLOWED.match(s):
        return None
    if _ACRONYM.search(s) or _QA_MARK.search(s) or _EDGE_QUOTE.search(s) or "." in s[:-1] or "--" in s:
        return None
    if re.search(r"[!?]", s[:-1]) or re.search(r"(^| )[^A-Za-z' ]+( |$)", s):
        return None  # inner ?/! or bare punctuation tokens: TTS engines mis-read or reject them
    if s[-1] not in ".!?":
        return None
    words = normalise_text(s).split()
    if not MIN_WORDS <= len(words) <= MAX_WORDS:
        return None
    return Sentence(spoken=s, transcript=" ".join(words))


def read_fortunes(path: Union[str, Path]) -> List[str]:
    """The entries of a fortune file (separated by ``%`` lines), whitespace-joined."""
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    return [" ".join(entry.split()) for entry in re.split(r"^%\s*$", text, flags=re.M) if entry.strip()]


def load_sentences(paths: Sequence[Union[str, Path]] = FORTUNES_MIN, seed: int = 0) -> List[Sentence]:
    """All usable sentences of ``paths``, unique by transcript, in an order fixed by ``seed``."""
    by_transcript = {}
    for path in paths:
        if not Path(path).is_file():
            raise FileNotFoundError(f"{path}: text source missing (install Debian's fortunes and fortunes-min: "
                                    "tools/install.sh)")
        for entry in read_fortunes(path):
            for raw in _SENTENCE_END.split(entry):
                sentence = clean_sentence(raw)
                if sentence is not None:
                    by_transcript.setdefault(sentence.transcript, sentence)
    sentences = [by_transcript[t] for t in sorted(by_transcript)]
    random.Random(seed).shuffle(sentences)
    return sentences
