"""TED-LIUM 3 (legacy split) -> Kaldi data dirs for PQM: pretraining pool, dev set and the SA set.

Input (the real release, or the demo tree of pqm_ext.demo in the same layout)::

    TEDLIUM_release-3/legacy/{train,dev,test}/sph/<talk>.sph
    TEDLIUM_release-3/legacy/{train,dev,test}/stm/<talk>.stm

stm lines are ``<talk> <channel> <speaker> <start> <end> [<label>] <transcript>``; ``;;`` lines are
comments. The label is any ``<...>`` token in that place except the transcript markers ``<unk>`` and
``<sil>``: ``<o,f0,male>`` in most files, ``<NA>`` in TED-LIUM 3's train stms and ``<F0_M>``/``<F0_F>``
in the legacy dev set (spk2gender comes from them when every talk of a subset has one gender).
Speakers are talks; the ``<speaker>`` field names the person giving it, which matters because one person
may give several talks (below). A final ``(<utterance key>)`` token, which TED-LIUM's first release put
on its train lines, is removed as ESPnet's recipe removes it. Segments left out, each counted in the log:

* a transcript with ``ignore_time_segment_in_scoring`` among its tokens (Kaldi and ESPnet drop these too,
  before looking at anything else on the line: their times may be anything);
* a transcript with digits (``co 2``, ``100 percent``), which the normal form cannot spell (pqm_ext.data.text);
* a segment with no word left after normalisation (no transcript at all, or only ``<unk>``/noise markers).

Utterance ids follow Kaldi's TED-LIUM recipe: ``<talk>-<start in cs, 7 digits>-<end in cs, 7 digits>``.

Train segments (and test segments when they are SA candidates) are padded as Kaldi's and ESPnet's
TED-LIUM recipes pad them (``extend_segment_times.py``: 0.15 s before, 0.1 s after) because the
release's automatic alignments clip word onsets; padding stops halfway to a neighbouring segment, so
segments never overlap (a segment left out above is a neighbour too: its speech is in no one's
reference). Utterance ids keep the stm times. The demo corpus pads its own stm times and passes
``segment_padding=(0, 0)``.

SA talks are held out of the training talks: the ``num_target_speakers`` targets are drawn from
the legacy train talks with enough segments (pqm_ext.data.sa_split), and the pretraining pool is the
remaining train talks less every other talk by a target talk's speaker, so no target voice is in the
pool. The speaker is known two ways, and either one holds a talk out: the stm speaker field, and the name in
the talk id (``HansRosling_2006`` and ``HansRosling_2009G``: ``HansRosling``), because some stm files give
the talk id as the speaker. Segments whose transcript holds ``<unk>`` (often a real word the aligner did not
know) are not SA candidates: an adaptation or test reference must say every word that was spoken; they stay in the
pool with the marker removed. The legacy dev talks are the dev set. The legacy test talks (11 talks, about
100 segments each, too few for 100 adaptation + test segments) are not used unless
``sa_subsets`` includes "test", in which case they are candidates too.
"""
from __future__ import annotations

import logging
import re
from bisect import bisect_left
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Set, Tuple

from pqm_ext.data.kaldi_dir import DataDir, Segment, numbered_lines
from pqm_ext.data.sa_split import SplitOptions, check_prepared, corpus_stamp, make_sa_split, write_prepared
from pqm_ext.data.text import TEDLIUM_IGNORE, has_digits, normalise_tedlium
from pqm_ext.utils.errors import InputError

SUBSETS = ("train", "dev", "test")


def find_root(corpus: Path) -> Path:
    """The ``TEDLIUM_release-3`` directory: ``corpus`` itself or ``corpus/TEDLIUM_release-3``."""
    if not corpus.is_dir():
        raise InputError(corpus, "TED-LIUM 3 corpus directory does not exist (set TEDLIUM3 in db.sh)")
    if (corpus / "TEDLIUM_release-3").is_dir():
        return corpus / "TEDLIUM_release-3"
    return corpus


