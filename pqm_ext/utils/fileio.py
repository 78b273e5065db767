"""Atomic outputs: write to a temporary sibling, rename when complete.

A stage that is killed half-way therefore never leaves a file or directory that looks finished;
re-running it simply starts that unit of work again. A process killed inside one of these leaves its
temporary (``.<name>.tmp-*``, never the real name) behind; ``unit_of_work`` sweeps a unit's temporaries when the
unit starts again, under a lock that keeps a second process off the unit.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Iterator, Union

from pqm_ext.utils.errors import InputError

PathLike = Union[str, Path]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _publish(tmp: str, path: Path, mode: int) -> None:
    """Give the temporary file/dir the permissions a normal one would have, then rename it."""
    os.chmod(tmp, mode & ~_umask())
    os.replace(tmp, path)


@contextlib.contextmanager
def atomic_dir(path: PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that is renamed to ``path`` when the block succeeds."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path}: already exists")
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=_writable_parent(path)))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        shutil.rmtree(path)
    _publish(str(tmp), path, 0o777)


@contextlib.contextmanager
def atomic_file(path: PathLike, mode: str = "w", encoding: str = "utf-8") -> Iterator:
    """Open a temporary sibling of ``path`` for writing; rename it over ``path`` on success."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=_writable_parent(path))
    os.close(fd)
    try:
        kwargs = {} if "b" in mode else {"encoding": encoding}
        with open(tmp, mode, **kwargs) as f:
            yield f
        _publish(tmp, path, 0o666)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _writable_parent(path: Path) -> Path:
    """Create ``path``'s parent; an unwritable location is the user's input error, so say where."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if not os.access(path.parent, os.W_OK):
            raise PermissionError(f"no write permission for {path.parent}")
    except OSError as e:
        raise InputError(path, f"cannot write here: {e}") from e
    return path.parent


def write_text_atomic(path: PathLike, text: str) -> None:
    with atomic_file(path) as f:
        f.write(text)


LOCK = ".lock"


def discard_temporaries(directory: PathLike) -> None:
    """Remove the temporary siblings (``.<name>.tmp-*``) that a process killed inside ``atomic_dir`` or
    ``atomic_file`` left in ``directory``. Only for a directory no other process writes: see unit_of_work."""
    directory = Path(directory)
    if not directory.is_dir():
        return
    for tmp in directory.glob(".*.tmp-*"):
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()


@contextlib.contextmanager
def unit_of_work(directory: PathLike, *subdirs: str) -> Iterator[Path]:
    """Work on ``directory`` alone: hold an exclusive lock on ``<directory>/.lock`` (flock: the kernel drops it
    when the process ends, however it ends), then sweep the temporaries a killed earlier run left in it and in
    its ``subdirs``. Another process on the same unit (a job of a launcher that was killed with SIGKILL and so
    could not stop it, or a second run of the recipe) is refused with an error naming the unit and the host,
    pid (and Slurm job) that holds it, instead of writing over it."""
    directory = Path(directory)
    _writable_parent(directory / LOCK)
    with open(directory / LOCK, "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "unknown"
            raise InputError(directory, f"in use by another process ({holder}): a run still going, or a job "
                                        "left running by a killed one; let it finish or stop it") from None
        lock.seek(0)
        lock.truncate()
        job = os.environ.get("SLURM_JOB_ID")  # on a cluster the holder runs on a compute node, not here
        lock.write(f"host {socket.gethostname()}, pid {os.getpid()}{f', Slurm job {job}' if job else ''}\n")
        lock.flush()
        for d in (directory, *(directory / sub for sub in subdirs)):
            discard_temporaries(d)
        yield directory
