"""Check a Kaldi-style data dir: sorted unique ids, every utterance in every file, speakers as id
prefixes, normalised non-empty text, readable 16 kHz audio. Errors name the file and the line.

Usage:
    python -m pqm_ext.bin.validate_data_dir data/sa_test
    python -m pqm_ext.bin.validate_data_dir --check_audio decode dump/raw/sa_test
"""
from __future__ import annotations

import argparse

from pqm_ext.data.kaldi_dir import CHECK_AUDIO, validate_data_dir
from pqm_ext.utils.cli import entry_point


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data_dir", nargs="+", help="data dir(s) to check")
    p.add_argument("--check_audio", choices=CHECK_AUDIO, default="header",
                   help="open every audio header, decode every file, or neither")
    p.add_argument("--allow_resample", action="store_true", help="accept audio that is not 16 kHz")
    return p


@entry_point
def main(argv=None) -> None:
    a = get_parser().parse_args(argv)
    for d in a.data_dir:
        validate_data_dir(d, check_audio=a.check_audio, allow_resample=a.allow_resample)


if __name__ == "__main__":
    main()
