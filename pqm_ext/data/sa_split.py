"""Speaker-adaptation (SA) split shared by the corpora, and the all-or-nothing write of a prepared corpus.

Target speakers: the ``num_target_speakers`` drawn with ``random.Random(seed)`` from the candidate
speakers that have at least ``num_test + min_adapt`` utterances (or an explicit list, where a listed
speaker with fewer utterances is an error). Each target's utterances, sorted by id, are shuffled with
``random.Random(f"{seed}-{speaker}")``: the first ``num_test`` form the test set and the next (at most
``max_adapt``) form the adaptation pool, in that shuffled order, so the first N lines of
``sa_splits/<spk>.adapt`` are the N-utterance adaptation set and smaller sets are nested in larger ones.

Outputs under ``data_dir`` (see the recipes' local/data.sh): pretrain/, dev/, sa_adapt/, sa_test/ and
sa_splits/ (``<spk>.adapt``, ``<spk>.test`` and ``prepare.yaml`` with the options and counts). All of
them are written into a temporary directory, validated, and then renamed into place; ``prepare.yaml``
is renamed last and marks the whole set complete.
"""
from __future__ import annotations

import logging
import os
import random
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import yaml

from pqm_ext.data.kaldi_dir import DataDir, check_audio_files, validate_data_dir
from pqm_ext.utils.errors import InputError

OUTPUT_DIRS = ("pretrain", "dev", "sa_adapt", "sa_test")
SPLITS_DIR = "sa_splits"
MARKER = "prepare.yaml"


@dataclass(frozen=True)
class SplitOptions:
    num_target_speakers: int = 20
    max_adapt: int = 100
    num_test: int = 20
    min_adapt: Optional[int] = None  # None: max_adapt
    seed: int = 0
    target_speakers: Optional[Tuple[str, ...]] = None

    def __post_init__(self):
        if self.num_target_speakers < 1 or self.max_adapt < 1 or self.num_test < 1:
            raise ValueError("num_target_speakers, max_adapt and num_test must be positive")
        if self.min_adapt is not None and not 1 <= self.min_adapt <= self.max_adapt:
            raise ValueError(f"min_adapt must be in [1, max_adapt={self.max_adapt}], not {self.min_adapt}")

    @property
    def required(self) -> int:
        """Utterances a target speaker needs."""
        return self.num_test + (self.max_adapt if self.min_adapt is None else self.min_adapt)


def choose_targets(spk2utts: Dict[str, List[str]], opts: SplitOptions, source: str) -> List[str]:
    """The target speakers (sorted); ``source`` names the candidates' origin in messages."""
    need = opts.required
    if opts.target_speakers:
        for spk in opts.target_speakers:
            if spk not in spk2utts:
                raise InputError(source, f"target speaker '{spk}' not found")
            if len(spk2utts[spk]) < need:
                raise InputError(source, f"target speaker '{spk}' has {len(spk2utts[spk])} utterances, fewer than "
                                         f"requested: {need} (num_test {opts.num_test} + min_adapt "
                                         f"{need - opts.num_test})")
        return sorted(opts.target_speakers)
    eligible = sorted(s for s, us in spk2utts.items() if len(us) >= need)
    if len(eligible) < opts.num_target_speakers:
        counts = sorted(len(us) for us in spk2utts.values())
        raise InputError(source, f"only {len(eligible)} of {len(spk2utts)} speakers have at least {need} "
                                 f"utterances (num_test {opts.num_test} + min_adapt {need - opts.num_test}), "
                                 f"fewer than the {opts.num_target_speakers} target speakers requested "
                                 f"(utterances per speaker: min {counts[0] if counts else 0}, "
                                 f"max {counts[-1] if counts else 0})")
    if len(eligible) < len(spk2utts):
        logging.info("%s: %d of %d speakers have >= %d utterances and can be targets", source, len(eligible),
                     len(spk2utts), need)
    return sorted(random.Random(opts.seed).sample(eligible, opts.num_target_speakers))


def split_speaker(spk: str, utts: Sequence[str], opts: SplitOptions) -> Tuple[List[str], List[str]]:
    """(adaptation pool in the order the recipe takes it, sorted test set) for one speaker."""
    order = sorted(utts)
    random.Random(f"{opts.seed}-{spk}").shuffle(order)
    test = sorted(order[:opts.num_test])
    adapt = order[opts.num_test:opts.num_test + opts.max_adapt]
    return adapt, test


def make_sa_split(pool: DataDir, opts: SplitOptions, source: str
                  ) -> Tuple[DataDir, DataDir, Dict[str, Tuple[List[str], List[str]]], List[str]]:
    """Choose targets in ``pool`` and split them: (sa_adapt, sa_test, {spk: (adapt, test)}, targets)."""
    targets = choose_targets(pool.spk2utt(), opts, source)
    spk2utt = pool.spk2utt()
    splits = {spk: split_speaker(spk, spk2utt[spk], opts) for spk in targets}
    adapt = pool.subset(u for a, _ in splits.values() for u in a)
    test = pool.subset(u for _, t in splits.values() for u in t)
    return adapt, test, splits, targets


def _options_record(corpus: str, opts: SplitOptions, extra: dict) -> dict:
    record = {"corpus": corpus, **asdict(opts), **extra}
    if record["target_speakers"] is not None:
        record["target_speakers"] = list(record["target_speakers"])
    return record


