"""TED-LIUM 3 (legacy split) -> Kaldi data dirs for PQM: pretraining pool, dev set and the SA set.

Input (the real release, or the demo tree of pqm_ext.demo in the same layout)::

    TEDLIUM_release-3/legacy/{train,dev,test}/sph/<talk>.sph
    TEDLIUM_release-3/legacy/{train,dev,test}/stm/<talk>.stm

stm lines are ``<talk> <channel> <speaker> <start> <end> [<label>] <transcript>``; ``;;`` lines are
comments. Speakers are talks. Segments whose transcript is ``ignore_time_segment_in_scoring`` are
dropped, as are segments left with no word after normalisation (only ``<unk>`` or noise markers);
a segment with no transcript at all is an error. spk2gender comes from the stm labels
(``<o,f0,male>``) when every talk of a subset has one gender. Utterance ids follow Kaldi's TED-LIUM recipe:
``<talk>-<start in cs, 7 digits>-<end in cs, 7 digits>``.

SA talks are held out of the training talks: the ``num_target_speakers`` targets are drawn from
the legacy train talks with enough segments (pqm_ext.data.sa_split), and the pretraining pool is the
remaining train talks. The legacy dev talks are the dev set. The legacy test talks (11 talks, about
100 segments each, too few for 100 adaptation + test segments) are not used unless
``sa_subsets`` includes "test", in which case they are candidates too.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

from pqm_ext.data.kaldi_dir import DataDir, Segment
from pqm_ext.data.sa_split import SplitOptions, check_prepared, corpus_stamp, make_sa_split, write_prepared
from pqm_ext.data.text import TEDLIUM_IGNORE, normalise_tedlium
from pqm_ext.utils.errors import InputError

SUBSETS = ("train", "dev", "test")


def find_root(corpus: Path) -> Path:
    """The ``TEDLIUM_release-3`` directory: ``corpus`` itself or ``corpus/TEDLIUM_release-3``."""
    if not corpus.is_dir():
        raise InputError(corpus, "TED-LIUM 3 corpus directory does not exist (set TEDLIUM3 in db.sh)")
    if (corpus / "TEDLIUM_release-3").is_dir():
        return corpus / "TEDLIUM_release-3"
    return corpus


def utt_id(talk: str, start: float, end: float) -> str:
    return f"{talk}-{round(start * 100):07d}-{round(end * 100):07d}"


def _gender(label: str) -> Optional[str]:
    """'m' or 'f' from an stm label such as ``<o,f0,male>``; None when it says neither."""
    parts = label.strip("<>").split(",")
    return {"male": "m", "female": "f"}.get(parts[-1]) if len(parts) == 3 else None


def read_stm(stm: Path, sph: Path, seen: Dict[str, Tuple[Path, int]], data: DataDir) -> Tuple[int, int]:
    """Add one talk's segments to ``data`` (and its gender to ``data.spk2gender`` when the labels agree on
    one); returns the (ignored, empty after normalisation) segment counts."""
    talk = stm.stem
    ignored = empty = 0
    genders = set()
    with open(stm, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip() or line.startswith(";;"):
                continue
            fields = line.split(maxsplit=6)
            if len(fields) < 5:
                raise InputError(stm, "expected '<talk> <channel> <speaker> <start> <end> [<label>] <text>'", n)
            if fields[0] != talk:
                raise InputError(stm, f"recording '{fields[0]}' does not match the file name '{talk}'", n)
            try:
                start, end = float(fields[3]), float(fields[4])
            except ValueError:
                raise InputError(stm, "start and end must be numbers", n) from None
            if not 0 <= start < end:
                raise InputError(stm, f"bad times {start} {end} (need 0 <= start < end)", n)
            rest = fields[5:]
            if rest and rest[0].startswith("<") and rest[0].endswith(">") and "," in rest[0]:
                label, rest = rest[0], rest[1:]
            else:
                label = ""
            transcript = " ".join(rest).strip()
            if not transcript:
                raise InputError(stm, "empty transcript", n)
            if transcript == TEDLIUM_IGNORE:
                ignored += 1
                continue
            words = normalise_tedlium(transcript)
            if not words:
                empty += 1
                continue
            utt = utt_id(talk, start, end)
            if utt in seen:
                first, first_line = seen[utt]
                raise InputError(stm, f"duplicate utterance id '{utt}' (first in {first}:{first_line})", n)
            seen[utt] = (stm, n)
            genders.add(_gender(label))
            data.text[utt] = words
            data.utt2spk[utt] = talk
            data.segments[utt] = Segment(talk, start, end)
    data.wav_scp[talk] = str(sph.resolve())
    if len(genders) == 1 and None not in genders:
        data.spk2gender[talk] = genders.pop()
    return ignored, empty


def scan_subset(root: Path, subset: str, seen: Dict[str, Tuple[Path, int]]) -> DataDir:
    """Read legacy/<subset>/{stm,sph} into a DataDir with segments."""
    base = root / "legacy" / subset
    for d in (base / "stm", base / "sph"):
        if not d.is_dir():
            raise InputError(d, f"subset '{subset}' missing (expected legacy/{subset}/sph and legacy/{subset}/stm)")
    data = DataDir(wav_scp={}, text={}, utt2spk={}, segments={}, spk2gender={})
    ignored = empty = 0
    stms = sorted(base.joinpath("stm").glob("*.stm"))
    for stm in stms:
        sph = base / "sph" / f"{stm.stem}.sph"
        if not sph.is_file():
            raise InputError(stm, f"no audio for this talk ({sph} missing)")
        i, e = read_stm(stm, sph, seen, data)
        ignored, empty = ignored + i, empty + e
    if not data.utt2spk:
        raise InputError(base / "stm", f"subset '{subset}' has no segments")
    if set(data.spk2gender) != set(data.utt2spk.values()):
        data.spk2gender = None  # spk2gender must cover every speaker or be absent
    logging.info("%s: %d talks, %d segments (dropped %d ignore_time_segment_in_scoring, %d without words)",
                 base, len(stms), len(data.utt2spk), ignored, empty)
    return data


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


def prepare_tedlium3_sa(corpus: Path, data_dir: Path, opts: SplitOptions, check_audio: str = "header",
                        overwrite: bool = False, sa_subsets: Sequence[str] = ("train",)) -> Optional[Path]:
    """Prepare ``data_dir``; skip when it is complete with the same options. Returns the splits dir."""
    bad = sorted(set(sa_subsets) - {"train", "test"})
    if bad or not sa_subsets:
        raise ValueError(f"sa_subsets must be a non-empty subset of train, test; got {list(sa_subsets)}")
    corpus = Path(corpus).absolute()
    extra = {"sa_subsets": sorted(sa_subsets)}
    root = find_root(corpus)
    stamp = corpus_stamp(root)
    if check_prepared(data_dir, str(corpus), opts, extra, overwrite, stamp):
        logging.info("%s is complete for these options: skipping", data_dir)
        return data_dir / "sa_splits"
    seen: Dict[str, Tuple[Path, int]] = {}
    subsets = {s: scan_subset(root, s, seen) for s in SUBSETS if s in ("train", "dev") or s in sa_subsets}
    candidates = _merge([subsets[s] for s in sorted(sa_subsets)])
    source = str(root / "legacy" / "+".join(sorted(sa_subsets)))
    adapt, test, splits, targets = make_sa_split(candidates, opts, source)
    logging.info("TED-LIUM 3 SA: %d target talks: %s", len(targets), " ".join(targets))
    train = subsets["train"]
    held_out = set(targets)
    pretrain = train.subset(u for u, spk in train.utt2spk.items() if spk not in held_out)
    dirs = {"pretrain": pretrain, "dev": subsets["dev"], "sa_adapt": adapt, "sa_test": test}
    write_prepared(data_dir, dirs, splits, str(corpus), opts, extra, check_audio=check_audio, stamp=stamp)
    return data_dir / "sa_splits"
