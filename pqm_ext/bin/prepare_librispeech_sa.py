r"""Prepare LibriSpeech for PQM: pretrain/ (train-clean-100), dev/ (dev-clean) and LibriSpeech-SA
(sa_adapt/, sa_test/, sa_splits/) with target readers drawn from train-clean-360.

Usage:
    python -m pqm_ext.bin.prepare_librispeech_sa --corpus /db/LibriSpeech --data_dir data \
        --num_target_speakers 20 --max_adapt 100 --num_test 20 --seed 0
"""
from __future__ import annotations

import argparse
from pathlib import Path

from pqm_ext.data.kaldi_dir import CHECK_AUDIO
from pqm_ext.data.librispeech import prepare_librispeech_sa
from pqm_ext.data.sa_split import SplitOptions
from pqm_ext.utils.cli import entry_point


def add_split_arguments(p: argparse.ArgumentParser) -> None:
    """Options shared by the corpora's SA preparation."""
    p.add_argument("--corpus", required=True, help="corpus directory (or the directory holding it)")
    p.add_argument("--data_dir", default="data", help="output directory for the Kaldi data dirs")
    p.add_argument("--num_target_speakers", type=int, default=20, help="number of SA target speakers")
    p.add_argument("--max_adapt", type=int, default=100, help="adaptation pool size per target speaker")
    p.add_argument("--min_adapt", type=int, default=None,
                   help="fewest adaptation utterances a target may have (default: max_adapt)")
    p.add_argument("--num_test", type=int, default=20, help="test utterances per target speaker")
    p.add_argument("--seed", type=int, default=0, help="seed of the speaker draw and of the splits")
    p.add_argument("--target_speakers", default="",
                   help="space-separated target speaker ids instead of a random draw")
    p.add_argument("--check_audio", choices=CHECK_AUDIO, default="header",
                   help="open every audio file's header, decode every file, or neither")
    p.add_argument("--overwrite", choices=("true", "false"), default="false",
                   help="replace a preparation made with other options")


def split_options(a: argparse.Namespace) -> SplitOptions:
    try:
        return SplitOptions(num_target_speakers=a.num_target_speakers, max_adapt=a.max_adapt, min_adapt=a.min_adapt,
                            num_test=a.num_test, seed=a.seed,
                            target_speakers=tuple(a.target_speakers.split()) or None)
    except ValueError as e:  # an option error, reported as argparse reports its own
        raise SystemExit(f"error: {e}") from None


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_split_arguments(p)
    return p


@entry_point
def main(argv=None) -> None:
    a = get_parser().parse_args(argv)
    prepare_librispeech_sa(Path(a.corpus), Path(a.data_dir), split_options(a), check_audio=a.check_audio,
                           overwrite=a.overwrite == "true")


if __name__ == "__main__":
    main()