_TALK_YEAR = re.compile(r"_\d{4}[A-Za-z]*$")
_UTTERANCE_KEY = re.compile(r"\s*\([^()\s]*\)$")


def talk_person(talk: str) -> str:
    """The speaker's name in a TED talk id: ``HansRosling_2006`` -> ``HansRosling``."""
    return _TALK_YEAR.sub("", talk)


def utt_id(talk: str, start: float, end: float) -> str:
    return f"{talk}-{round(start * 100):07d}-{round(end * 100):07d}"


TRANSCRIPT_MARKERS = ("<unk>", "<sil>")  # <...> tokens that belong to the transcript, not the label


def _is_label(token: str) -> bool:
    return token.startswith("<") and token.endswith(">") and token.lower() not in TRANSCRIPT_MARKERS


def _gender(label: str) -> Optional[str]:
    """'m' or 'f' from an stm label (``<o,f0,male>``, dev's ``<F0_M>``); None when it says neither."""
    body = label.strip("<>").lower()
    if body in ("f0_m", "f0_f"):
        return body[-1]
    parts = body.split(",")
    return {"male": "m", "female": "f"}.get(parts[-1]) if len(parts) == 3 else None


@dataclass
class StmNotes:
    """What reading stm files learnt besides the data dir: the segments left out (counts), the
    utterances whose transcript had ``<unk>``, and who gives each talk (the stm speaker field)."""

    ignored: int = 0
    digits: int = 0
    empty: int = 0
    unk: Set[str] = field(default_factory=set)
    person: Dict[str, str] = field(default_factory=dict)
    dropped: Dict[str, List[Tuple[float, float]]] = field(default_factory=dict)  # talk -> spans left out

    def add(self, other: "StmNotes") -> None:
        """Take in another subset's notes."""
        self.ignored, self.digits, self.empty = (self.ignored + other.ignored, self.digits + other.digits,
                                                 self.empty + other.empty)
        self.unk |= other.unk
        self.person.update(other.person)
        self.dropped.update(other.dropped)

    def summary(self) -> str:
        return (f"dropped {self.ignored} ignore_time_segment_in_scoring, {self.digits} with digits, "
                f"{self.empty} without words")


def read_stm(stm: Path, sph: Path, seen: Dict[str, Tuple[Path, int]], data: DataDir, notes: StmNotes) -> None:
    """Add one talk's segments to ``data`` (and its gender to ``data.spk2gender`` when the labels agree
    on one); what was left out and who gives the talk go to ``notes``."""
    talk = stm.stem
    genders, people = set(), Counter()
    for n, line in numbered_lines(stm):
        if not line.strip() or line.startswith(";;"):
            continue
        fields = line.split(maxsplit=6)
        if len(fields) < 5:
            raise InputError(stm, "expected '<talk> <channel> <speaker> <start> <end> [<label>] <text>'", n)
        if TEDLIUM_IGNORE in line.lower().split()[5:]:
            notes.ignored += 1  # before the checks: Kaldi and ESPnet drop these lines first
            continue
        if fields[0] != talk:
            raise InputError(stm, f"recording '{fields[0]}' does not match the file name '{talk}'", n)
        try:
            start, end = float(fields[3]), float(fields[4])
        except ValueError:
            raise InputError(stm, "start and end must be numbers", n) from None
        if not 0 <= start < end:
            raise InputError(stm, f"bad times {start} {end} (need 0 <= start < end)", n)
        rest = " ".join(fields[5:]).split()
        label = rest.pop(0) if rest and _is_label(rest[0]) else ""
        transcript = _UTTERANCE_KEY.sub("", " ".join(rest))
        digits = has_digits(transcript)
        words = "" if digits else normalise_tedlium(transcript)
        if not words:
            if digits:
                notes.digits += 1
            else:
                notes.empty += 1
            notes.dropped.setdefault(talk, []).append((start, end))
            continue
        utt = utt_id(talk, start, end)
        if utt in seen:
            first, first_line = seen[utt]
            raise InputError(stm, f"duplicate utterance id '{utt}' (first in {first}:{first_line})", n)
        seen[utt] = (stm, n)
        genders.add(_gender(label))
        people[fields[2]] += 1
        if "<unk>" in transcript.lower():
            notes.unk.add(utt)
        data.text[utt] = words
        data.utt2spk[utt] = talk
        data.segments[utt] = Segment(talk, start, end)
    data.wav_scp[talk] = str(sph.resolve())
    if people:
        notes.person[talk] = people.most_common(1)[0][0]
    if len(genders) == 1 and None not in genders:
        data.spk2gender[talk] = genders.pop()


