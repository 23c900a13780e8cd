"""The one atomic writer: every file the engine writes goes through ``atomic_output``.

A file is written under a hidden temporary folder next to its final place (same file system) and renamed onto
it only when complete; on any error it is removed, so a reader never sees half a file and a failed run leaves
nothing. Several outputs that belong together (a prediction's files, a cache entry's arrays and description) are
entered on one ``contextlib.ExitStack``: each is renamed only if the whole stack exits cleanly. A killed run's
temporary folder is removed by the next ``atomic_output`` in that folder (``remove_stale_temporaries``).
A folder staged at ``temporary_path`` (a model bundle) is put in place by ``replace_folder``.
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
#: Ending of the temporary folder (``<prefix><host>-<pid><suffix>``) a folder that ``replace_folder`` replaces waits
#: in between its two renames.
RETIRED_SUFFIX = "-retired"
_HOST = hashlib.sha256(socket.gethostname().encode("utf-8", "replace")).hexdigest()[:8]
_TEMP_DIR = re.compile(re.escape(TEMP_DIR_PREFIX) + r"([0-9a-f]{8})-([0-9]+)(" + re.escape(RETIRED_SUFFIX) + ")?$")


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
    """Remove the temporary folders ``atomic_output`` and ``replace_folder`` left in ``folder`` when their process
    was killed: only this tool's (named ``TEMP_DIR_PREFIX<host>-<pid>``, ``RETIRED_SUFFIX`` added for a replaced
    folder), only when that process (on this host) is gone or the folder is older than ``STALE_TEMP_SECONDS``. A
    replaced folder whose replacement never arrived (killed between the two renames) is moved back to its place
    instead of removed. Anything else in ``folder`` is never touched."""
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
            if match.group(3) and not _restore_retired(Path(entry.path), Path(folder)):
                continue  # what could not be moved back is the only copy: kept
            shutil.rmtree(entry.path, ignore_errors=True)


def _restore_retired(retired: Path, folder: Path) -> bool:
    """Move each folder ``retired`` holds back to ``folder`` where nothing took its place; False when one of them
    could not be moved."""
    try:
        children = list(retired.iterdir())
    except OSError:
        return False
    restored = True
    for child in children:
        target = folder / child.name
        if target.exists() or target.is_symlink():
            continue  # the replacement arrived: this is the replaced copy
        try:
            os.replace(child, target)
        except OSError:
            restored = False
    return restored


def replace_folder(staged: Path, directory: Path) -> None:
    """Put the complete folder ``staged`` (at ``temporary_path(directory)``) at ``directory``. A folder already
    there takes two renames, which ``atomic_output`` (a file) does not do: it is moved into
    ``<parent>/TEMP_DIR_PREFIX<host>-<pid>RETIRED_SUFFIX/`` first and removed once ``staged`` is in place; if the
    second rename fails it is moved back, and if the process is killed between the two,
    ``remove_stale_temporaries`` moves it back: the old folder is never lost."""
    if not directory.exists():
        os.replace(staged, directory)
        return
    holder = directory.parent / f"{TEMP_DIR_PREFIX}{_HOST}-{os.getpid()}{RETIRED_SUFFIX}"
    holder.mkdir(exist_ok=True)
    if holder.is_symlink():
        raise OSError(f"cannot replace {directory}: {holder} is a symbolic link, not this tool's temporary folder")
    retired = holder / directory.name
    os.replace(directory, retired)
    try:
        os.replace(staged, directory)
    except BaseException:
        os.replace(retired, directory)  # the old folder back in its place
        raise
    finally:
        if directory.exists():  # the new folder (the retired one goes) or the old one back; else keep the only copy
            shutil.rmtree(retired, ignore_errors=True)
            with contextlib.suppress(OSError):  # another folder this process replaces there waits in it
                holder.rmdir()


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

