"""Atomic outputs: write to a temporary sibling, rename when complete.

A stage that is killed half-way therefore never leaves a file or directory that looks finished;
re-running it simply starts that unit of work again (and sweeps the unit's temporaries: discard_temporaries).
"""
from __future__ import annotations

import contextlib
import os
import shutil
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


def discard_temporaries(directory: PathLike) -> None:
    """Remove the temporary siblings (``.<name>.tmp-*``) that a process killed inside ``atomic_dir`` or
    ``atomic_file`` left in ``directory``. Only for a directory that no other process is writing: a unit of
    work calls it as it starts, before it writes anything there."""
    directory = Path(directory)
    if not directory.is_dir():
        return
    for tmp in directory.glob(".*.tmp-*"):
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