def scan_subset(root: Path, subset: str, seen: Dict[str, Tuple[Path, int]], notes: StmNotes) -> DataDir:
    """Read legacy/<subset>/{stm,sph} into a DataDir with segments."""
    base = root / "legacy" / subset
    for d in (base / "stm", base / "sph"):
        if not d.is_dir():
            raise InputError(d, f"subset '{subset}' missing (expected legacy/{subset}/sph and legacy/{subset}/stm)")
    data = DataDir(wav_scp={}, text={}, utt2spk={}, segments={}, spk2gender={})
    counts = StmNotes()
    stms = sorted(base.joinpath("stm").glob("*.stm"))
    for stm in stms:
        sph = base / "sph" / f"{stm.stem}.sph"
        if not sph.is_file():
            raise InputError(stm, f"no audio for this talk ({sph} missing)")
        read_stm(stm, sph, seen, data, counts)
    if not data.utt2spk:
        raise InputError(base / "stm", f"subset '{subset}' has no segments")
    if set(data.spk2gender) != set(data.utt2spk.values()):
        data.spk2gender = None  # spk2gender must cover every speaker or be absent
    logging.info("%s: %d talks, %d segments (%s; %d with <unk>)", base, len(stms), len(data.utt2spk),
                 counts.summary(), len(counts.unk))
    notes.add(counts)
    return data


def pad_segments(data: DataDir, before: float, after: float,
                 dropped: Optional[Dict[str, List[Tuple[float, float]]]] = None) -> None:
    """Widen every segment by ``before``/``after`` seconds, at most to the midpoint of the gap to its
    neighbour in the same recording and not below 0; a side that already overlaps another segment (or lies
    inside one) is left as it is. ``dropped``: per recording, the spans of segments left out of ``data``,
    which are neighbours too: their speech is in no reference."""
    if not (before or after):
        return
    by_rec: Dict[str, list] = {}
    for utt, seg in data.segments.items():
        by_rec.setdefault(seg.recording, []).append((seg.start, seg.end, utt))
    for rec, spans in (dropped or {}).items():
        if rec in by_rec:
            by_rec[rec] += [(start, end, "") for start, end in spans]
    for rec, segs in by_rec.items():
        segs.sort()
        starts = [s for s, _, _ in segs]
        latest_end = float("-inf")  # of the spans before k in start order
        for k, (start, end, utt) in enumerate(segs):
            earlier_end, latest_end = latest_end, max(latest_end, end)
            if not utt:
                continue
            lo, hi = max(0.0, start - before), end + after
            if earlier_end > start:  # an earlier span reaches into this one
                lo = start
            elif k > 0:
                lo = max(lo, (earlier_end + start) / 2)
            j = bisect_left(starts, end, lo=k + 1)  # spans k+1 .. j-1 start inside this one
            if earlier_end > end or any(e > end for _, e, _ in segs[k + 1:j]):
                hi = end
            elif j < len(segs):
                hi = min(hi, (end + segs[j][0]) / 2)
            data.segments[utt] = Segment(rec, round(lo, 3), round(hi, 3))


