"""What every backend shares: the command line, JOB substitution, the job log and the failure report.

The interface is Kaldi's (run.pl, slurm.pl), so recipes and habits carry over:
    LAUNCHER [options] JOB=1:N log/name.JOB.log command args...
    LAUNCHER [options] log/name.log command args...
"""
from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

USAGE = """\
usage: PROG [options] JOB=1:N log/name.JOB.log command args...
       PROG [options] log/name.log command args...
"""
HELP = """\
options (--foo-bar is accepted for --foo_bar, --opt=value for --opt value):
  --mem 4G  --gpu N  --num_threads K  --max_jobs_run P  --time T  --config conf/slurm.conf
  --jobs_per_gpu J  (local: up to J jobs share each set of --gpu N devices; Slurm ignores it)
  (slurm.sh also takes any --NAME VALUE its config has an 'option NAME=...' rule for)
JOB (any NAME=a:b works) is replaced where it is a whole word in the log path and the command
($JOB and ${JOB} are left to the shell) and exported as an environment variable.
The command runs under bash -c. A single argument is run as it is (pipes, quotes, && work inside
it); of several arguments, those without white space are passed unquoted (so \\| and \\> act as
shell operators, as in Kaldi) and the others are quoted.
Exit status: 0 when every job succeeded, 1 when one failed (their logs are listed), 2 on bad usage.
"""

RANGE_RE = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)=(\d+)(?::(\d+))?")


def _int(minimum: int) -> Callable[[str], int]:
    def convert(value: str) -> int:
        n = int(value)
        if n < minimum:
            raise ValueError(value)
        return n
    return convert


# Generic options every backend accepts; each backend decides what they mean (see its docstring).
OPTIONS: Dict[str, Callable[[str], object]] = {
    "mem": str, "gpu": _int(0), "num_threads": _int(1), "max_jobs_run": _int(1), "time": str, "config": str,
    "jobs_per_gpu": _int(1),
}

# Processes started by run_job, so that a signal handler can stop them (and any started after it ran).
RUNNING: set = set()
STOPPING = threading.Event()


class UsageError(Exception):
    """Bad command line or configuration: reported with exit status 2."""


class LaunchError(Exception):
    """The backend could not run the jobs at all (e.g. sbatch refused them): exit status 1."""


def substitute(text: str, var: Optional[str], value: object) -> str:
    """Replace the whole word ``var`` by ``value``; ``$var`` and ``${var}`` stay for the shell."""
    if var is None:
        return text
    return re.sub(rf"(?<!\$)(?<!\$\{{)\b{var}\b", str(value), text)


def join_command(args: List[str]) -> str:
    """Kaldi's rule: one argument is a shell script; else quote only the arguments with white space."""
    if len(args) == 1:
        return args[0]
    return " ".join(a if a and not re.search(r"\s", a) else shlex.quote(a) for a in args)


@dataclass
class Request:
    """One launcher call: options, the job range and the log and command templates."""

    log: str
    command: str
    var: Optional[str] = None
    first: int = 1
    last: int = 1
    options: dict = field(default_factory=dict)
    site_options: dict = field(default_factory=dict)  # --name value outside OPTIONS: a Slurm config may map them

    def check_no_site_options(self) -> None:
        """Backends without a scheduler config know only OPTIONS: anything else is a typo."""
        if self.site_options:
            name = next(iter(self.site_options))
            raise UsageError(f"unknown option --{name} (known: {', '.join('--' + o for o in OPTIONS)}; "
                             f"other names only through a Slurm config's 'option {name}=...' rule)")

    @property
    def ids(self) -> range:
        return range(self.first, self.last + 1)

    def log_for(self, i: int) -> str:
        return substitute(self.log, self.var, i)

    def command_for(self, i: int) -> str:
        return substitute(self.command, self.var, i)

    def env_for(self, i: int) -> dict:
        env = dict(os.environ)
        if self.var:
            env[self.var] = str(i)
        if "num_threads" in self.options:
            env["OMP_NUM_THREADS"] = str(self.options["num_threads"])
        return env


