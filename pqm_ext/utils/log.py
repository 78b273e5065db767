"""Logging set-up shared by every entry point: time, level and file:line, to stderr (the job's log)."""
from __future__ import annotations

import logging
import sys

FORMAT = "%(asctime)s (%(filename)s:%(lineno)d) %(levelname)s: %(message)s"


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(level=level.upper(), format=FORMAT, stream=sys.stderr, force=True)
