# Durable file primitives: atomic no-clobber writes, atomic replacement, fsync'ed directories.
# Knows nothing of keys or formats; every caller that must survive a crash writes through here.
"""Atomic and durable file writes, and bounded reads of small files.

A write goes to a temporary file (named with our pid, so a crash's leftovers can
be told from a write in progress), is fsync'ed, then linked (no clobber) or
renamed (replace) to its final name, and the directory is fsync'ed. A crash at
any instant leaves the old state or the new one, never a torn file.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
import uuid
from pathlib import Path

log = logging.getLogger("kmsd.files")


def read_small_text_file(
    path: Path, limit: int, *, regular_file_only: bool = False
) -> tuple[os.stat_result, bytes]:
    """The status and contents of a small file an operator names (a config, an ACL).

    Read to its end as any file (``--config <(...)`` and ``/dev/stdin`` work), but a
    device that never ends (``/dev/zero``) is an ``OSError`` at ``limit`` bytes, not
    all of memory. With ``regular_file_only``, anything else is an ``OSError`` at
    once (opened non-blocking: a FIFO with no writer cannot hang the open). The status
    is the open file's, for a mode check on what was read. A NUL in the path is an
    ``OSError`` too.
    """
    flags = os.O_RDONLY | os.O_CLOEXEC | (os.O_NONBLOCK if regular_file_only else 0)
    try:
        fd = os.open(path, flags)
    except ValueError:
        raise OSError(errno.EINVAL, "its path holds a NUL byte") from None
    try:
        status = os.fstat(fd)
        if regular_file_only and not stat.S_ISREG(status.st_mode):
            raise OSError(errno.EINVAL, "it is not a regular file")
        chunks: list[bytes] = []
        size = 0
        while size <= limit and (chunk := os.read(fd, limit + 1 - size)):
            chunks.append(chunk)
            size += len(chunk)
    finally:
        os.close(fd)
    if size > limit:
        raise OSError(errno.EFBIG, f"larger than {limit} bytes")
    return status, b"".join(chunks)


def fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_private_dirs(path: Path, stop_at: Path) -> None:
    """Create ``path`` and missing parents below ``stop_at`` as 0700, durably."""
    missing: list[Path] = []
    probe = path
    while probe != stop_at and not probe.exists():
        missing.append(probe)
        probe = probe.parent
    for directory in reversed(missing):
        try:
            directory.mkdir(mode=0o700)
        except FileExistsError:
            continue
        fsync_directory(directory.parent)


TEMPORARY_PREFIX = ".tmp-"


def temporary_path(path: Path) -> Path:
    """A temporary name beside ``path`` carrying our pid, so leftovers can be told apart."""
    return path.parent / f"{TEMPORARY_PREFIX}{os.getpid()}-{path.name}-{uuid.uuid4().hex}"


def remove_stale_temporaries(directory: Path, names: list[str]) -> None:
    """Unlink temporary files left by a writer that died (another pid) in ``directory``.

    The store is locked by one daemon, so a temporary file of another pid can
    only be the remains of a crash; ours may belong to a write in progress.
    """
    ours = f"{TEMPORARY_PREFIX}{os.getpid()}-"
    for name in names:
        if name.startswith(TEMPORARY_PREFIX) and not name.startswith(ours):
            with contextlib.suppress(FileNotFoundError):
                (directory / name).unlink()
                log.info("removed %s, left by an interrupted write", directory / name)


def write_fsynced(path: Path, data: bytes) -> None:
    """Create ``path`` (0600, must not exist) holding ``data``, fsync'ed; the directory is not."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException:
        path.unlink(missing_ok=True)  # ours (O_EXCL): a full disk must not collect leftovers
        raise
    finally:
        os.close(fd)


def write_new_file(path: Path, data: bytes) -> None:
    """Write ``data`` to the new file ``path`` atomically and durably; never overwrite.

    Raises :class:`FileExistsError` when ``path`` already exists.
    """
    temporary = temporary_path(path)
    write_fsynced(temporary, data)
    try:
        os.link(temporary, path)
    finally:
        os.unlink(temporary)
    fsync_directory(path.parent)


def replace_file(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically and durably, replacing any old content."""
    temporary = temporary_path(path)
    write_fsynced(temporary, data)
    try:
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)  # a failing disk must not collect leftovers
        raise
    fsync_directory(path.parent)
