"""A small offline noise and room-impulse-response set, the demo's stand-in for MUSAN and RIRS_NOISES.

ESPnet's ASR preprocessor adds noise and convolves RIRs on the fly when given ``--noise_scp`` and
``--rir_scp`` (Kaldi-style lists, ``<id> <wav path>``). Stage 6 can use that to pretrain LoRA on the pool
under many recording conditions (multi-condition training), so that the pretrained adapter has something
to learn that the base has not (the demo Conformer's base is trained on the pool itself), closer to the
target speakers, whose channels are harsher than the pool's. Real corpora use real noise and RIR sets;
this one is made with the demo's own generators (coloured noise and mains hum from numpy, RIRs as sox's
reverb of an impulse), with parameters drawn from a seed: the same files for a seed and sox version.

Output in ``out``: ``noise/*.wav``, ``rir/*.wav``, ``noise.scp``, ``rir.scp`` and ``.noise_rir_done.yaml``
(the options), built in a temporary directory and moved into place, so a killed run leaves nothing that
looks finished. An ``out`` holding anything else (another seed's set, a user's files) is refused, not replaced.
"""
from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Tuple

import numpy as np
import soundfile as sf
import yaml

from pqm_ext.demo.channel import NOISES, SAMPLE_RATE, make_noise, sox
from pqm_ext.utils.errors import InputError
from pqm_ext.utils.fileio import atomic_dir

MARKER = ".noise_rir_done.yaml"
VERSION = 1  # bumped whenever a change to the generators changes the files for a seed


@dataclass(frozen=True)
class NoiseRirConfig:
    seed: int = 0
    noises_per_kind: int = 3      # files of each of NOISES
    noise_seconds: float = 20.0   # ESPnet cuts a random stretch of a longer noise, and loops a shorter one
    rirs: int = 12
    rir_seconds: float = 1.0
    reverberance: Tuple[int, int] = (20, 100)  # sox reverb's reverberance %, drawn uniformly
    room_scale: Tuple[int, int] = (30, 100)    # sox reverb's room scale %, drawn uniformly

    def record(self) -> dict:
        return dict({k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}, version=VERSION)


def is_complete(out: Path, config: NoiseRirConfig) -> bool:
    marker = Path(out) / MARKER
    return marker.is_file() and yaml.safe_load(marker.read_text()) == config.record()


def synth_noise_rir(out, config: NoiseRirConfig = NoiseRirConfig()) -> Tuple[Path, Path]:
    """Write the set to ``out`` (kept if it holds one made with ``config``); return (noise.scp, rir.scp)."""
    out = Path(out)
    if is_complete(out, config):
        return out / "noise.scp", out / "rir.scp"
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError(out, "holds something other than this noise and RIR set (another seed's or version's, "
                              "or files not made here): remove it or choose another --out")
    if shutil.which("sox") is None:
        raise InputError(out, "making the demo noise and RIR set needs sox (Debian package sox)")
    rng = np.random.default_rng(config.seed)
    with atomic_dir(out, overwrite=True) as tmp:
        noise_lines = [_write_noise(tmp, out, kind, i, config, rng)
                       for kind in NOISES for i in range(config.noises_per_kind)]
        rir_lines = [_write_rir(tmp, out, i, config, rng) for i in range(config.rirs)]
        (tmp / "noise.scp").write_text("".join(noise_lines))
        (tmp / "rir.scp").write_text("".join(rir_lines))
        (tmp / MARKER).write_text(yaml.safe_dump(config.record()))
    return out / "noise.scp", out / "rir.scp"


def _write_noise(tmp: Path, out: Path, kind: str, i: int, config: NoiseRirConfig, rng) -> str:
    name = f"{kind}{i}"
    x = 0.1 * make_noise(kind, int(config.noise_seconds * SAMPLE_RATE), rng)  # ESPnet sets the SNR itself
    (tmp / "noise").mkdir(exist_ok=True)
    sf.write(str(tmp / "noise" / f"{name}.wav"), x.astype(np.float32), SAMPLE_RATE, subtype="FLOAT")
    return f"{name} {out / 'noise' / f'{name}.wav'}\n"


def _write_rir(tmp: Path, out: Path, i: int, config: NoiseRirConfig, rng) -> str:
    reverberance = int(rng.integers(config.reverberance[0], config.reverberance[1] + 1))
    room_scale = int(rng.integers(config.room_scale[0], config.room_scale[1] + 1))
    name = f"rir{i}_reverb{reverberance}_room{room_scale}"
    impulse = np.zeros(int(config.rir_seconds * SAMPLE_RATE), np.float32)
    impulse[0] = 0.5
    (tmp / "rir").mkdir(exist_ok=True)
    sf.write(str(tmp / "impulse.wav"), impulse, SAMPLE_RATE, subtype="FLOAT")
    sox(tmp / "impulse.wav", tmp / "rir" / f"{name}.wav", ["reverb", str(reverberance), "50", str(room_scale)])
    (tmp / "impulse.wav").unlink()
    return f"{name} {out / 'rir' / f'{name}.wav'}\n"
