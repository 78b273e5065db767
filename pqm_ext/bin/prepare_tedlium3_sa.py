"""Prepare TED-LIUM 3 (legacy split) for PQM: pretrain/ (train talks not held out), dev/ (legacy dev) and
the SA set (sa_adapt/, sa_test/, sa_splits/) from talks held out of legacy train.

Usage:
    python -m pqm_ext.bin.prepare_tedlium3_sa --corpus /db/TEDLIUM_release-3 --data_dir data \
        --num_target_speakers 20 --max_adapt 100 --num_test 20 --seed 0
"""
from __future__ import annotations

import argparse
from pathlib import Path

from pqm_ext.bin.prepare_librispeech_sa import add_split_arguments, split_options
from pqm_ext.data.tedlium import prepare_tedlium3_sa
from pqm_ext.utils.cli import entry_point


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_split_arguments(p)
    p.add_argument("--sa_subsets", default="train",
                   help="legacy subsets the SA talks are drawn from: 'train', 'test' or 'train test'")
    return p


@entry_point
def main(argv=None) -> None:
    a = get_parser().parse_args(argv)
    prepare_tedlium3_sa(Path(a.corpus), Path(a.data_dir), split_options(a), check_audio=a.check_audio,
                        overwrite=a.overwrite == "true", sa_subsets=tuple(a.sa_subsets.split()))


if __name__ == "__main__":
    main()
