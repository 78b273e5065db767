"""Local backend (Kaldi's run.pl): run the jobs on this machine, at most --max_jobs_run at once (default: all).

--gpu N gives every running job N devices of its own through CUDA_VISIBLE_DEVICES, taken from the
visible GPUs (CUDA_VISIBLE_DEVICES if set, else /dev/nvidiaK); this also caps how many jobs run at
once. --jobs_per_gpu J lets J jobs share each group of N devices (a speaker's adapter training or
decoding uses a small part of one GPU, and one job at a time would leave it mostly idle). With no GPU
visible, --gpu and --jobs_per_gpu are ignored and the environment passes through unchanged, so a recipe
written for GPUs still runs on a CPU-only machine. --num_threads K exports OMP_NUM_THREADS=K;
--mem, --time and --config are accepted (so cmd.sh can switch backends) and ignored.
"""
from __future__ import annotations

import os
import queue
import sys
import threading
from pathlib import Path
from typing import Dict, List, Optional

from pqm_ext.launch.common import Request, UsageError, Signals, main, run_job, terminate_running


def visible_gpus() -> List[str]:
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:  # "NoDevFiles": a scheduler's way of saying this node has none (Kaldi checks it too)
        return [g.strip() for g in env.split(",") if g.strip() and g.strip() != "NoDevFiles"]
    # CUDA numbers the devices it sees from 0, whatever their /dev names (e.g. one GPU of several in a container).
    return [str(k) for k in range(len(list(Path("/dev").glob("nvidia[0-9]*"))))]


def run(req: Request, prog: str) -> Dict[int, Optional[int]]:
    req.check_no_site_options()
    slots = min(req.options.get("max_jobs_run", len(req.ids)), len(req.ids))
    per_job = req.options.get("gpu", 0)
    gpus = visible_gpus() if per_job else []
    groups = 1  # sets of per_job devices; job slot s runs on group s % groups
    if gpus:
        if per_job > len(gpus):
            raise UsageError(f"--gpu {per_job} but only {len(gpus)} GPU(s) visible ({','.join(gpus)})")
        groups = len(gpus) // per_job
        slots = min(slots, groups * req.options.get("jobs_per_gpu", 1))
    todo: queue.SimpleQueue = queue.SimpleQueue()
    for i in req.ids:
        todo.put(i)
    codes: Dict[int, Optional[int]] = {}
    stop = threading.Event()

    def worker(slot: int) -> None:
        group = slot % groups
        devices = gpus[group * per_job:(group + 1) * per_job]
        while not stop.is_set():
            try:
                i = todo.get_nowait()
            except queue.Empty:
                return
            env = req.env_for(i)
            if devices:
                env["CUDA_VISIBLE_DEVICES"] = ",".join(devices)
            codes[i] = run_job(req.command_for(i), req.log_for(i), env, req.options.get("num_threads", 1))

    signals = Signals(prog, lambda: (stop.set(), terminate_running()))
    workers = [threading.Thread(target=worker, args=(s,), daemon=True) for s in range(slots)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    signals.exit_if_received()
    return codes


if __name__ == "__main__":
    sys.exit(main("run.sh", run))
