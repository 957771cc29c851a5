"""Durable files: write to a temporary name in the same folder, fsync, rename, fsync the
folder, so a reader sees the old file or the new one, never a partial one. A failed fsync is
fatal (after it the page cache can no longer be trusted): it is never retried and trusted."""

from __future__ import annotations

import contextlib
import itertools
import os
from pathlib import Path

from busd.errors import FatalStorageError, StorageError

# Exports are for every reader, whatever busd's umask (the unit's keeps the catalog private).
READABLE_FILE = 0o644
READABLE_DIR = 0o755


def readable_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # a folder made by someone else keeps its mode
        folder.chmod(READABLE_DIR)


def fsync_path(path: Path, flags: int = os.O_RDONLY) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(folder: Path) -> None:
    fsync_path(folder, os.O_RDONLY | os.O_DIRECTORY)


def durable_replace(tmp: Path, final: Path) -> None:
    """fsync ``tmp``, rename it over ``final``, fsync the folder. A failed fsync is fatal."""
    with contextlib.suppress(OSError):
        os.chmod(tmp, READABLE_FILE)
    _fsync_temp(tmp)
    replace_synced(tmp, final)


def _fsync_temp(tmp: Path) -> None:
    try:
        fsync_path(tmp)
    except OSError as exc:
        # After a failed fsync the page cache can no longer be trusted (fsyncgate): exit.
        raise FatalStorageError(f"fsync of {tmp} failed: {exc.strerror}") from exc


def replace_synced(tmp: Path, final: Path) -> None:
    """Rename ``tmp`` (already fsynced) over ``final``, fsync the folder."""
    try:
        os.replace(tmp, final)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise StorageError(f"cannot rename {tmp.name} to {final}: {exc.strerror}") from exc
    try:
        fsync_dir(final.parent)
    except OSError as exc:
        raise FatalStorageError(f"fsync of {final.parent} failed: {exc.strerror}") from exc


_TEMP_NAMES = itertools.count()


def write_temp(path: Path, data: bytes) -> Path:
    """``data`` in a temporary file beside ``path``, fsynced, for :func:`replace_synced`. Its
    name is this call's own: two writes of one file from two threads never share it."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{next(_TEMP_NAMES)}")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise StorageError(f"cannot write {path}: {exc.strerror}") from exc
    with contextlib.suppress(OSError):
        os.chmod(tmp, READABLE_FILE)
    try:
        _fsync_temp(tmp)
    except FatalStorageError:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """``data`` in ``path``, atomically and durably."""
    replace_synced(write_temp(path, data), path)
