"""Noise and RIR lists for ESPnet's on-the-fly augmentation (``--noise_scp``, ``--rir_scp``), checked first.

ESPnet reads these lists when it builds the preprocessor and opens a listed file only when it draws it,
so a wrong path would stop a long training at a random step with a bare traceback; so would a stereo
file (the utterance comes back with two channels), and a file at another sample rate would be used
unresampled. Every line is checked here, before training, and an error names the list and the line. The
lists' digests (and those of the files they name) join the adapter's record, so a changed noise set trains
the adapter again.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import soundfile as sf
from espnet2.utils.types import str_or_none

from pqm_ext.utils.errors import InputError
from pqm_ext.utils.provenance import file_digest, lines_digest

AUGMENT_LISTS = ("noise_scp", "rir_scp")
SAMPLE_RATE = 16000  # stage 2 formats every data dir to 16 kHz
_UNSET = object()


def augment_lists(conf: Dict, extra_args: Sequence[str] = ()) -> Dict[str, List[str]]:
    """``{option: [list files]}`` that ESPnet will read: the config's, unless the command line sets the option
    (ESPnet's order), read by ESPnet's own parser (abbreviations, ``none`` for off); options left off absent."""
    given = argparse.Namespace(**{name: _UNSET for name in AUGMENT_LISTS})
    if any(arg.startswith(("--noise", "--rir")) for arg in extra_args):  # else spare the import of ESPnet's task
        from pqm_ext.tasks.pqm_asr import PQMASRTask

        parser = PQMASRTask.get_parser()
        parser.set_defaults(**vars(given))
        given, _ = parser.parse_known_args(list(extra_args))
    found = {}
    for name in AUGMENT_LISTS:
        value = getattr(given, name)
        value = conf.get(name) if value is _UNSET else value
        if isinstance(value, str):
            value = str_or_none(value)  # "none" in a config means off, as on ESPnet's command line
        if value:
            found[name] = [value] if isinstance(value, (str, Path)) else list(value)
    return found


def check_audio_list(scp, rate: int = SAMPLE_RATE) -> List[Path]:
    """The audio files ``scp`` names (Kaldi-style ``<id> <path>``, or a bare path per line, as ESPnet reads),
    each mono at ``rate``. Relative paths are read from the working directory, as ESPnet reads them."""
    scp = Path(scp)
    if not scp.is_file():
        raise InputError(scp, "no such file (a noise or RIR list: '<id> <wav path>' per line)")
    paths: List[Path] = []
    with open(scp, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise InputError(scp, f"not UTF-8 text ({e})", n) from e
            paths.append(_check_line(scp, n, line, rate))
    if not paths:
        raise InputError(scp, "lists no audio file")
    return paths


def _check_line(scp: Path, n: int, line: str, rate: int) -> Path:
    fields = line.strip().split(None, 1)
    if not fields:
        raise InputError(scp, "empty line", n)
    path = Path(fields[-1])
    try:
        info = sf.info(str(path))
    except (RuntimeError, OSError) as e:  # missing, unreadable or not audio
        where = "" if path.is_absolute() else f", relative to {Path.cwd()}"
        raise InputError(scp, f"cannot read {path} as audio{where} ({e})", n) from e
    if info.frames == 0:
        raise InputError(scp, f"{path} holds no samples", n)
    if info.channels != 1 or info.samplerate != rate:
        raise InputError(scp, f"{path} is {info.channels} channel(s) at {info.samplerate} Hz; ESPnet mixes it "
                              f"in as it is, so it must be mono at {rate} Hz (sox in.wav -r {rate} -c 1 out.wav)", n)
    return path


def augment_record(conf: Dict, extra_args: Sequence[str] = ()) -> Optional[Dict[str, Dict[str, str]]]:
    """``{option: {list digests, files digest}}`` for the lists ESPnet will use, each checked; None if none."""
    record = {}
    for name, lists in augment_lists(conf, extra_args).items():
        files = [p for scp in lists for p in check_audio_list(scp)]
        record[name] = {"lists": lines_digest(file_digest(scp) for scp in lists),
                        "files": lines_digest(file_digest(p) for p in files)}
    return record or None