def parse_args(argv: List[str]) -> Request:
    """Options and at most one NAME=a:b range, in any order, then the log path and the command."""
    args, options, site, var, first, last = list(argv), {}, {}, None, 1, 1
    while args:
        arg = args[0]
        if arg.startswith("--"):
            args.pop(0)
            name, eq, value = arg[2:].partition("=")
            name = name.replace("-", "_")
            if not name.isidentifier():
                raise UsageError(f"bad option {arg}")
            if not eq:
                if not args:
                    raise UsageError(f"option {arg} needs a value")
                value = args.pop(0)
            if name not in OPTIONS:
                site[name] = value
                continue
            try:
                options[name] = OPTIONS[name](value)
            except ValueError:
                raise UsageError(f"bad value for --{name}: {value!r}") from None
        elif var is None and "=" in arg and "/" not in arg:
            args.pop(0)
            m = RANGE_RE.fullmatch(arg)
            if not m:
                raise UsageError(f"bad job range {arg!r}: expected e.g. JOB=1:4")
            var, first = m[1], int(m[2])
            last = int(m[3]) if m[3] else first
            if last < first:
                raise UsageError(f"bad job range {arg!r}: {last} < {first}")
        else:
            break
    if not args:
        raise UsageError("missing log file and command")
    log = args.pop(0)
    if log.startswith("-"):
        raise UsageError(f"{log!r} is not a log path: options are --name value; scheduler flags such as "
                         "Kaldi's '-p gpu' belong in the Slurm config (conf/slurm.conf)")
    if not args:
        raise UsageError("missing command")
    if var is None and re.search(r"\bJOB\b", log):
        raise UsageError(f"log path {log} contains JOB but no JOB=1:N range was given")
    if var is not None and last > first and not re.search(rf"\b{var}\b", log):
        raise UsageError(f"{last - first + 1} jobs would share the log {log}: put {var} in its name")
    command = join_command(args)
    if var is not None and re.search(rf"(?<![$\w{{]){var}\w|\w{var}\b", command):
        print(f"warning: {var} inside a word of the command is not replaced (only a whole word is, e.g. "
              f"out.{var}.ark, not out_{var}.ark)", file=sys.stderr)
    return Request(log=log, command=command, var=var, first=first, last=last, options=options, site_options=site)


def _now() -> str:
    return time.strftime("%a %b %d %H:%M:%S %Z %Y")


def run_job(command: str, log: str, env: dict, threads: int = 1, echo: bool = False,
            info: List[str] = ()) -> int:
    """Run ``bash -c command`` with its output in ``log`` between Kaldi's header and footer; return its code."""
    path = Path(log)
    path.parent.mkdir(parents=True, exist_ok=True)
    start = time.time()
    with open(path, "wb") as f:
        header = "".join(f"# {line}\n" for line in [command, f"Started at {_now()}", *info])
        f.write(f"{header}#\n".encode())
        f.flush()
        out = subprocess.PIPE if echo else f
        # A session of its own: a signal handler can stop the job's whole process group.
        proc = subprocess.Popen(["bash", "-c", command], stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, env=env, start_new_session=True)
        RUNNING.add(proc)
        if STOPPING.is_set():
            terminate_running()
        try:
            if echo:
                for line in proc.stdout:
                    f.write(line)
                    sys.stdout.buffer.write(line)
                    sys.stdout.flush()
            code = proc.wait()
        finally:
            RUNNING.discard(proc)
        code = 128 - code if code < 0 else code  # killed by a signal: report it the way bash does
        elapsed = round(time.time() - start)
        f.write(f"# Accounting: time={elapsed} threads={threads}\n"
                f"# Ended (code {code}) at {_now()}, elapsed time {elapsed} seconds\n".encode())
    return code


def terminate_running() -> None:
    STOPPING.set()
    for proc in list(RUNNING):
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass


class Signals:
    """Catches SIGINT/SIGTERM/SIGHUP: calls ``cleanup`` (stop the jobs, cancel the array) and remembers the
    signal, so the backend can let its jobs write their log footers before :meth:`exit_if_received`.
    SIGHUP is the closed terminal or dropped ssh session: the jobs must not outlive it unseen."""

    def __init__(self, prog: str, cleanup: Callable[[], None]):
        self.received: Optional[int] = None

        def handler(signum, frame):
            print(f"{prog}: got {signal.Signals(signum).name}, stopping the jobs", file=sys.stderr)
            self.received = signum
            cleanup()
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, handler)

    def exit_if_received(self) -> None:
        if self.received is not None:
            sys.exit(128 + self.received)


# What bash's 128+N codes usually mean for a job (Kaldi's slurm.pl guesses the same way).
CODE_HINTS = {137: " (SIGKILL: out of memory, or past its time limit?)",
              143: " (SIGTERM: cancelled, past its time limit, or preempted?)"}


def report(prog: str, req: Request, codes: Dict[int, Optional[int]]) -> int:
    """Print each failed job and its log to stderr; the launcher's exit status."""
    failed = [i for i in req.ids if codes.get(i) != 0]
    for i in failed:
        code = codes.get(i)
        what = "never ran (no exit status)" if code is None else f"failed with code {code}{CODE_HINTS.get(code, '')}"
        job = f"job {req.var}={i}" if req.var else "job"
        print(f"{prog}: {job} {what}, log: {req.log_for(i)}", file=sys.stderr)
    if failed:
        ids = ",".join(map(str, failed))
        print(f"{prog}: {len(failed)} / {len(req.ids)} jobs failed ({req.var or 'JOB'}={ids})", file=sys.stderr)
    return 1 if failed else 0


def main(prog: str, backend: Callable[[Request, str], Dict[int, Optional[int]]],
         argv: Optional[List[str]] = None) -> int:
    """Parse, run through ``backend`` (returns exit code per job id, None if it never ran), report."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(USAGE.replace("PROG", prog) + HELP + "\n" + (sys.modules[backend.__module__].__doc__ or ""))
        return 0
    try:
        req = parse_args(argv)
        codes = backend(req, prog)
    except UsageError as e:
        print(f"{prog}: error: {e}\n{USAGE.replace('PROG', prog)}(--help for more)", file=sys.stderr)
        return 2
    except LaunchError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 1
    return report(prog, req, codes)
