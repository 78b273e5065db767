"""WER with jiwer after one documented normalisation, per speaker and pooled, with bootstrap CIs.

Normalisation (applied to references and hypotheses alike): accents folded (``café`` = ``CAFE``, as
the corpus readers write it); lower case; hyphens and dashes (``-``, ``–``, ``—``), slashes and
underscores become spaces, as they separate words in the corpora's normal form; other punctuation
removed (so "don't", "don’t" and "dont" match); whitespace collapsed. Whisper writes cased, punctuated
text and the corpora are upper case without punctuation: this makes them comparable without rewriting
words (no spelling or number normalisation: a hypothesis's digits stay, and count as errors).

That is fair between systems that write the corpus's normal form (a Conformer trained on it, and every
LoRA system, which learns it from its targets) but not to an unadapted Whisper, which writes ``Mrs.``,
``2008``, ``color`` and ``(Laughter)``: they would count as errors of orthography, and adaptation
would get the credit for learning the corpus's spelling. ``cleaner="whisper_en"`` therefore scores with
Whisper's own English normaliser instead, through ESPnet's ``TextCleaner`` (what ESPnet's Whisper recipes
give asr.sh as ``--cleaner``/``--hyp_cleaner``), on references and hypotheses alike (accents folded first):
numbers, titles, contractions and British spellings are put in one form, bracketed annotations and fillers
removed. It is Whisper's convention, not a perfect one: ``OK``/``OKAY`` still differ, ``OH`` becomes
``0`` on both sides (so "oh no" for "zero no" is no error), and a spelled-out number becomes one token, so
the reference word counts differ from the plain normalisation's: tables scored with different cleaners
are not comparable (results.json and score.json record which).

WER is pooled over words: total errors (substitutions + deletions + insertions) / reference words.
The 95% interval resamples utterances with replacement (1000 draws, fixed seed), as suggested for
small test sets. Two systems decoded on the same utterances are compared *paired*: both are resampled
with the same draws, so the utterances' own difficulty, shared by both, cancels: their separate
intervals can overlap widely while the paired interval of their difference excludes zero.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Sequence, Tuple

import jiwer
import numpy as np

from pqm_ext.data.text import fold_accents

NORMALIZE = jiwer.Compose([
    jiwer.ToLowerCase(),
    jiwer.SubstituteRegexes({r"[-\u2010-\u2015\u2212_/]+": " "}),
    jiwer.RemovePunctuation(),
    jiwer.RemoveMultipleSpaces(),
    jiwer.Strip(),
])


CLEANERS = ("none", "whisper_en", "whisper_basic")


def normalize(text: str) -> str:
    return NORMALIZE(fold_accents(text))


def normalizer(cleaner: str = "none") -> Callable[[str], str]:
    """The text normalisation that ``cleaner`` names: ``none`` is :func:`normalize`; ``whisper_en`` and
    ``whisper_basic`` are ESPnet's cleaners of those names (Whisper's English and basic normalisers)."""
    if cleaner not in CLEANERS:
        raise ValueError(f"unknown scoring cleaner {cleaner!r}: one of {', '.join(CLEANERS)}")
    if cleaner == "none":
        return normalize
    from espnet2.text.cleaner import TextCleaner

    whisper = TextCleaner([cleaner])
    if whisper.whisper_cleaner is None:  # ESPnet leaves it out, silently, without openai-whisper
        raise RuntimeError(f"scoring cleaner {cleaner!r} needs openai-whisper's normalisers (tools/install.sh)")
    return lambda text: " ".join(whisper(fold_accents(text)).split())


def cleaner_problem(cleaner: str) -> str:
    """Why ``cleaner`` cannot score here ("" when it can): checked before decoding, not after it."""
    try:
        normalizer(cleaner)
    except (ValueError, RuntimeError) as e:
        return str(e)
    return ""


def default_cleaner(model: str) -> str:
    """Whisper is scored with Whisper's normaliser (ESPnet's Whisper recipes do), other models plainly."""
    return "whisper_en" if model == "whisper" else "none"


@dataclass
class UttScore:
    utt: str
    errors: int
    ref_words: int
    sub: int
    dele: int
    ins: int


def score_utterances(refs: Dict[str, str], hyps: Dict[str, str], cleaner: str = "none") -> List[UttScore]:
    """Score every reference utterance; a missing hypothesis counts as empty (all deletions)."""
    norm = normalizer(cleaner)
    out = []
    for utt in sorted(refs):
        ref, hyp = norm(refs[utt]), norm(hyps.get(utt, ""))
        n_ref = len(ref.split())
        if not hyp:
            out.append(UttScore(utt, n_ref, n_ref, 0, n_ref, 0))
            continue
        if not ref:
            n_hyp = len(hyp.split())
            out.append(UttScore(utt, n_hyp, 0, 0, 0, n_hyp))
            continue
        o = jiwer.process_words(ref, hyp)
        out.append(UttScore(utt, o.substitutions + o.deletions + o.insertions, n_ref,
                            o.substitutions, o.deletions, o.insertions))
    return out


def pooled_wer(scores: Sequence[UttScore]) -> float:
    words = sum(s.ref_words for s in scores)
    return sum(s.errors for s in scores) / max(words, 1)


def bootstrap_ci(scores: Sequence[UttScore], draws: int = 1000, seed: int = 0) -> Tuple[float, float]:
    if not scores:
        return (0.0, 0.0)
    err, words = _arrays(scores)
    idx = np.random.default_rng(seed).integers(0, len(scores), size=(draws, len(scores)))
    wers = err[idx].sum(1) / np.maximum(words[idx].sum(1), 1)
    lo, hi = np.percentile(wers, [2.5, 97.5])
    return float(lo), float(hi)


def _arrays(scores: Sequence[UttScore]) -> Tuple[np.ndarray, np.ndarray]:
    return (np.array([s.errors for s in scores], dtype=float), np.array([s.ref_words for s in scores], dtype=float))


def paired_bootstrap(base: Sequence[UttScore], system: Sequence[UttScore], draws: int = 1000,
                     seed: int = 0) -> Dict:
    """How much ``system`` lowers ``base``'s WER on the same utterances, with a paired 95% interval.

    Returns the relative reduction (base - system) / base and its interval (over the resamples in which
    ``base`` makes an error; None when more than 2.5 % of them have none), the difference in WER points
    and its interval, and the share of resamples in which ``system`` has fewer errors.
    """
    if [s.utt for s in base] != [s.utt for s in system]:
        raise ValueError("paired_bootstrap: the two systems were not scored on the same utterances")
    if not base:
        raise ValueError("paired_bootstrap: no utterances")
    (eb, words), (es, _) = _arrays(base), _arrays(system)
    idx = np.random.default_rng(seed).integers(0, len(base), size=(draws, len(base)))
    n_words = np.maximum(words[idx].sum(1), 1)
    wb, ws = eb[idx].sum(1) / n_words, es[idx].sum(1) / n_words
    wer_b, wer_s = pooled_wer(base), pooled_wer(system)
    # A resample without a baseline error has no relative reduction (dividing by ~0 there gave bounds of
    # -1e11). Such draws are left out while they are few enough (2.5 %) not to decide a bound; with more,
    # only the difference in points has an interval.
    defined = wb > 0
    rel_ci = None
    if defined.mean() >= 0.975:
        rel_ci = [float(x) for x in np.percentile((wb[defined] - ws[defined]) / wb[defined], [2.5, 97.5])]
    return {
        "rel_reduction": (wer_b - wer_s) / wer_b if wer_b else 0.0,
        "rel_reduction_ci95": rel_ci,
        "wer_diff": wer_s - wer_b,
        "wer_diff_ci95": [float(x) for x in np.percentile(ws - wb, [2.5, 97.5])],
        "p_better": float(np.mean(es[idx].sum(1) < eb[idx].sum(1))),
    }


def summarize(scores: Sequence[UttScore], utt2spk: Dict[str, str]) -> Dict:
    by_spk: Dict[str, List[UttScore]] = {}
    for s in scores:
        by_spk.setdefault(utt2spk[s.utt], []).append(s)
    lo, hi = bootstrap_ci(scores)
    return {
        "wer": pooled_wer(scores),
        "ci95": [lo, hi],
        "errors": sum(s.errors for s in scores),
        "ref_words": sum(s.ref_words for s in scores),
        "utts": len(scores),
        "sub": sum(s.sub for s in scores), "del": sum(s.dele for s in scores), "ins": sum(s.ins for s in scores),
        "per_speaker": {spk: {"wer": pooled_wer(v), "errors": sum(s.errors for s in v),
                              "ref_words": sum(s.ref_words for s in v), "utts": len(v)}
                        for spk, v in sorted(by_spk.items())},
    }
