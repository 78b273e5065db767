"""Slurm backend (Kaldi's slurm.pl): JOB=1:N becomes one ``sbatch --array=1-N[%P]``; wait; check every task.

Each array task runs :mod:`pqm_ext.launch.task`, which writes the same log as the local backend and an
exit-status file under ``<logdir>/q/``. The launcher trusts those files (not sacct: accounting may be
off) and asks squeue only whether tasks without one are still queued or running. A task that was
terminated (preemption, requeue, time limit) writes no status, so a requeued task is waited for.
Once squeue says a task is over, its status file may still be invisible on this host (NFS caches a
directory's entries for 30-60 s): the launcher re-lists ``q/`` for up to ``PQM_SLURM_STATUS_GRACE``
seconds (default 90), then reads the footer of the task's log, and only then says it "never ran".
SIGINT/SIGTERM/SIGHUP of the launcher cancel the array.
As in Kaldi, a task first sources ./path.sh when the submit directory has one (sbatch --export=PATH
drops the rest of the environment).

Generic options become sbatch flags through a Kaldi-style config: --config FILE, else conf/slurm.conf
when it exists, else DEFAULT_CONFIG. Line types:
    command sbatch --export=PATH     the submit command with its fixed flags
    option mem=* --mem $0            --mem X becomes --mem X ($0 is the value)
    option mem=0                     --mem 0 adds nothing (an exact value wins over *)
    default gpu=0                    the value used when the option is not given
Options: mem, gpu, num_threads, time, and any other --NAME VALUE the config has an ``option NAME=...`` rule
for (ESPnet's and Kaldi's configs use e.g. name, num_nodes); --max_jobs_run P becomes the array's %P;
--jobs_per_gpu is ignored (Slurm gives each task the GPUs of its own --gres).
"""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from pqm_ext.launch.common import LaunchError, Request, Signals, UsageError, main, substitute
from pqm_ext.utils.errors import InputError
from pqm_ext.utils.fileio import write_text_atomic

MAPPED = ("mem", "gpu", "num_threads", "time")
ENDED = re.compile(r"^# Ended \(code (\d+)\)")
REPO_ROOT = Path(__file__).resolve().parents[2]
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED",
                "BOOT_FAIL", "DEADLINE", "SPECIAL_EXIT"}

DEFAULT_CONFIG = """\
command sbatch --export=PATH --ntasks-per-node=1
option time=* --time $0
option mem=* --mem $0
option mem=0
option num_threads=* --cpus-per-task $0
option num_threads=1 --cpus-per-task 1
default gpu=0
option gpu=0
option gpu=* --gres=gpu:$0
"""


@dataclass
class Config:
    command: List[str] = field(default_factory=list)
    rules: Dict[Tuple[str, str], List[str]] = field(default_factory=dict)  # (name, value or "*") -> flags
    defaults: Dict[str, str] = field(default_factory=dict)
    path: str = "<default config>"


def parse_config(text: str, path: str) -> Config:
    cfg = Config(path=path)
    for n, line in enumerate(text.splitlines(), 1):
        try:
            words = shlex.split(line, comments=True)
        except ValueError as e:
            raise InputError(path, f"{e} (shell quoting)", n) from None
        if not words:
            continue
        kind, rest = words[0], words[1:]
        if kind == "command":
            cfg.command = rest
            continue
        if kind not in ("option", "default"):
            raise InputError(path, f"unknown line type {kind!r} (expected command, option or default)", n)
        name, eq, value = rest[0].partition("=") if rest else ("", "", "")
        if not eq or not value:
            raise InputError(path, f"expected '{kind} name=value ...'", n)
        if not name.isidentifier():
            raise InputError(path, f"bad option name {name!r}", n)
        if kind == "default":
            if len(rest) > 1:
                raise InputError(path, "a default line takes no flags", n)
            cfg.defaults[name] = value
        else:
            cfg.rules[(name, value)] = rest[1:]
    if not cfg.command:
        raise InputError(path, "no 'command sbatch ...' line")
    return cfg


