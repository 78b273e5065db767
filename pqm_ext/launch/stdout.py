"""Debugging backend: run the jobs one after another, showing their output on stdout as well as in the logs.

Options are treated as by the local backend, except that jobs never overlap (--max_jobs_run and
--jobs_per_gpu are moot).
"""
from __future__ import annotations

import sys
from typing import Dict, Optional

from pqm_ext.launch.common import Request, Signals, main, run_job, terminate_running


def run(req: Request, prog: str) -> Dict[int, Optional[int]]:
    req.check_no_site_options()
    signals = Signals(prog, terminate_running)
    codes: Dict[int, Optional[int]] = {}
    for i in req.ids:
        codes[i] = run_job(req.command_for(i), req.log_for(i), req.env_for(i), req.options.get("num_threads", 1),
                           echo=True)
        signals.exit_if_received()
    return codes


if __name__ == "__main__":
    sys.exit(main("stdout.sh", run))
