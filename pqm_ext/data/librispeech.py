"""LibriSpeech -> Kaldi data dirs for PQM: the LoRA pretraining pool, a dev set and LibriSpeech-SA.

Input (the real release, or the demo tree of pqm_ext.demo in the same layout)::

    LibriSpeech/SPEAKERS.TXT
    LibriSpeech/<subset>/<speaker>/<chapter>/<speaker>-<chapter>-<NNNN>.flac
    LibriSpeech/<subset>/<speaker>/<chapter>/<speaker>-<chapter>.trans.txt

Output under ``data_dir``: pretrain/ (``train-clean-100``), dev/ (``dev-clean``), and LibriSpeech-SA:
target speakers (readers) drawn from ``train-clean-360``, split into sa_adapt/ and sa_test/ as
described in pqm_ext.data.sa_split. wav.scp maps utterances to absolute flac paths; spk2gender comes
from SPEAKERS.TXT. A flac without a transcript line is skipped with a warning (as Kaldi's recipe does);
a transcript line without audio, an empty transcript or a repeated id is an error.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Dict, Optional, Tuple

from pqm_ext.data.kaldi_dir import DataDir, numbered_lines
from pqm_ext.data.sa_split import SplitOptions, check_prepared, corpus_stamp, make_sa_split, write_prepared
from pqm_ext.data.text import normalise_text
from pqm_ext.utils.errors import InputError

POOL_SUBSET = "train-clean-100"
DEV_SUBSET = "dev-clean"
SA_SUBSET = "train-clean-360"


def find_root(corpus: Path) -> Path:
    """The ``LibriSpeech`` directory: ``corpus`` itself or ``corpus/LibriSpeech``."""
    if not corpus.is_dir():
        raise InputError(corpus, "LibriSpeech corpus directory does not exist (set LIBRISPEECH in db.sh)")
    if (corpus / "LibriSpeech").is_dir():
        return corpus / "LibriSpeech"
    return corpus


def read_speakers_txt(root: Path) -> Dict[str, Tuple[str, str]]:
    """SPEAKERS.TXT as {speaker: (gender m|f, subset)}."""
    path = root / "SPEAKERS.TXT"
    if not path.is_file():
        raise InputError(path, "missing (LibriSpeech's speaker list): LIBRISPEECH must be the LibriSpeech "
                               "directory (holding SPEAKERS.TXT and train-clean-100/) or the one holding it")
    speakers = {}
    for n, line in numbered_lines(path):
        if not line.strip() or line.startswith(";"):
            continue
        fields = [x.strip() for x in line.split("|")]
        if len(fields) < 3 or fields[1].upper() not in ("M", "F"):
            raise InputError(path, "expected 'ID | SEX | SUBSET | MINUTES | NAME'", n)
        speakers[fields[0]] = (fields[1].lower(), fields[2])
    return speakers


def scan_subset(root: Path, subset: str, seen: Dict[str, Tuple[Path, int]]) -> DataDir:
    """Read one subset into a DataDir; ``seen`` (utt -> trans file, line) catches ids repeated anywhere."""
    subset_dir = root / subset
    if not subset_dir.is_dir():
        raise InputError(subset_dir, f"subset '{subset}' missing (expected {subset}/<speaker>/<chapter>/*.flac)")
    wav_scp, text, utt2spk = {}, {}, {}
    skipped = 0
    for spk_dir in sorted(p for p in subset_dir.iterdir() if p.is_dir()):
        spk = spk_dir.name
        for chapter_dir in sorted(p for p in spk_dir.iterdir() if p.is_dir()):
            prefix = f"{spk}-{chapter_dir.name}"
            trans = chapter_dir / f"{prefix}.trans.txt"
            flacs = {p.stem: p for p in chapter_dir.glob("*.flac")}
            if not trans.is_file():
                raise InputError(trans, "transcript file missing")
            id_pattern = re.compile(rf"^{re.escape(prefix)}-\d+$")
            listed = set()
            for n, line in numbered_lines(trans):
                parts = line.strip().split(maxsplit=1)
                if not parts:
                    continue
                utt = parts[0]
                if not id_pattern.match(utt):
                    raise InputError(trans, f"id '{utt}' does not match {prefix}-NNNN", n)
                if utt in seen:
                    first, first_line = seen[utt]
                    raise InputError(trans, f"duplicate utterance id '{utt}' (first in {first}:{first_line})", n)
                seen[utt] = (trans, n)
                words = normalise_text(parts[1]) if len(parts) > 1 else ""
                if not words:
                    raise InputError(trans, f"empty transcript for '{utt}'", n)
                if utt not in flacs:
                    raise InputError(trans, f"no audio for '{utt}' ({chapter_dir / (utt + '.flac')} missing)", n)
                wav_scp[utt] = str(flacs[utt].resolve())
                text[utt] = words
                utt2spk[utt] = spk
                listed.add(utt)
            skipped += len(set(flacs) - listed)
    if skipped:
        logging.warning("%s: %d flac files have no transcript and were skipped", subset_dir, skipped)
    if not utt2spk:
        raise InputError(subset_dir, f"subset '{subset}' has no utterances")
    logging.info("%s: %d utterances, %d speakers", subset_dir, len(utt2spk), len(set(utt2spk.values())))
    return DataDir(wav_scp=wav_scp, text=text, utt2spk=utt2spk)


def _with_gender(data: DataDir, speakers: Dict[str, Tuple[str, str]], subset_dir: Path) -> DataDir:
    unknown = sorted(set(data.utt2spk.values()) - set(speakers))
    if unknown:
        raise InputError(subset_dir / unknown[0], "speaker is not listed in SPEAKERS.TXT")
    data.spk2gender = {s: speakers[s][0] for s in data.speakers}
    return data


def prepare_librispeech_sa(corpus: Path, data_dir: Path, opts: SplitOptions, check_audio: str = "header",
                           overwrite: bool = False, pool_subset: str = POOL_SUBSET, dev_subset: str = DEV_SUBSET,
                           sa_subset: str = SA_SUBSET) -> Optional[Path]:
    """Prepare ``data_dir``; skip when it is complete with the same options. Returns the splits dir."""
    corpus = Path(corpus).absolute()
    extra = {"pool_subset": pool_subset, "dev_subset": dev_subset, "sa_subset": sa_subset}
    root = find_root(corpus)
    stamp = corpus_stamp(root, [pool_subset, dev_subset, sa_subset, "SPEAKERS.TXT"])
    if check_prepared(data_dir, str(corpus), opts, extra, overwrite, stamp):
        logging.info("%s is complete for these options: skipping", data_dir)
        return data_dir / "sa_splits"
    speakers = read_speakers_txt(root)
    seen: Dict[str, Tuple[Path, int]] = {}
    parts: Dict[str, DataDir] = {}
    for name, subset in (("pretrain", pool_subset), ("dev", dev_subset), ("sa_pool", sa_subset)):
        parts[name] = _with_gender(scan_subset(root, subset, seen), speakers, root / subset)
    adapt, test, splits, targets = make_sa_split(parts["sa_pool"], opts, str(root / sa_subset))
    overlap = sorted(set(targets) & set(parts["pretrain"].speakers))
    if overlap:
        raise InputError(root / sa_subset / overlap[0], f"target speaker is also in the pretraining pool {pool_subset}")
    logging.info("LibriSpeech-SA: %d target speakers from %s: %s", len(targets), sa_subset, " ".join(targets))
    dirs = {"pretrain": parts["pretrain"], "dev": parts["dev"], "sa_adapt": adapt, "sa_test": test}
    write_prepared(data_dir, dirs, splits, str(corpus), opts, extra, check_audio=check_audio, stamp=stamp)
    return data_dir / "sa_splits"
