"""Entry-point plumbing shared by ``pqm_ext.bin.*``: logging, and input errors without tracebacks."""
from __future__ import annotations

import functools
import logging
import sys
from typing import Callable

from pqm_ext.utils.errors import InputError
from pqm_ext.utils.log import setup_logging


def entry_point(main: Callable) -> Callable:
    """Set up logging; report an ``InputError`` as one ``file[:line]: message`` line and exit 1."""

    @functools.wraps(main)
    def wrapper(argv=None):
        setup_logging()
        try:
            return main(argv)
        except InputError as e:
            logging.error("%s", e)
            sys.exit(1)

    return wrapper
