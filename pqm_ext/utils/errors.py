"""Errors about a user's input that name the offending file (and line)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Union


class InputError(ValueError):
    """Bad input: the message always starts with ``file[:line]:`` so users can jump to it."""

    def __init__(self, path: Union[str, Path], message: str, line: Optional[int] = None):
        self.path = str(path)
        self.line = line
        where = self.path if line is None else f"{self.path}:{line}"
        super().__init__(f"{where}: {message}")
