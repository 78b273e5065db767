"""Synthesise an offline demo corpus in the LibriSpeech or TED-LIUM 3 layout (TTS voices + channels),
deterministic for a seed; skipped when OUT already holds it.

Usage:
    python -m pqm_ext.bin.synth_demo_corpus --layout librispeech --out downloads/demo --seed 0 --nj 2
    python -m pqm_ext.bin.synth_demo_corpus --layout tedlium3 --out downloads/demo_ted --num_target_speakers 4
"""
from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import fields
from pathlib import Path

from pqm_ext.demo.layouts import LAYOUTS
from pqm_ext.demo.synth import DemoConfig, synth_demo_corpus
from pqm_ext.utils.log import setup_logging

HELP = {
    "num_target_speakers": "hard SA target speakers (LibriSpeech train-clean-360 / TED-LIUM train talks)",
    "num_pool_speakers": "LoRA pretraining-pool speakers (train-clean-100 / train talks)",
    "adapt_per_speaker": "utterances per target speaker meant for adaptation",
    "test_per_speaker": "utterances per target speaker meant for testing",
    "pool_per_speaker": "utterances per pretraining-pool speaker",
    "dev_speakers": "dev speakers (dev-clean / legacy dev; TED-LIUM also gets as many legacy test talks)",
    "dev_per_speaker": "utterances per dev (and TED-LIUM test) speaker",
}


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layout", choices=LAYOUTS, required=True)
    p.add_argument("--out", required=True, help="directory that receives the corpus tree and speakers.yaml")
    p.add_argument("--seed", type=int, default=0)
    for f in fields(DemoConfig):
        if f.name in HELP:
            p.add_argument(f"--{f.name}", type=int, default=f.default, help=HELP[f.name])
    p.add_argument("--text_files", nargs="+", default=list(DemoConfig.text_files),
                   help="fortune-format text files the sentences come from")
    p.add_argument("--nj", type=int, default=2, help="parallel synthesis processes")
    return p


def main(argv=None) -> None:
    setup_logging()
    a = get_parser().parse_args(argv)
    sizes = {name: getattr(a, name) for name in HELP}
    try:
        config = DemoConfig(layout=a.layout, seed=a.seed, text_files=tuple(a.text_files), **sizes)
        synth_demo_corpus(config, Path(a.out), nj=a.nj)
    except (ValueError, FileExistsError, FileNotFoundError) as e:  # bad sizes, other corpus in OUT, no text
        logging.error("%s", e)
        sys.exit(1)


if __name__ == "__main__":
    main()