def _merge(parts: Sequence[DataDir]) -> DataDir:
    out = DataDir(wav_scp={}, text={}, utt2spk={}, segments={}, spk2gender={})
    for p in parts:
        out.wav_scp.update(p.wav_scp)
        out.text.update(p.text)
        out.utt2spk.update(p.utt2spk)
        out.segments.update(p.segments)
        if out.spk2gender is not None and p.spk2gender is not None:
            out.spk2gender.update(p.spk2gender)
        else:
            out.spk2gender = None
    return out


# 2: talks held out by the name in their id too, padding stops at segments left out, only clitics joined
READER_VERSION = 2
KALDI_PADDING = (0.15, 0.1)  # egs/tedlium/s5_r3/local/prepare_data.sh: extend_segment_times.py


def prepare_tedlium3_sa(corpus: Path, data_dir: Path, opts: SplitOptions, check_audio: str = "header",
                        overwrite: bool = False, sa_subsets: Sequence[str] = ("train",),
                        segment_padding: Tuple[float, float] = KALDI_PADDING) -> Optional[Path]:
    """Prepare ``data_dir``; skip when it is complete with the same options. Returns the splits dir."""
    bad = sorted(set(sa_subsets) - {"train", "test"})
    if bad or not sa_subsets:
        raise ValueError(f"sa_subsets must be a non-empty subset of train, test; got {list(sa_subsets)}")
    if len(segment_padding) != 2 or min(segment_padding) < 0:
        raise ValueError(f"segment_padding must be two seconds >= 0 (before, after); got {segment_padding}")
    corpus = Path(corpus).absolute()
    extra = {"sa_subsets": sorted(sa_subsets)}
    if any(segment_padding):  # recorded only when used: a preparation from before the option still matches
        extra["segment_padding"] = [float(x) for x in segment_padding]
    root = find_root(corpus)
    stamp = corpus_stamp(root, [f"legacy/{s}/{kind}" for s in SUBSETS if s in ("train", "dev") or s in sa_subsets
                                for kind in ("stm", "sph")])
    if check_prepared(data_dir, str(corpus), opts, extra, overwrite, stamp, READER_VERSION):
        logging.info("%s is complete for these options: skipping", data_dir)
        return data_dir / "sa_splits"
    seen: Dict[str, Tuple[Path, int]] = {}
    notes = StmNotes()
    subsets = {s: scan_subset(root, s, seen, notes) for s in SUBSETS if s in ("train", "dev") or s in sa_subsets}
    for name in subsets.keys() - {"dev"}:
        pad_segments(subsets[name], *segment_padding, dropped=notes.dropped)
    candidates = _merge([subsets[s] for s in sorted(sa_subsets)])
    candidates = candidates.subset(u for u in candidates.utt2spk if u not in notes.unk)
    source = str(root / "legacy" / "+".join(sorted(sa_subsets)))
    adapt, test, splits, targets = make_sa_split(candidates, opts, source)
    logging.info("TED-LIUM 3 SA: %d target talks: %s", len(targets), " ".join(targets))
    train = subsets["train"]
    target_people = {notes.person[t] for t in targets}
    target_names = {talk_person(t) for t in targets}
    held_out = {talk for talk in train.speakers if talk in targets or notes.person.get(talk) in target_people
                or talk_person(talk) in target_names}
    if held_out - set(targets):
        logging.info("also held out of the pretraining pool, given by the same speakers as a target talk: %s",
                     " ".join(sorted(held_out - set(targets))))
    pretrain = train.subset(u for u, spk in train.utt2spk.items() if spk not in held_out)
    dirs = {"pretrain": pretrain, "dev": subsets["dev"], "sa_adapt": adapt, "sa_test": test}
    write_prepared(data_dir, dirs, splits, str(corpus), opts, extra, check_audio=check_audio, stamp=stamp,
                   reader=READER_VERSION)
    return data_dir / "sa_splits"
