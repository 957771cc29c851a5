"""Check the files an event names (contract §3–§4): where they are, what they are.

Every fact recorded about a file (size, rows, columns, checksum) comes from one open file
descriptor, opened without following a final symlink and confirmed to lie inside an artifact
root, so a symlink swapped while busd looks cannot make it record one file and check another.
Runs on worker threads: pyarrow and hashlib release the GIL while they read.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import msgspec
import pyarrow as pa
import pyarrow.parquet as pq

from busd.errors import FileNotYetThere, InvalidEvent, Reason
from busd.events import Artifact, ArtifactEvent

ChecksumPolicy = Literal["always", "if_given", "never"]
_HASH_CHUNK = 1 << 20


@dataclass(frozen=True, slots=True)
class CheckedArtifact:
    """An artifact whose file was found and read; the row it becomes in ``artifacts_f``."""

    name: str
    path: str
    format: str
    rows: int
    bytes: int
    sha256: str | None
    columns: str
    schema_hash: str
    meta: str | None


def inside(path: str, roots: Sequence[Path]) -> bool:
    for root in roots:
        text = str(root)
        if path == text or path.startswith(text.rstrip(os.sep) + os.sep):
            return True
    return False


def resolve(raw: str, roots: Sequence[Path]) -> str:
    """Absolute, with ``..`` and symlinks resolved; must lie inside one of ``roots``."""
    path = Path(raw)
    if not path.is_absolute():
        path = roots[0] / path
    resolved = os.path.realpath(path)
    if not inside(resolved, roots):
        raise InvalidEvent(Reason.PATH_OUTSIDE_ROOTS,
                           f"{raw!r} resolves to {resolved!r}, outside the artifact roots")
    if not is_utf8(resolved):
        raise InvalidEvent(Reason.NOT_PARQUET,
                           f"{raw!r} resolves to {resolved!r}, a name that is not UTF-8")
    return resolved


def is_utf8(path: str) -> bool:
    """False for a name with bytes that are not UTF-8 (``os`` decodes them to surrogates):
    the catalog could not store it, and neither could a rejection's detail."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_artifact(
    art: Artifact, roots: Sequence[Path], checksum: ChecksumPolicy
) -> CheckedArtifact:
    """Check one artifact's file; raise InvalidEvent (or FileNotYetThere) when it fails."""
    fast = _open_fast(art.path, roots)
    if fast is not None:
        fd, actual = fast
        try:
            return _check_open_file(fd, actual, art, roots, checksum)
        finally:
            os.close(fd)
    # The careful path: every failure, and anything unusual, gets its precise reason here.
    for _attempt in range(3):
        try:
            resolved = resolve(art.path, roots)
        except OSError:  # a symlink on the path changed while realpath read it (3.11 raises)
            continue
        try:
            # O_NONBLOCK: opening a FIFO must not wait for a writer (no effect on regular files)
            fd = os.open(resolved, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except FileNotFoundError:
            raise FileNotYetThere(f"{art.name}: {resolved} does not exist") from None
        except OSError as exc:
            if exc.errno == errno.ELOOP:  # a symlink appeared after realpath: resolve again
                continue
            if exc.errno == errno.EACCES:
                raise InvalidEvent(Reason.FILE_MISSING,
                                   f"{art.name}: {resolved} is not readable by busd") from None
            raise InvalidEvent(Reason.NOT_PARQUET,
                               f"{art.name}: {resolved}: {exc.strerror}") from None
        try:
            return _check_open_file(fd, resolved, art, roots, checksum)
        finally:
            os.close(fd)
    raise InvalidEvent(Reason.PATH_OUTSIDE_ROOTS, f"{art.name}: {art.path!r} keeps changing")


def _open_fast(raw: str, roots: Sequence[Path]) -> tuple[int, str] | None:
    """The usual case in four syscalls instead of ``realpath``'s one per path component:
    an ``O_PATH`` handle (which opens nothing for I/O, so a device or FIFO is never touched),
    the kernel's own resolution of it, and a re-open of that same inode for reading. None
    means: let the careful path decide."""
    path = raw if raw.startswith("/") else os.path.join(roots[0], raw)
    try:
        handle = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except (OSError, ValueError):
        return None
    try:
        actual = os.readlink(f"/proc/self/fd/{handle}")
        if not inside(actual, roots) or not stat.S_ISREG(os.fstat(handle).st_mode):
            return None
        fd = os.open(f"/proc/self/fd/{handle}", os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return None
    finally:
        os.close(handle)
    return fd, actual


def _check_open_file(
    fd: int, resolved: str, art: Artifact, roots: Sequence[Path], checksum: ChecksumPolicy
) -> CheckedArtifact:
    try:
        actual = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        actual = resolved
    if not inside(actual, roots):
        raise InvalidEvent(Reason.PATH_OUTSIDE_ROOTS,
                           f"{art.name}: {art.path!r} was moved outside the roots while checked")
    if not is_utf8(actual):
        raise InvalidEvent(Reason.NOT_PARQUET, f"{art.name}: {actual!r} is not a UTF-8 name")
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise InvalidEvent(Reason.NOT_PARQUET, f"{art.name}: {actual} is not a regular file")
    if art.bytes is not None and art.bytes != st.st_size:
        raise InvalidEvent(Reason.SIZE_MISMATCH,
                           f"{art.name}: event says {art.bytes} bytes, file has {st.st_size}")
    rows, columns = _parquet_footer(fd, st.st_size, art.name, actual)
    if art.rows is not None and art.rows != rows:
        raise InvalidEvent(Reason.ROWS_MISMATCH,
                           f"{art.name}: event says {art.rows} rows, Parquet footer has {rows}")
    digest = art.sha256
    if checksum == "always" or (checksum == "if_given" and art.sha256 is not None):
        with os.fdopen(os.dup(fd), "rb") as handle:
            handle.seek(0)
            digest = hashlib.file_digest(handle, "sha256").hexdigest()
        if art.sha256 is not None and art.sha256 != digest:
            raise InvalidEvent(Reason.CHECKSUM_MISMATCH,
                               f"{art.name}: event says sha256 {art.sha256}, file has {digest}")
    columns_json = msgspec.json.encode(columns).decode()
    return CheckedArtifact(
        name=art.name,
        path=actual,
        format="parquet",
        rows=rows,
        bytes=st.st_size,
        sha256=digest,
        columns=columns_json,
        schema_hash=hashlib.sha256(columns_json.encode()).hexdigest()[:16],
        meta=None if art.meta is None else msgspec.json.encode(art.meta).decode(),
    )


_MAGIC = b"PAR1"


def _parquet_footer(fd: int, size: int, name: str, path: str) -> tuple[int, list[dict[str, str]]]:
    """Rows and columns from the footer, read with two ``pread`` calls on the checked fd.

    pyarrow parses the footer from a buffer (``PAR1`` + footer + length + ``PAR1``): no
    Python file object, whose every read re-takes the GIL (it was a quarter of busd's CPU)."""
    def bad(why: str) -> InvalidEvent:
        return InvalidEvent(Reason.NOT_PARQUET, f"{name}: {path} is not a Parquet file ({why})")

    if size < 12:
        raise bad(f"{size} bytes")
    if os.pread(fd, 4, 0) != _MAGIC:
        raise bad("no PAR1 magic at the start")
    tail = os.pread(fd, 8, size - 8)
    if len(tail) != 8 or tail[4:] != _MAGIC:
        raise bad("no PAR1 magic at the end")
    footer_len = int.from_bytes(tail[:4], "little")
    if footer_len <= 0 or footer_len > size - 12:
        raise bad(f"a footer of {footer_len} bytes in a file of {size}")
    footer = os.pread(fd, footer_len, size - 8 - footer_len)
    if len(footer) != footer_len:
        raise bad("the file shrank while it was read")
    try:
        meta = pq.read_metadata(pa.BufferReader(_MAGIC + footer + tail))
        schema = meta.schema.to_arrow_schema()
        rows = int(meta.num_rows)
    except (pa.ArrowException, OSError, ValueError, IndexError, TypeError) as exc:
        raise bad(str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from None
    if rows < 0:  # a damaged footer can say so; artifacts_f.rows would record it
        raise bad(f"its footer says {rows} rows")
    return rows, [{"name": f.name, "type": str(f.type)} for f in schema]


def check_event(
    event: ArtifactEvent, roots: Sequence[Path], checksum: ChecksumPolicy
) -> list[CheckedArtifact]:
    """All artifacts of an event, or the first permanent failure (a missing file comes last)."""
    checked: list[CheckedArtifact] = []
    missing: FileNotYetThere | None = None
    for art in event.artifacts:
        try:
            checked.append(check_artifact(art, roots, checksum))
        except FileNotYetThere as exc:
            missing = missing or exc
    if missing is not None:
        raise missing
    return checked
