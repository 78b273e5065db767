"""What a finished unit of work was made from, so that a re-run can tell "reuse" from "make again".

A Kaldi-style stage skips a unit whose output exists: that is what lets an interrupted stage continue.
On its own it would also make a changed option (another decoding config, early stopping, a longer
pretraining, a re-quantised base) silently do nothing, and RESULTS.md name settings its hypotheses were
not made with. So each unit records what it was made from (its options, and digests of the files it
read); a re-run reuses the unit only if the record it would write is the same, and otherwise makes it
again and says what changed.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional

logger = logging.getLogger(__name__)
MAX_SHOWN = 6  # changed keys listed in one warning


def read_record(json_file, key: Optional[str] = None) -> Optional[Dict]:
    """The record in ``json_file`` (or its ``key`` entry); None if there is none or it cannot be read."""
    try:
        record = json.loads(Path(json_file).read_text())
    except (OSError, ValueError):
        return None
    return record.get(key) if key is not None and isinstance(record, dict) else record


def file_digest(path) -> str:
    """A short SHA-256 of a file's bytes (computed once per process for an unchanged file)."""
    path = Path(path)
    st = path.stat()
    return _digest(str(path.resolve()), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=None)
def _digest(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def files_digest(paths: Iterable) -> Dict[str, str]:
    """``{file name: digest}`` of the files that exist among ``paths`` (e.g. a data dir's text and wav.scp)."""
    return {Path(p).name: file_digest(p) for p in paths if Path(p).is_file()}


def lines_digest(lines: Iterable[str]) -> str:
    return hashlib.sha256("\n".join(lines).encode("utf-8")).hexdigest()[:16]


def canonical(record: Any) -> Any:
    """The record as JSON would give it back (tuples become lists, paths strings), so records compare equal."""
    return json.loads(json.dumps(record, sort_keys=True, default=str))


def _flat(record: Any, prefix: str = "") -> Dict[str, Any]:
    if isinstance(record, dict) and record:
        out: Dict[str, Any] = {}
        for k, v in record.items():
            out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: record}


def changes(old: Dict, new: Dict) -> List[str]:
    """``key: old -> new`` for every (dotted) key whose value differs."""
    a, b = _flat(canonical(old)), _flat(canonical(new))
    return [f"{k}: {_short(a.get(k, '(none)'))} -> {_short(b.get(k, '(none)'))}"
            for k in sorted(set(a) | set(b)) if a.get(k, "(none)") != b.get(k, "(none)")]


def described_changes(old: Dict, new: Dict) -> str:
    """The first changed keys, ``key: old -> new; ...``, and how many more there are."""
    diff = changes(old, new)
    more = f" (and {len(diff) - MAX_SHOWN} more)" if len(diff) > MAX_SHOWN else ""
    return "; ".join(diff[:MAX_SHOWN]) + more


def _short(value: Any, limit: int = 60) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= limit else text[:limit - 3] + "..."


def reusable(recorded: Optional[Dict], wanted: Dict, what) -> bool:
    """Whether a finished unit, made from ``recorded``, is what ``wanted`` would make now.

    When it is not, the warning names the unit (``what``) and the inputs that changed. A unit without a
    record (made by an older version of the toolkit) is made again: nothing says what it was made from.
    """
    if recorded is not None and canonical(recorded) == canonical(wanted):
        return True
    if recorded is None:
        logger.warning("%s: no record of what it was made from (an older version made it): making it again", what)
    else:
        logger.warning("%s was made from other inputs, making it again: %s", what, described_changes(recorded, wanted))
    return False
