"""The one atomic writer: every file the engine writes goes through ``atomic_output``.

A file is written under a hidden temporary folder next to its final place (same file system) and renamed onto
it only when complete; on any error it is removed, so a reader never sees half a file and a failed run leaves
nothing. Several outputs that belong together (a prediction's files, a cache entry's arrays and description) are
entered on one ``contextlib.ExitStack``: each is renamed only if the whole stack exits cleanly. A killed run's
temporary folder is removed by the next ``atomic_output`` in that folder (``remove_stale_temporaries``).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import socket
import time
from pathlib import Path
from typing import Iterator, Union

from ..errors import OutputExistsError

PathLike = Union[str, "os.PathLike[str]"]

#: Hidden folder ``atomic_output`` writes into, next to the outputs (same file system, so ``os.replace`` is atomic),
#: named ``<prefix><host>-<pid>``: the file inside keeps its final name (ITK picks the format by extension), and
#: neither the folder nor its content matches a glob such as ``*.nii.gz`` in the output folder.
TEMP_DIR_PREFIX = ".attention-unet-tmp-"
#: A temporary folder this old is stale whatever its pid (pids get reused; other hosts' pids cannot be checked).
STALE_TEMP_SECONDS = 24 * 3600
_HOST = hashlib.sha256(socket.gethostname().encode("utf-8", "replace")).hexdigest()[:8]
_TEMP_DIR = re.compile(re.escape(TEMP_DIR_PREFIX) + r"([0-9a-f]{8})-([0-9]+)$")


def temporary_path(path: PathLike) -> Path:
    """Where ``atomic_output`` writes ``path`` until it is complete: ``<folder>/.attention-unet-tmp-<host>-<pid>/
    <name>``."""
    path = Path(path)
    return path.parent / f"{TEMP_DIR_PREFIX}{_HOST}-{os.getpid()}" / path.name


def _pid_alive(pid: int) -> bool:
    if os.name == "nt":  # os.kill would terminate the process there; such folders go by age only
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. EPERM: a process of another user has this pid
        return True
    return True


def remove_stale_temporaries(folder: PathLike) -> None:
    """Remove the temporary folders ``atomic_output`` left in ``folder`` when its process was killed: only this
    tool's (named ``TEMP_DIR_PREFIX<host>-<pid>``), only when that process (on this host) is gone or the folder is
    older than ``STALE_TEMP_SECONDS``. Anything else in ``folder`` is never touched."""
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return
    for entry in entries:
        match = _TEMP_DIR.match(entry.name)
        if not match or not entry.is_dir(follow_symlinks=False):
            continue
        host, pid = match.group(1), int(match.group(2))
        if host == _HOST and pid == os.getpid():
            continue
        try:
            age = time.time() - entry.stat(follow_symlinks=False).st_mtime
        except OSError:
            continue
        if (host == _HOST and not _pid_alive(pid)) or age > STALE_TEMP_SECONDS:
            shutil.rmtree(entry.path, ignore_errors=True)


@contextlib.contextmanager
def atomic_output(path: PathLike, force: bool = False) -> Iterator[Path]:
    """Yield ``temporary_path(path)`` (in a hidden folder next to ``path``); on success it is renamed onto
    ``path``, on error removed. Stale temporaries of killed runs in that folder are removed first.

    Raises:
        OutputExistsError: ``path`` exists and ``force`` is false.
    """
    path = Path(path)
    if path.exists() and not force:
        raise OutputExistsError(f"{path} already exists; remove it or pass --force to overwrite")
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path.parent)
    partial = temporary_path(path)
    partial.parent.mkdir(exist_ok=True)
    if partial.parent.is_symlink():
        raise OSError(f"cannot write {path}: {partial.parent} is a symbolic link, not this tool's temporary folder")
    try:
        yield partial
        os.replace(partial, path)
    finally:
        if partial.exists():
            partial.unlink()
        with contextlib.suppress(OSError):  # still holds other outputs being written, or already gone
            partial.parent.rmdir()