def load_config(path: Optional[str]) -> Config:
    if path is None and not Path("conf/slurm.conf").is_file():
        return parse_config(DEFAULT_CONFIG, "<default config>")
    path = path or "conf/slurm.conf"
    try:
        return parse_config(Path(path).read_text(), path)
    except OSError as e:
        raise UsageError(f"cannot read the config {path}: {e.strerror}") from None
    except InputError as e:
        raise UsageError(str(e)) from None


def scheduler_flags(cfg: Config, options: dict) -> List[str]:
    """The sbatch flags for the options (generic ones and those only the config knows), by the config's rules
    (an exact value before ``*``)."""
    flags: List[str] = []
    others = sorted((set(options) | set(cfg.defaults)) - set(MAPPED) - {"max_jobs_run", "config", "jobs_per_gpu"})
    for name in [*MAPPED, *others]:
        value = options.get(name, cfg.defaults.get(name))
        if value is None:
            continue
        value = str(value)
        if (name, value) in cfg.rules:
            flags += cfg.rules[(name, value)]
        elif (name, "*") in cfg.rules:
            flags += [w.replace("$0", value) for w in cfg.rules[(name, "*")]]
        else:
            raise UsageError(f"--{name} {value}: {cfg.path} has no 'option {name}=...' rule for it")
    return flags


@dataclass
class Paths:
    """Files under <logdir>/q/ for one launch: task spec, batch script, exit statuses, Slurm's own output."""

    req: Request

    @property
    def qdir(self) -> Path:
        return Path(self.req.log).parent / "q"

    @property
    def tag(self) -> str:
        name = Path(self.req.log).name
        return name[:-len(".log")] if name.endswith(".log") else name

    def status(self, i: int) -> Path:
        return self.qdir / f"{substitute(self.tag, self.req.var, i)}.status"

    def read_status(self, i: int) -> Optional[int]:
        """The task's exit status; None while there is none (or none readable yet: written on another host)."""
        try:
            return int(self.status(i).read_text())
        except (OSError, ValueError):
            return None

    def footer_status(self, i: int) -> Optional[int]:
        """The exit status in the footer of the task's log (``# Ended (code N) ...``), if it has one."""
        try:
            lines = Path(self.req.log_for(i)).read_text(errors="replace").splitlines()
        except OSError:
            return None
        ended = [m for m in (ENDED.match(line) for line in lines[-3:]) if m]
        return int(ended[-1][1]) if ended else None

    def slurm_output(self, i: object = "%a") -> Path:
        return self.qdir / f"{substitute(self.tag, self.req.var, i)}.out"


def batch_script(spec: Path) -> str:
    q = shlex.quote
    return (f"#!/bin/bash\n"
            f"cd {q(os.getcwd())} || {{ echo \"cannot cd to {os.getcwd()} on $(hostname)\" >&2; exit 1; }}\n"
            f"[ -f path.sh ] && . ./path.sh\n"
            f"export PYTHONPATH={q(str(REPO_ROOT))}${{PYTHONPATH:+:$PYTHONPATH}}\n"
            f"exec {q(sys.executable)} -m pqm_ext.launch.task {q(str(spec.resolve()))} \"$SLURM_ARRAY_TASK_ID\"\n")


def submit(req: Request, cfg: Config, paths: Paths) -> str:
    paths.qdir.mkdir(parents=True, exist_ok=True)
    spec = paths.qdir / f"{paths.tag}.json"
    write_text_atomic(spec, json.dumps(dict(asdict(req), log=str(Path(req.log).resolve())), indent=1) + "\n")
    script = paths.qdir / f"{paths.tag}.sh"
    write_text_atomic(script, batch_script(spec))
    for i in req.ids:  # stale results of an earlier run must not count
        for old in (paths.status(i), Path(req.log_for(i))):
            old.unlink(missing_ok=True)
    limit = f"%{req.options['max_jobs_run']}" if "max_jobs_run" in req.options else ""
    cmd = [*cfg.command, "--parsable", f"--array={req.first}-{req.last}{limit}", f"--job-name={paths.tag}",
           f"--output={paths.slurm_output()}", *scheduler_flags(cfg, {**req.site_options, **req.options}),
           str(script)]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True)
    except FileNotFoundError:
        raise LaunchError(f"{cfg.command[0]} not found: is Slurm installed (tools/local_slurm.sh start)?") from None
    if res.returncode != 0:
        raise LaunchError(f"submission failed: {shlex.join(cmd)}\n{res.stderr.strip()}")
    return res.stdout.strip().split(";")[0]


