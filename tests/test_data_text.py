"""Transcript normalisation (LibriSpeech and TED-LIUM) and the demo corpus's sentence pool."""
import pytest

from pqm_ext.data.text import drop_annotations, is_normalised, normalise_tedlium, normalise_text
from pqm_ext.demo.text import MAX_WORDS, MIN_WORDS, clean_sentence, load_sentences


@pytest.mark.parametrize("raw, expected", [
    ("CHAPTER ONE MISSUS RACHEL LYNDE IS SURPRISED", "CHAPTER ONE MISSUS RACHEL LYNDE IS SURPRISED"),
    ("'TIS THE SOLDIERS' DAY O'ER THE HILL", "'TIS THE SOLDIERS' DAY O'ER THE HILL"),
    ("Hello,   world! How's it going?", "HELLO WORLD HOW'S IT GOING"),
    ("A long-forgotten loved one -- will appear.", "A LONG FORGOTTEN LOVED ONE WILL APPEAR"),
    ("Café  naïve ' ''", "CAFE NAIVE"),
    ("and/or under_score", "AND OR UNDER SCORE"),
    ("A well\u2013known fact \u2014 na\u00efve\u2014really", "A WELL KNOWN FACT NAIVE REALLY"),  # en/em dashes
    ("Tom\u2019s `twas", "TOM'S 'TWAS"),  # a typographic apostrophe is an apostrophe ...
    ("\u2018Yes,\u2019 he said", "YES HE SAID"),  # ... typographic quotes are not
    ("", ""),
])
def test_normalise_text(raw, expected):
    assert normalise_text(raw) == expected


@pytest.mark.parametrize("raw, expected", [
    ("i 'm going to talk today about <unk> energy", "I'M GOING TO TALK TODAY ABOUT ENERGY"),
    ("it 's {NOISE} a rock(2) and roll [laughter] thing", "IT'S A ROCK AND ROLL THING"),
    ("we don 't know the soldiers ' names", "WE DON'T KNOW THE SOLDIERS' NAMES"),
    ("<unk> {BREATH}", ""),
    ("the <unk> 's house", "THE HOUSE"),     # a suffix joined to a marker goes with it
    ("<unk> 's not", "NOT"),
    ("it was 'cause of you get 'em", "IT WAS 'CAUSE OF YOU GET 'EM"),  # only clitics are joined
    ("<unk>-based design {NOISE}-ish", "BASED DESIGN ISH"),  # a marker glued to a word: the word stays
    ("<unk>'cause <unk> 'cause", "'CAUSE 'CAUSE"),  # ... also a word that starts with an apostrophe
])
def test_normalise_tedlium(raw, expected):
    assert normalise_tedlium(raw) == expected


def test_a_teachers_annotations_are_not_words():
    """Whisper, trained on subtitles, writes what no one said: it must not become a pseudo-label's words."""
    text = "So that was it. (Laughter) (Applause) \u266a [Music] thanks \u266b"
    assert normalise_text(drop_annotations(text)) == "SO THAT WAS IT THANKS"
    assert normalise_text(text) == "SO THAT WAS IT LAUGHTER APPLAUSE MUSIC THANKS"  # what it was before


def test_is_normalised():
    assert is_normalised("IT'S A TEST")
    for bad in ("", "it's", "TWO  SPACES", " LEADING", "DIGIT 1", "PUNCT."):
        assert not is_normalised(bad), bad


@pytest.mark.parametrize("raw", [
    "You have 3 new messages waiting for you.",         # digits
    "The USA is a big country with many states.",       # acronym, read letter by letter
    "Mr. Smith went to the market on a sunny day.",     # abbreviation
    "-- Mark Twain, a very famous American writer.",    # attribution
    "Q: What is the meaning of life and everything?",   # riddle marker kept in the middle below
    "Why is it? A: Because the answer is always late.",
    "He said 'hello' to all the people in the room.",   # quotes around words
    "Too short.",
    "one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty twentyone.",
    "An email is sent to x@y for the whole of the team.",  # odd characters
])
def test_clean_sentence_rejects(raw):
    if raw.startswith("Q: "):  # the marker is stripped, the question itself is fine
        assert clean_sentence(raw).transcript == "WHAT IS THE MEANING OF LIFE AND EVERYTHING"
    else:
        assert clean_sentence(raw) is None


def test_clean_sentence_keeps_speakable_text():
    s = clean_sentence('"You\'re ugly, and your mother dresses you funny."')
    assert s.spoken == "You're ugly, and your mother dresses you funny."
    assert s.transcript == "YOU'RE UGLY AND YOUR MOTHER DRESSES YOU FUNNY"


def test_sentence_pool_is_large_unique_and_seeded():
    a, b, c = load_sentences(seed=0), load_sentences(seed=0), load_sentences(seed=1)
    assert a == b and a != c and sorted(x.transcript for x in a) == sorted(x.transcript for x in c)
    assert len(a) >= 700
    transcripts = [x.transcript for x in a]
    assert len(set(transcripts)) == len(transcripts)
    for x in a:
        assert is_normalised(x.transcript) and MIN_WORDS <= len(x.transcript.split()) <= MAX_WORDS
        assert not any(ch.isdigit() for ch in x.spoken)
        assert normalise_text(x.spoken) == x.transcript