def corpus_stamp(root: Path, parts: Sequence[str]) -> str:
    """Identity of the parts of the corpus that preparation reads (their inodes and status-change times, which
    copies and renames cannot preserve): a corpus re-created in the same place, such as a re-synthesised demo
    corpus, gets a new stamp and its data dirs are prepared again. Not the root's: another subset untarred
    beside these, or a chmod of the root, changed its status and re-scanned every file of a real corpus."""
    stamps = []
    for part in parts:
        if not (root / part).exists():  # the reader then says what is missing
            stamps.append("-")
            continue
        st = (root / part).stat()
        stamps.append(f"{st.st_ino}:{st.st_ctime_ns}")
    return ",".join(stamps)


def check_prepared(data_dir: Path, corpus: str, opts: SplitOptions, extra: dict, overwrite: bool,
                   stamp: str = "", reader: int = 1) -> bool:
    """True when ``data_dir`` already holds a complete preparation made with the same options from the
    same corpus directory (``stamp``) by the same version of the corpus reader (``reader``: raised when a
    fix changes what the reader writes, so existing data dirs are prepared again); other options are an
    error unless ``overwrite``."""
    marker = data_dir / SPLITS_DIR / MARKER
    if not marker.is_file():
        return False
    with open(marker, encoding="utf-8") as f:
        record = yaml.safe_load(f) or {}
    previous = record.get("options")
    wanted = _options_record(corpus, opts, extra)
    if previous == wanted:
        missing = [name for name in OUTPUT_DIRS if not (data_dir / name / "text").is_file()]
        if record.get("reader", 1) != reader:
            logging.info("%s was prepared by version %s of the corpus reader, this is version %d (fixes since: "
                         "git log pqm_ext/data): preparing again", data_dir, record.get("reader", 1), reader)
            return False
        if record.get("corpus_stamp") == stamp and not missing:
            return True
        if missing:
            logging.info("%s: %s missing: preparing again", data_dir, ", ".join(missing))
            return False
        logging.info("%s: the corpus directory was re-created since %s was prepared: preparing again",
                     corpus, data_dir)
        return False
    if overwrite:
        return False
    changed = sorted(k for k in set(wanted) | set(previous or {}) if (previous or {}).get(k) != wanted.get(k))
    raise InputError(marker, f"{data_dir} was prepared with other options ({', '.join(changed)} differ); "
                             f"remove it, prepare into another directory (--data_dir; pqm.sh/run.sh: --datadir, with "
                             f"--dumpdir for stage 2's copies) or pass --overwrite true (local/data.sh; from run.sh: "
                             f"--data_opts \"<the sizes> --overwrite true\", which replaces run.sh's sizes)")


def write_prepared(data_dir: Path, dirs: Dict[str, DataDir], splits: Dict[str, Tuple[List[str], List[str]]],
                   corpus: str, opts: SplitOptions, extra: dict, check_audio: str = "header",
                   stamp: str = "", reader: int = 1) -> None:
    """Write and validate everything in a temporary dir, then rename it into ``data_dir``."""
    for name in OUTPUT_DIRS:
        if not dirs[name].utt2spk:
            raise InputError(data_dir / name, "would have no utterances (too few speakers left for it?)")
    for name in OUTPUT_DIRS:  # before anything is written; errors name the audio file
        check_audio_files(dirs[name], None, check_audio)
    data_dir.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=".prepare.tmp-", dir=data_dir))
    try:
        for name in OUTPUT_DIRS:
            (stage / name).mkdir()
            dirs[name].write(stage / name)
            validate_data_dir(stage / name, check_audio="none")
        splits_dir = stage / SPLITS_DIR
        splits_dir.mkdir()
        for spk, (adapt, test) in splits.items():
            (splits_dir / f"{spk}.adapt").write_text("".join(u + "\n" for u in adapt), encoding="utf-8")
            (splits_dir / f"{spk}.test").write_text("".join(u + "\n" for u in test), encoding="utf-8")
        summary = {
            "options": _options_record(corpus, opts, extra),
            "corpus_stamp": stamp,
            "reader": reader,
            "targets": {spk: {"adapt": len(a), "test": len(t)} for spk, (a, t) in sorted(splits.items())},
            "counts": {name: {"utterances": len(d.utt2spk), "speakers": len(d.speakers)}
                       for name, d in dirs.items()},
        }
        with open(stage / MARKER, "w", encoding="utf-8") as f:
            yaml.safe_dump(summary, f, sort_keys=False)
        # Rename: a stale marker goes first, the new marker last, so only a finished set carries one.
        old_marker = data_dir / SPLITS_DIR / MARKER
        if old_marker.exists():
            old_marker.unlink()
        for name in OUTPUT_DIRS + (SPLITS_DIR,):
            if (data_dir / name).exists():
                shutil.rmtree(data_dir / name)
            os.replace(stage / name, data_dir / name)
        os.replace(stage / MARKER, data_dir / SPLITS_DIR / MARKER)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    for name in OUTPUT_DIRS:
        d = dirs[name]
        logging.info("%s: %d utterances, %d speakers", data_dir / name, len(d.utt2spk), len(d.speakers))
