"""Synthesise the demo's noise and RIR lists (a stand-in for MUSAN and RIRS_NOISES), deterministic for a
seed; skipped when OUT already holds them, refused when OUT holds anything else. Stage 6 gives them to
ESPnet (``--noise_scp``, ``--rir_scp``).

Usage:
    python -m pqm_ext.bin.synth_noise_rir --out downloads/noise_rir --seed 0
"""
from __future__ import annotations

import argparse
import logging

from pqm_ext.demo.noise_rir import NoiseRirConfig, synth_noise_rir
from pqm_ext.utils.cli import entry_point


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="directory that receives noise.scp, rir.scp and the wavs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--noises_per_kind", type=int, default=NoiseRirConfig.noises_per_kind,
                   help="noise files of each kind (white, pink, brown, mains hum)")
    p.add_argument("--rirs", type=int, default=NoiseRirConfig.rirs, help="room impulse responses")
    return p


@entry_point
def main(argv=None) -> None:
    a = get_parser().parse_args(argv)
    noise_scp, rir_scp = synth_noise_rir(a.out, NoiseRirConfig(seed=a.seed, noises_per_kind=a.noises_per_kind,
                                                               rirs=a.rirs))
    logging.info("noise list %s, RIR list %s", noise_scp, rir_scp)


if __name__ == "__main__":
    main()
