r"""Prepare TED-LIUM 3 (legacy split) for PQM: pretrain/ (train talks not held out), dev/ (legacy dev) and
the SA set (sa_adapt/, sa_test/, sa_splits/) from talks held out of legacy train.

Usage:
    python -m pqm_ext.bin.prepare_tedlium3_sa --corpus /db/TEDLIUM_release-3 --data_dir data \
        --num_target_speakers 20 --max_adapt 100 --num_test 20 --seed 0
"""
from __future__ import annotations

import argparse
from pathlib import Path

from pqm_ext.bin.prepare_librispeech_sa import add_split_arguments, split_options
from pqm_ext.data.tedlium import KALDI_PADDING, prepare_tedlium3_sa
from pqm_ext.utils.cli import entry_point


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_split_arguments(p)
    p.add_argument("--sa_subsets", default="train",
                   help="legacy subsets the SA talks are drawn from: 'train', 'test' or 'train test'")
    p.add_argument("--segment_padding", type=_padding, default=KALDI_PADDING, metavar="BEFORE,AFTER",
                   help="seconds added around train (and SA) segments, as Kaldi's recipe does (default 0.15,0.1)")
    return p


def _padding(value: str):
    try:
        before, after = (float(x) for x in value.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected BEFORE,AFTER in seconds, e.g. 0.15,0.1; got {value!r}") from None
    if before < 0 or after < 0:
        raise argparse.ArgumentTypeError(f"padding must not be negative: {value!r}")
    return before, after


@entry_point
def main(argv=None) -> None:
    a = get_parser().parse_args(argv)
    prepare_tedlium3_sa(Path(a.corpus), Path(a.data_dir), split_options(a), check_audio=a.check_audio,
                        overwrite=a.overwrite == "true", sa_subsets=tuple(a.sa_subsets.split()),
                        segment_padding=a.segment_padding)


if __name__ == "__main__":
    main()
