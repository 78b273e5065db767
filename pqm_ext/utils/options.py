"""Option dataclasses from YAML mappings: unknown keys are errors that list the known ones."""
from __future__ import annotations

import dataclasses
from typing import Optional, Type, TypeVar

T = TypeVar("T")


def dataclass_from_dict(cls: Type[T], conf: Optional[dict], what: str) -> T:
    conf = dict(conf or {})
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(conf) - known)
    if unknown:
        raise ValueError(f"unknown {what} option(s) {unknown}; known: {sorted(known)}")
    return cls(**conf)
