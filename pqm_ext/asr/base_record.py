"""What stage 4's base directory was made from, so that a run asking for another base stops instead.

Every later stage makes its unit again when an input changed (pqm_ext.utils.provenance). The base is the
exception: it may be hours of training, and deleting it on a changed option would be worse than the
mistake. Without a record it was simply reused, so ``--whisper_checkpoint base.en.pt`` after the demo
quantised and adapted the demo's tiny.en. Now the base records its inputs, and a run with other inputs is
refused with what differs and what to move away. An interrupted training records its inputs too, so that
ESPnet does not resume it on another pool.

Inputs are recorded by content, not by path or bytes that do not matter: a YAML config by its parsed
values (a comment does not count), a data dir by its utterances' text and lengths (not wav.scp, whose paths
change with ``--dumpdir`` or ``--audio_format``).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Dict, Iterable

from pqm_ext.asr.model_io import MODEL_FILE
from pqm_ext.utils.errors import InputError
from pqm_ext.utils.fileio import write_text_atomic
from pqm_ext.utils.provenance import canonical, described_changes, file_digest, lines_digest, read_record

logger = logging.getLogger(__name__)
MADE_FROM = "made_from.json"
DATA_CONTENT = ("text", "utt2num_samples")  # what the trainer learns from; wav.scp holds only paths to it


def input_file(path, what: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise InputError(path, f"{what} not found")
    return path


def config_digest(path, what: str = "config") -> str:
    """A YAML file's parsed values (comments, order and layout do not count)."""
    import yaml

    values = yaml.safe_load(input_file(path, what).read_text(encoding="utf-8"))
    return lines_digest([json.dumps(values, sort_keys=True, default=str)])


def data_digest(data_dir) -> Dict[str, str]:
    return {name: file_digest(input_file(Path(data_dir) / name, "data dir file")) for name in DATA_CONTENT}


def base_is_current(out, wanted: Dict, *, also_move: Iterable = (), unrecorded_ok: bool = True) -> bool:
    """False if ``out`` holds no base; True if it holds one made from ``wanted``; otherwise an InputError naming
    what differs and what to move away. A base from before records is kept (with a warning) only where
    ``unrecorded_ok``: nothing says whether it came from an explicitly asked-for checkpoint or model."""
    out = Path(out)
    if not (out / MODEL_FILE).is_file():
        return False
    move = " and ".join(str(d) for d in [out, *also_move])
    recorded = read_record(out / MADE_FROM)
    if recorded is None:
        if not unrecorded_ok:
            raise InputError(out, f"this base has no record of what it was made from (an older version made it), so "
                                  f"it cannot be the model this run asks for: move {move} away to make the base again")
        logger.warning("%s has no record of what it was made from (an older version made it): using it as it is", out)
        return True
    if canonical(recorded) == canonical(wanted):
        return True
    raise InputError(out / MADE_FROM, f"this base was made from other inputs than this run asks for "
                                      f"({described_changes(recorded, wanted)}). Stage 4 does not replace a base: move "
                                      f"{move} away to make a new one, or run with the options it was made with")


def check_resumed_training(train_dir, wanted: Dict) -> None:
    """Before ESPnet resumes ``train_dir``: refuse a checkpoint of a training with other inputs (it would go on
    learning from this run's pool and configs, and the base would record only those); record ``wanted``."""
    train_dir = Path(train_dir)
    recorded = read_record(train_dir / MADE_FROM)
    if (train_dir / "checkpoint.pth").exists() and recorded is not None and canonical(recorded) != canonical(wanted):
        raise InputError(train_dir / MADE_FROM, f"an interrupted training of other inputs is here "
                                                f"({described_changes(recorded, wanted)}): move {train_dir} away to "
                                                f"train from the start, or run with the options it was started with")
    train_dir.mkdir(parents=True, exist_ok=True)
    write_base_record(train_dir, wanted)


def write_base_record(directory, made_from: Dict) -> None:
    write_text_atomic(Path(directory) / MADE_FROM, json.dumps(canonical(made_from), indent=1))
