"""Transcript normalisation shared by every corpus, so WERs are comparable across them.

The normal form is what LibriSpeech transcripts already look like: upper case, words made of the
letters A-Z and apostrophes only, separated by single spaces. Rules, in order:

* accented letters lose their accents (NFKD), other non-ASCII characters are dropped;
* hyphens, dashes, slashes and underscores separate words (``LONG-FORGOTTEN`` -> ``LONG FORGOTTEN``);
* any other character that is not a letter or an apostrophe is removed;
* a word made only of apostrophes is dropped; apostrophes inside or at the edge of a word are kept
  (LibriSpeech has ``'TIS`` and ``BROTHERS'``).

TED-LIUM 3 transcripts are lower case, split contractions (``i 'm``) and carry markers; before the
rules above :func:`normalise_tedlium` removes

* ``<unk>`` and any other ``<...>`` token, and noise tokens in braces or brackets (``{NOISE}``, ``[laughter]``);
* pronunciation-variant markers ``(2)`` (``word(2)`` -> ``word``);
* the space before a token that starts with an apostrophe (``i 'm`` -> ``I'M``, ``it 's`` -> ``IT'S``).
"""
from __future__ import annotations

import re
import unicodedata

TEDLIUM_IGNORE = "ignore_time_segment_in_scoring"

_SEPARATORS = re.compile(r"[-\u2010-\u2015_/]+")
_NOT_ALLOWED = re.compile(r"[^A-Z'\s]+")
_MARKER_TOKEN = re.compile(r"^(<[^>]*>|\{[^}]*\}|\[[^\]]*\])$")
_VARIANT = re.compile(r"\(\d+\)")
_NORMALISED = re.compile(r"^[A-Z']+( [A-Z']+)*$")


def normalise_text(text: str) -> str:
    """Return ``text`` in the toolkit's normal form (may be empty)."""
    text = unicodedata.normalize("NFKD", text)
    text = text.encode("ascii", "ignore").decode("ascii").upper()
    text = text.replace("`", "'")
    text = _SEPARATORS.sub(" ", text)
    text = _NOT_ALLOWED.sub("", text)
    return " ".join(w for w in text.split() if w.strip("'"))


def normalise_tedlium(text: str) -> str:
    """Normalise a TED-LIUM stm transcript (markers removed, contractions joined)."""
    words = []
    for token in _VARIANT.sub("", text).split():
        if _MARKER_TOKEN.match(token):
            continue
        if token.startswith("'") and words:
            words[-1] += token
        else:
            words.append(token)
    return normalise_text(" ".join(words))


def is_normalised(text: str) -> bool:
    """True when ``text`` is non-empty and already in the normal form."""
    return bool(_NORMALISED.match(text))
