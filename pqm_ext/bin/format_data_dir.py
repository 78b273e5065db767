"""Stage 2: write DST as a data dir of 16 kHz mono 16-bit WAV (or FLAC) files (DST/data/<utt>.wav) cut and
resampled from SRC, with text, utt2spk, spk2utt and utt2num_samples; skipped when DST is complete and was made from the same
source and options, otherwise narrowed (hard links) or made again.

Usage:
    python -m pqm_ext.bin.format_data_dir data/sa_test dump/raw/sa_test --nj 4
"""
from __future__ import annotations

import argparse

from pqm_ext.data.format import format_data_dir
from pqm_ext.data.kaldi_dir import CHECK_AUDIO
from pqm_ext.utils.cli import entry_point


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="prepared data dir (wav.scp of flac/sph/wav paths, optional segments)")
    p.add_argument("dst", help="output data dir")
    p.add_argument("--nj", type=int, default=1, help="parallel processes")
    p.add_argument("--sample_rate", type=int, default=16000)
    p.add_argument("--check_audio", choices=CHECK_AUDIO, default="header", help="how SRC's audio is checked first")
    p.add_argument("--audio_format", choices=("wav", "flac"), default="wav",
                   help="file format of DST's audio (flac: about half the disk)")
    p.add_argument("--min_duration", type=float, default=None,
                   help="leave out utterances shorter than this many seconds (a training set; needs --max_duration)")
    p.add_argument("--max_duration", type=float, default=None,
                   help="leave out utterances longer than this many seconds (a training set; needs --min_duration)")
    return p


@entry_point
def main(argv=None) -> None:
    p = get_parser()
    a = p.parse_args(argv)
    if (a.min_duration is None) != (a.max_duration is None):
        p.error("--min_duration and --max_duration go together")
    durations = None if a.max_duration is None else (a.min_duration, a.max_duration)
    if durations is not None and not 0 <= durations[0] < durations[1]:
        p.error(f"--min_duration {a.min_duration:g} must be >= 0 and below --max_duration {a.max_duration:g}")
    format_data_dir(a.src, a.dst, nj=a.nj, sample_rate=a.sample_rate, check_audio=a.check_audio,
                    audio_format=a.audio_format, durations=durations)


if __name__ == "__main__":
    main()
