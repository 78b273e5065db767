"""Scoring: jiwer WER on real strings, and the paired bootstrap that compares two systems."""
from __future__ import annotations

import pytest

from pqm_ext.asr.results import comparisons
from pqm_ext.asr.score import bootstrap_ci, paired_bootstrap, pooled_wer, score_utterances

# Utterances of very different difficulty: the base gets 0-9 of each 10-word reference wrong.
REFS = {f"u{i:02d}": " ".join(f"w{j}" for j in range(10)) for i in range(30)}


def hyps_with_errors(errors_per_utt):
    """Hypotheses with the given number of substituted words per utterance (same order as REFS)."""
    out = {}
    for (utt, ref), k in zip(sorted(REFS.items()), errors_per_utt):
        words = ref.split()
        out[utt] = " ".join(["x"] * k + words[k:])
    return out


BASE = [i % 10 for i in range(30)]


def test_a_system_scored_against_itself_has_no_difference():
    base = score_utterances(REFS, hyps_with_errors(BASE))
    c = paired_bootstrap(base, base)
    assert c["rel_reduction"] == 0 and c["rel_reduction_ci95"] == [0, 0] and c["p_better"] == 0


def test_paired_interval_sees_a_small_consistent_gain_that_separate_intervals_hide():
    base = score_utterances(REFS, hyps_with_errors(BASE))
    better = score_utterances(REFS, hyps_with_errors([max(k - 1, 0) for k in BASE]))  # one error fewer where any
    assert pooled_wer(base) == pytest.approx(0.45) and pooled_wer(better) == pytest.approx(0.36)
    lo_base, _ = bootstrap_ci(base)
    _, hi_better = bootstrap_ci(better)
    assert hi_better > lo_base  # the two unpaired intervals overlap ...
    c = paired_bootstrap(base, better)
    assert c["rel_reduction"] == pytest.approx(0.2)
    assert 0.1 < c["rel_reduction_ci95"][0] <= 0.2 <= c["rel_reduction_ci95"][1]  # ... the paired one excludes 0
    assert c["wer_diff"] == pytest.approx(-0.09) and c["wer_diff_ci95"][1] < 0
    assert c["p_better"] == 1.0


def test_whisper_style_text_is_scored_against_the_corpus_normal_form():
    """Cased, punctuated output with dashes, accents and a typographic apostrophe is right word for word."""
    refs = {"a": "THE CAFE WAS NAIVE REALLY", "b": "TOM'S WELL KNOWN FRIEND AND OR HER", "c": "FIVE PERCENT"}
    hyps = {"a": "The caf\u00e9 was na\u00efve\u2014really.", "b": "Tom\u2019s well\u2013known friend, and/or her!",
            "c": "5%"}
    scores = {s.utt: s for s in score_utterances(refs, hyps)}
    assert scores["a"].errors == 0 and scores["b"].errors == 0
    assert (scores["c"].sub, scores["c"].dele) == (1, 1)  # digits are not rewritten: "5" is a wrong word


def test_whisper_cleaner_scores_an_unadapted_whispers_orthography_as_right():
    """Titles, numbers, British spellings and (Laughter), as Whisper writes them, against the corpus's normal
    form: errors with the toolkit's normalisation, none with ESPnet's whisper_en cleaner on both sides."""
    refs = {"a": "MISTER SMITH SAID IT WAS FIFTY PERCENT", "b": "WE DON'T KNOW WHAT COLOUR IT IS"}
    hyps = {"a": "Mr. Smith said it was 50%.", "b": "We don't know what color it is. (Laughter)"}
    plain = {s.utt: s.errors for s in score_utterances(refs, hyps)}
    whisper = {s.utt: s.errors for s in score_utterances(refs, hyps, cleaner="whisper_en")}
    assert plain["a"] == 3 and plain["b"] == 2
    assert whisper == {"a": 0, "b": 0}
    assert [s.errors for s in score_utterances({"a": "A CAT"}, {"a": "a dog"}, cleaner="whisper_en")] == [1]
    with pytest.raises(ValueError, match="unknown scoring cleaner"):
        score_utterances(refs, hyps, cleaner="tacotron")


def test_paired_bootstrap_has_no_relative_interval_where_the_baseline_can_have_no_error():
    refs = {f"u{i}": "a b c d" for i in range(10)}
    base = score_utterances(refs, {**{u: "a b c d" for u in refs}, "u0": "a b c x"})
    system = score_utterances(refs, {**{u: "a b c d" for u in refs}, "u1": "a b c x"})
    c = paired_bootstrap(base, system)
    assert c["rel_reduction"] == 0.0 and c["rel_reduction_ci95"] is None  # was about -7.5e10 to 1
    lo, hi = c["wer_diff_ci95"]
    assert -0.1 <= lo <= 0 <= hi <= 0.1


def test_paired_bootstrap_refuses_systems_scored_on_different_utterances():
    base = score_utterances(REFS, hyps_with_errors(BASE))
    with pytest.raises(ValueError, match="not scored on the same utterances"):
        paired_bootstrap(base, base[1:])


def test_comparisons_pair_what_the_paper_claims_where_both_sides_exist():
    keys = [("fp", None), ("nf4", None), ("int4", None), ("lora_scratch", 5), ("pqm", 5), ("pqm", 10),
            ("pqm_semi", 10)]
    assert comparisons(keys, "nf4") == [(("nf4", None), ("fp", None)), (("pqm", 5), ("lora_scratch", 5)),
                                        (("pqm_semi", 10), ("pqm", 10))]
    assert comparisons([("fp", None), ("pqm", 5)], "nf4") == []
