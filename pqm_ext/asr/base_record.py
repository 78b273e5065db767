"""What stage 4's base directory was made from, so that a run asking for another base stops instead.

Every later stage makes its unit again when an input changed (pqm_ext.utils.provenance). The base is the
exception: it may be hours of training, and deleting it on a changed option would be worse than the
mistake. Without a record it was simply reused, so ``--whisper_checkpoint base.en.pt`` after the demo
quantised and adapted the demo's tiny.en. Now the base records its inputs, and a run with other inputs is
refused with what differs and what to move away.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Dict, Iterable, Optional

from pqm_ext.asr.model_io import MODEL_FILE
from pqm_ext.utils.errors import InputError
from pqm_ext.utils.provenance import canonical, changes, file_digest, read_record

logger = logging.getLogger(__name__)
MADE_FROM = "made_from.json"


def digest_or_none(path: Optional[str]) -> Optional[str]:
    """A file's digest; None for no path or a missing file (the step that reads it names it)."""
    return file_digest(path) if path and Path(path).is_file() else None


def base_is_current(out, wanted: Dict, also_move: Iterable = ()) -> bool:
    """False if ``out`` holds no base; True if it holds one made from ``wanted`` (or one from before records,
    kept with a warning); otherwise an InputError naming what differs and the directories to move away."""
    out = Path(out)
    if not (out / MODEL_FILE).is_file():
        return False
    recorded = read_record(out / MADE_FROM)
    if recorded is None:
        logger.warning("%s has no record of what it was made from (an older version made it): using it as it is", out)
        return True
    diff = changes(recorded, wanted)
    if not diff:
        return True
    move = " and ".join(str(d) for d in [out, *also_move])
    raise InputError(out / MADE_FROM, f"this base was made from other inputs than this run asks for ({'; '.join(diff)}). "
                                      f"Stage 4 does not replace a base: move {move} away to make a new one, "
                                      f"or run with the options it was made with")


def write_base_record(directory, made_from: Dict) -> None:
    (Path(directory) / MADE_FROM).write_text(json.dumps(canonical(made_from), indent=1))