def queued(job_id: str) -> Optional[bool]:
    """Whether any task of the array is still pending/running; None when squeue cannot tell."""
    res = subprocess.run(["squeue", "--noheader", "--array", "--states=all", f"--jobs={job_id}", "--format=%T"],
                         capture_output=True, text=True)
    if res.returncode != 0:
        return False if "Invalid job id" in res.stderr else None
    return any(state not in FINAL_STATES for state in res.stdout.split())


def _collect(req: Request, paths: Paths, codes: Dict[int, Optional[int]]) -> None:
    """Read the status files that have appeared. Listing the directory (one READDIR) also makes an NFS
    client revalidate it, where stat-ing a missing name again would hit its cached negative entry."""
    try:
        present = set(os.listdir(paths.qdir))
    except OSError:
        return
    for i in req.ids:
        if i not in codes and paths.status(i).name in present:
            code = paths.read_status(i)
            if code is not None:
                codes[i] = code


def status_grace() -> float:
    return float(os.environ.get("PQM_SLURM_STATUS_GRACE", 90))


def wait(job_id: str, req: Request, paths: Paths, signals: Signals, prog: str) -> Dict[int, Optional[int]]:
    """Poll the status files (cheap) until all exist; now and then (1 s, growing to 30 s) ask squeue whether
    the missing ones can still come. When squeue says they cannot, wait up to the grace period for files
    another host wrote, then fall back to the logs' footers."""
    codes: Dict[int, Optional[int]] = {}
    delay, check_every, last_check, warned = 0.1, 1.0, time.time(), False
    while signals.received is None:
        _collect(req, paths, codes)
        if len(codes) == len(req.ids):
            break
        if time.time() - last_check > check_every:
            last_check, check_every, state = time.time(), min(check_every * 1.5, 30), queued(job_id)
            if state is None and not warned:
                print(f"{prog}: squeue cannot reach slurmctld; still waiting for job {job_id}", file=sys.stderr)
                warned = True
            if state is False:
                deadline = time.time() + status_grace()
                while len(codes) < len(req.ids) and time.time() < deadline and signals.received is None:
                    time.sleep(min(2.0, max(0.0, deadline - time.time())))
                    _collect(req, paths, codes)
                for i in req.ids:
                    if i not in codes:
                        codes[i] = paths.footer_status(i)
                break
        time.sleep(delay)
        delay = min(delay * 1.5, 2.0)
    return codes


def run(req: Request, prog: str) -> Dict[int, Optional[int]]:
    cfg = load_config(req.options.get("config"))
    paths = Paths(req)
    job: List[str] = []
    signals = Signals(prog, lambda: job and cancel(job[0], prog))
    job.append(submit(req, cfg, paths))
    if signals.received is not None:  # the signal came while sbatch ran: nothing was cancelled yet
        cancel(job[0], prog)
    print(f"{prog}: submitted Slurm job {job[0]} ({len(req.ids)} task(s)), logs {req.log}", file=sys.stderr)
    codes = wait(job[0], req, paths, signals, prog)
    signals.exit_if_received()
    failed = [i for i in req.ids if codes.get(i) != 0]
    if failed:
        print(f"{prog}: Slurm's own messages (time limit, memory, node failure) for those: "
              + " ".join(str(paths.slurm_output(i)) for i in failed), file=sys.stderr)
    return codes


def cancel(job_id: str, prog: str) -> None:
    try:
        subprocess.run(["scancel", job_id])
    except OSError as e:
        print(f"{prog}: could not run scancel ({e}): cancel job {job_id} by hand", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main("slurm.sh", run))
