"""One array task inside a Slurm batch job: the local backend's log, plus the exit-status file the launcher waits for.

Usage (written by the slurm backend into <logdir>/q/<name>.sh): python -m pqm_ext.launch.task SPEC.json TASK_ID
"""
from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

from pqm_ext.launch.common import Request, Signals, run_job, terminate_running
from pqm_ext.launch.slurm import Paths
from pqm_ext.utils.fileio import write_text_atomic


def main(argv=None) -> int:
    spec, task_id = sys.argv[1:] if argv is None else argv
    req, i = Request(**json.loads(Path(spec).read_text())), int(task_id)
    # SIGTERM (scancel, time limit, preemption, requeue): stop the command and write the log's footer, but no
    # status: a requeued task runs again and is waited for; one that does not is judged by that footer.
    signals = Signals("task", terminate_running)
    job = f"{os.environ.get('SLURM_ARRAY_JOB_ID', '?')}_{os.environ.get('SLURM_ARRAY_TASK_ID', task_id)}"
    restarts = os.environ.get("SLURM_RESTART_COUNT", "0")
    code = run_job(req.command_for(i), req.log_for(i), req.env_for(i), req.options.get("num_threads", 1),
                   info=[f"Slurm job {job} on {socket.gethostname()}" + (f" (restart {restarts})"
                                                                      if restarts != "0" else "")])
    if signals.received is None:
        write_text_atomic(Paths(req).status(i), f"{code}\n")
    return code


if __name__ == "__main__":
    sys.exit(main())
