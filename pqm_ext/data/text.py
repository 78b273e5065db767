"""Transcript normalisation shared by every corpus, so WERs are comparable across them.

The normal form is what LibriSpeech transcripts already look like: upper case, words made of the
letters A-Z and apostrophes only, separated by single spaces. Rules, in order:

* accented letters lose their accents (NFKD); a typographic apostrophe inside a word (``Tom’s``) becomes
  ``'``, typographic quotes are dropped;
* hyphens, dashes (``–``, ``—``), slashes and underscores separate words (``LONG-FORGOTTEN`` ->
  ``LONG FORGOTTEN``); other non-ASCII characters are then dropped;
* any other character that is not a letter or an apostrophe is removed;
* a word made only of apostrophes is dropped; apostrophes inside or at the edge of a word are kept
  (LibriSpeech has ``'TIS`` and ``BROTHERS'``).

TED-LIUM 3 transcripts are lower case, split contractions (``i 'm``) and carry markers; before the
rules above :func:`normalise_tedlium`

* removes pronunciation-variant markers ``(2)`` (``word(2)`` -> ``word``);
* joins a clitic (``'s 't 're 've 'll 'd 'm``, or a lone ``'``) to the token before (``i 'm`` -> ``I'M``), as Kaldi's
  ``join_suffix.py`` does; other tokens that start with an apostrophe (``'cause``, ``'em``) stay words;
* then removes ``<unk>`` and any other ``<...>`` token, and noise tokens in braces or brackets
  (``{NOISE}``, ``[laughter]``), with a clitic joined to them: ``the <unk> 's house`` is ``THE HOUSE``,
  not ``THE'S HOUSE``; a marker glued to a word goes and the word stays (``<unk>-based`` -> ``BASED``).

A teacher's pseudo-labels (Whisper's text) may hold annotations that no one said, ``(Laughter)``,
``[Music]``, ``♪``: :func:`drop_annotations` removes them before the rules above.

Digits are not letters: the normal form cannot spell ``co 2`` or ``100 percent``, so the corpus readers
leave such transcripts out (:func:`has_digits`) rather than silently drop the spoken number.
"""
from __future__ import annotations

import re
import unicodedata

TEDLIUM_IGNORE = "ignore_time_segment_in_scoring"

_SEPARATORS = re.compile(r"[-\u2010-\u2015\u2212_/]+")
# A backtick, or a typographic apostrophe inside a word (Tom’s): not ‘quotes’ around one, which are dropped
_APOSTROPHES = re.compile(r"`|(?<=[^\W\d_])[\u2019\u02bc](?=[^\W\d_])")
_NOT_ALLOWED = re.compile(r"[^A-Z'\s]+")
_MARKER = r"<[^>]*>|\{[^}]*\}|\[[^\]]*\]"
_CLITIC_TOKEN = r"'(s|t|re|ve|ll|d|m)?"  # a lone ' is a plural's possessive (soldiers ')
_CLITIC = re.compile(rf"^{_CLITIC_TOKEN}$", re.IGNORECASE)
_MARKER_WORD = re.compile(rf"^({_MARKER})({_CLITIC_TOKEN})?$", re.IGNORECASE)  # maybe with a joined clitic
_MARKER_ANYWHERE = re.compile(_MARKER)
_ANNOTATION = re.compile(r"\([^)]*\)|\[[^\]]*\]|[\u266a\u266b\u266c\u266f]")  # (Laughter), [Music], music notes
_VARIANT = re.compile(r"\(\d+\)")
_NORMALISED = re.compile(r"^[A-Z']+( [A-Z']+)*$")


def normalise_text(text: str) -> str:
    """Return ``text`` in the toolkit's normal form (may be empty)."""
    text = fold_accents(text)
    text = _APOSTROPHES.sub("'", text)
    text = _SEPARATORS.sub(" ", text)  # before non-ASCII is dropped: dashes must separate, not vanish
    text = text.encode("ascii", "ignore").decode("ascii").upper()
    text = _NOT_ALLOWED.sub("", text)
    return " ".join(w for w in text.split() if w.strip("'"))


def fold_accents(text: str) -> str:
    """``café`` -> ``cafe``: compatibility decomposition (NFKD) without the combining marks."""
    return "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c))


def normalise_tedlium(text: str) -> str:
    """Normalise a TED-LIUM stm transcript (markers removed, contractions joined)."""
    words: list = []
    for token in _VARIANT.sub("", text).split():
        if _CLITIC.match(token) and words:
            words[-1] += token
        else:
            words.append(token)
    return normalise_text(" ".join(_MARKER_ANYWHERE.sub(" ", w) for w in words if not _MARKER_WORD.match(w)))


def drop_annotations(text: str) -> str:
    """Remove what a subtitle-trained teacher writes besides words: ``(Laughter)``, ``[Music]``, ``♪``."""
    return _ANNOTATION.sub(" ", text)


def has_digits(text: str) -> bool:
    """Whether a transcript says a number with digits (pronunciation variants ``(2)`` aside)."""
    return any(c.isdigit() for c in _VARIANT.sub("", text))


def is_normalised(text: str) -> bool:
    """True when ``text`` is non-empty and already in the normal form."""
    return bool(_NORMALISED.match(text))
