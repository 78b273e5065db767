"""Noise and RIR lists for ESPnet's on-the-fly augmentation (``--noise_scp``, ``--rir_scp``), checked first.

ESPnet reads these lists when it builds the preprocessor and opens a listed file only when it draws it,
so a wrong path would stop a long training at a random step with a bare traceback. Every line is checked
here, before training, and an error names the list and the line. The lists' digests (and those of the
files they name) join the adapter's record, so a changed noise set trains the adapter again.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List

import soundfile as sf

from pqm_ext.utils.errors import InputError
from pqm_ext.utils.provenance import file_digest, lines_digest

AUGMENT_LISTS = ("noise_scp", "rir_scp")


def check_audio_list(scp) -> List[Path]:
    """The audio files ``scp`` names (Kaldi-style ``<id> <path>``, or a bare path per line, as ESPnet reads)."""
    scp = Path(scp)
    if not scp.is_file():
        raise InputError(scp, "no such file (a noise or RIR list: '<id> <wav path>' per line)")
    paths: List[Path] = []
    for n, line in enumerate(scp.read_text(encoding="utf-8").splitlines(), 1):
        fields = line.strip().split(None, 1)
        if not fields:
            raise InputError(scp, "empty line", n)
        path = Path(fields[-1])
        try:
            info = sf.info(str(path))
        except (RuntimeError, OSError) as e:  # missing, unreadable or not audio
            raise InputError(scp, f"cannot read {path} as audio ({e})", n) from e
        if info.frames == 0:
            raise InputError(scp, f"{path} holds no samples", n)
        paths.append(path)
    if not paths:
        raise InputError(scp, "lists no audio file")
    return paths


def augment_record(conf: Dict) -> Dict[str, Dict[str, str]]:
    """``{option: {list digest, files digest}}`` for the augmentation lists ``conf`` sets, each checked."""
    record = {}
    for option in AUGMENT_LISTS:
        if conf.get(option):
            files = check_audio_list(conf[option])
            record[option] = {"list": file_digest(conf[option]),
                              "files": lines_digest(file_digest(p) for p in files)}
    return record
