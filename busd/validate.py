"""Check the files an event names (docs/reference/events.md): where they are, what they are.

Every fact recorded about a file (size, rows, columns, checksum) comes from one open file
descriptor, opened without following a final symlink and confirmed to lie inside an artifact
root, so a symlink swapped while busd looks cannot make it record one file and check another.
Runs in the file-check worker processes (:mod:`busd.checker`), or on threads with
``verify.processes = 0``.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import os
import stat
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import msgspec
import pyarrow as pa
import pyarrow.parquet as pq

from busd import faults
from busd.errors import FileNotYetThere, FileUnavailable, InvalidEvent, Reason
from busd.model import Artifact, ArtifactEvent

ChecksumPolicy = Literal["always", "if_given", "never"]
_HASH_CHUNK = 1 << 20
_READ_WHOLE = 1 << 20  # files up to this size are read in one call


def _nothing() -> None:
    pass


# called after each chunk a check hashes: a file-check worker tells busd from it that a long
# hash advances, so only a read that is truly stuck looks like one (set by busd.checker)
on_read: Callable[[], None] = _nothing


class CheckedArtifact(msgspec.Struct, frozen=True, array_like=True):
    """An artifact whose file was found and read; the row it becomes in ``artifacts_f``.
    (A Struct: worker processes send these back as msgpack arrays.)"""

    name: str
    path: str
    format: str
    rows: int
    bytes: int
    sha256: str | None
    columns: str
    schema_hash: str
    meta: str | None
    # The file's identity when it was checked (``st_dev``, ``st_ino``, ``st_mtime_ns``,
    # ``st_ctime_ns``; its size is ``bytes``), and whether ``sha256`` was computed from it. A
    # replay skips the check of a file whose ``stat`` still says the same (git's index rule);
    # None when the file had changed too recently for its times to prove anything since.
    dev: int | None = None
    ino: int | None = None
    mtime_ns: int | None = None
    ctime_ns: int | None = None
    hashed: bool = False


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
        raise InvalidEvent(
            Reason.PATH_OUTSIDE_ROOTS,
            f"{raw!r} resolves to {resolved!r}, outside the artifact roots",
        )
    if not is_utf8(resolved):
        raise InvalidEvent(
            Reason.NOT_PARQUET, f"{raw!r} resolves to {resolved!r}, a name that is not UTF-8"
        )
    return resolved


def is_utf8(path: str) -> bool:
    """False for a name with bytes that are not UTF-8 (``os`` decodes them to surrogates):
    the catalog could not store it, and neither could a rejection's detail."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# errors that say something about the path itself, not about the machine reading it
_ABOUT_THE_PATH = frozenset(
    {
        errno.ENAMETOOLONG,
        errno.ENOTDIR,
        errno.ENXIO,
        errno.ENODEV,
        errno.EISDIR,
        errno.EINVAL,
        errno.EOVERFLOW,
        errno.EFBIG,
        errno.ELOOP,
    }
)
# verdicts about what a file holds: final only once it has stopped changing
CONTENT_REASONS = frozenset(
    {Reason.SIZE_MISMATCH, Reason.CHECKSUM_MISMATCH, Reason.NOT_PARQUET, Reason.ROWS_MISMATCH}
)


def check_artifact(
    art: Artifact, roots: Sequence[Path], checksum: ChecksumPolicy, settle_s: float = 0.0
) -> CheckedArtifact:
    """Check one artifact's file; raise InvalidEvent (or FileNotYetThere) when it fails, and
    FileUnavailable when the machine failed to read it."""
    fast = _open_fast(art.path, roots)
    if fast is not None:
        fd, actual, st = fast
        try:
            return _judge(fd, actual, st, art, checksum, settle_s)
        finally:
            os.close(fd)
    # The careful path: every failure, and anything unusual, gets its precise reason here.
    failed: OSError | None = None
    for _attempt in range(3):
        try:
            resolved = resolve(art.path, roots)
        except OSError as exc:  # a symlink on the path changed while realpath read it (3.11 raises)
            failed = exc
            continue
        try:
            # O_NONBLOCK: opening a FIFO must not wait for a writer (no effect on regular files)
            fd = os.open(resolved, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as exc:
            if exc.errno == errno.ELOOP:  # a symlink appeared after realpath: resolve again
                continue
            raise _os_error(exc, art.name, resolved, roots) from None
        try:
            try:
                actual, st = _confirm_open_file(fd, resolved, art, roots)
            except OSError as exc:
                raise _os_error(exc, art.name, resolved, roots) from None
            return _judge(fd, actual, st, art, checksum, settle_s)
        finally:
            os.close(fd)
    if failed is not None and failed.errno not in _ABOUT_THE_PATH:
        raise _os_error(failed, art.name, art.path, roots)
    raise InvalidEvent(Reason.PATH_OUTSIDE_ROOTS, f"{art.name}: {art.path!r} keeps changing")


def _os_error(
    exc: OSError, name: str, path: str, roots: Sequence[Path] = ()
) -> InvalidEvent | FileUnavailable:
    """What an error from opening or reading a file means for its event."""
    if exc.errno in (errno.ENOENT, errno.EACCES, errno.EPERM):
        down = _root_down(path, roots)
        if down is not None:  # every file under it fails alike: the machine's fault
            return FileUnavailable(f"{name}: {path}: {down}")
    if exc.errno == errno.ENOENT:
        return FileNotYetThere(f"{name}: {path} does not exist")
    if exc.errno in (errno.EACCES, errno.EPERM):
        return FileNotYetThere(f"{name}: {path} is not readable by busd", Reason.FILE_UNREADABLE)
    if exc.errno in _ABOUT_THE_PATH:
        return InvalidEvent(Reason.NOT_PARQUET, f"{name}: {path}: {exc.strerror}")
    code = errno.errorcode.get(exc.errno or 0, "no errno")
    return FileUnavailable(f"{name}: {path}: {exc.strerror or exc} ({code})")


def _root_down(path: str, roots: Sequence[Path]) -> str | None:
    """Why busd cannot reach the artifact root that holds ``path`` (a share unmounted, its
    permissions changed), or None when it can: then a missing or unreadable file is the
    event's (a reviewer's script: with the root made unreadable every event was rejected
    `file_unreadable` once ``verify.file_wait_s`` ran out)."""
    for root in roots:
        if inside(path, [root]) and not os.access(root, os.X_OK):
            if not os.path.isdir(root):
                return f"the artifact root {root} is gone"
            return f"busd cannot enter the artifact root {root}"
    return None


def _judge(
    fd: int,
    actual: str,
    st: os.stat_result,
    art: Artifact,
    checksum: ChecksumPolicy,
    settle_s: float,
) -> CheckedArtifact:
    """The file's checks, where a failed read is the machine's fault and a content verdict
    on a file changed less than ``settle_s`` ago is not final yet (a producer that
    publishes before its file is complete, or storage that shows it late)."""
    try:
        return _check_file(fd, actual, st, art, checksum)
    except OSError as exc:  # the file is open: a failed read is the machine's, whatever errno
        code = errno.errorcode.get(exc.errno or 0, "no errno")
        if exc.errno in (errno.EACCES, errno.EPERM, errno.ENOENT):
            raise _os_error(exc, art.name, actual) from None
        raise FileUnavailable(f"{art.name}: {actual}: {exc.strerror or exc} ({code})") from None
    except InvalidEvent as exc:
        if settle_s <= 0 or exc.reason not in CONTENT_REASONS:
            raise
        try:
            after = os.fstat(fd)
        except OSError:
            after = st
        changed_ns = max(st.st_mtime_ns, st.st_ctime_ns, after.st_mtime_ns, after.st_ctime_ns)
        if time.time_ns() - changed_ns < settle_s * 1e9:
            raise FileNotYetThere(exc.detail, exc.reason) from None
        raise


def _open_fast(raw: str, roots: Sequence[Path]) -> tuple[int, str, os.stat_result] | None:
    """The usual case in five syscalls instead of ``realpath``'s one per path component:
    an ``O_PATH`` handle (which opens nothing for I/O, so a device or FIFO is never touched),
    the kernel's own resolution of it and its ``fstat``, and a re-open of that same inode for
    reading. None means: let the careful path decide."""
    path = raw if raw.startswith("/") else os.path.join(roots[0], raw)
    try:
        handle = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except (OSError, ValueError):
        return None
    try:
        actual = os.readlink(f"/proc/self/fd/{handle}")
        st = os.fstat(handle)
        if not stat.S_ISREG(st.st_mode) or not inside(actual, roots) or not is_utf8(actual):
            return None
        fd = os.open(f"/proc/self/fd/{handle}", os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return None
    finally:
        os.close(handle)
    return fd, actual, st


def _confirm_open_file(
    fd: int, resolved: str, art: Artifact, roots: Sequence[Path]
) -> tuple[str, os.stat_result]:
    """After ``realpath`` and ``open``: where the opened file really is, and what it is."""
    try:
        actual = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        actual = resolved
    if not inside(actual, roots):
        raise InvalidEvent(
            Reason.PATH_OUTSIDE_ROOTS,
            f"{art.name}: {art.path!r} was moved outside the roots while checked",
        )
    if not is_utf8(actual):
        raise InvalidEvent(Reason.NOT_PARQUET, f"{art.name}: {actual!r} is not a UTF-8 name")
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise InvalidEvent(Reason.NOT_PARQUET, f"{art.name}: {actual} is not a regular file")
    return actual, st


def _check_file(
    fd: int, actual: str, st: os.stat_result, art: Artifact, checksum: ChecksumPolicy
) -> CheckedArtifact:
    """Size, footer and checksum of a regular file inside the roots, open on ``fd``."""
    size = st.st_size
    if art.bytes is not None and art.bytes != size:
        raise InvalidEvent(
            Reason.SIZE_MISMATCH, f"{art.name}: event says {art.bytes} bytes, file has {size}"
        )
    # a small file is read whole, in one call, for both the footer and the checksum
    whole = os.pread(fd, size, 0) if size <= _READ_WHOLE else None
    if whole is not None and len(whole) != size:
        raise InvalidEvent(Reason.NOT_PARQUET, f"{art.name}: {actual} shrank while it was read")
    rows, columns_json, schema_hash = _parquet_footer(fd, size, whole, art.name, actual)
    if art.rows is not None and art.rows != rows:
        raise InvalidEvent(
            Reason.ROWS_MISMATCH,
            f"{art.name}: event says {art.rows} rows, Parquet footer has {rows}",
        )
    digest = art.sha256
    hashed = wants_hash(art, checksum)
    if hashed:
        digest = _sha256(fd, whole)
        if art.sha256 is not None and art.sha256 != digest:
            raise InvalidEvent(
                Reason.CHECKSUM_MISMATCH,
                f"{art.name}: event says sha256 {art.sha256}, file has {digest}",
            )
    return CheckedArtifact(
        name=art.name,
        path=actual,
        format="parquet",
        rows=rows,
        bytes=size,
        sha256=digest,
        columns=columns_json,
        schema_hash=schema_hash,
        meta=None if art.meta is None else msgspec.json.encode(art.meta).decode(),
        hashed=hashed,
        **identity(st, time.time_ns()),
    )


def wants_hash(art: Artifact, checksum: ChecksumPolicy) -> bool:
    """Whether a check computes the file's SHA-256 (else it records the event's, if any)."""
    return checksum == "always" or (checksum == "if_given" and art.sha256 is not None)


# A file changed shortly before it was checked can change again within the same tick of its
# filesystem's clock and keep the same times, so its identity proves nothing later (git's
# "racy clean" entries): none is recorded then. Filesystems whose times come in whole
# milliseconds or coarser (FAT, some network filesystems) get a wider margin.
RACY_NS = 100_000_000
RACY_COARSE_NS = 2_000_000_000


def identity(st: os.stat_result, now_ns: int) -> dict[str, int]:
    """The ``dev``, ``ino``, ``mtime_ns`` and ``ctime_ns`` of a checked file, or nothing
    when it changed too recently (see ``RACY_NS``)."""
    mtime, ctime = st.st_mtime_ns, st.st_ctime_ns
    coarse = mtime % 1_000_000 == 0 and ctime % 1_000_000 == 0
    if now_ns - max(mtime, ctime) < (RACY_COARSE_NS if coarse else RACY_NS):
        return {}
    return {"dev": st.st_dev, "ino": st.st_ino, "mtime_ns": mtime, "ctime_ns": ctime}


def unchanged(
    art: Artifact,
    recorded: CheckedArtifact,
    roots: Sequence[Path],
    checksum: ChecksumPolicy,
) -> CheckedArtifact | None:
    """The check of ``art`` that ``recorded`` still stands for, or None: check the file.

    ``recorded`` is what checking this same artifact of this same event found before. It
    stands when ``stat`` of the artifact's path still gives the identity recorded then (device,
    inode, size, modification and change times in nanoseconds: a file rewritten, touched,
    replaced or moved has another), the path still resolves where it did, inside the roots,
    and the checksum policy needs no SHA-256 that was not computed then. ``stat`` follows a
    final symlink and ``lstat`` does not, so a path that became a symlink is checked again."""
    if recorded.dev is None or recorded.name != art.name:
        return None
    if wants_hash(art, checksum) and (
        not recorded.hashed or (art.sha256 is not None and art.sha256 != recorded.sha256)
    ):
        return None
    if (art.bytes is not None and art.bytes != recorded.bytes) or (
        art.rows is not None and art.rows != recorded.rows
    ):
        return None
    path = art.path if art.path.startswith("/") else os.path.join(roots[0], art.path)
    try:
        if path == recorded.path:
            st = os.lstat(path)
        elif os.path.realpath(path) == recorded.path:
            st = os.stat(path)
        else:
            return None
    except (OSError, ValueError):
        return None
    if (
        st.st_ino != recorded.ino
        or st.st_mtime_ns != recorded.mtime_ns
        or st.st_ctime_ns != recorded.ctime_ns
        or st.st_size != recorded.bytes
        or st.st_dev != recorded.dev
        or not stat.S_ISREG(st.st_mode)
        or not inside(recorded.path, roots)
    ):
        return None
    sha256 = recorded.sha256 if wants_hash(art, checksum) else art.sha256
    if sha256 == recorded.sha256 and art.meta is None and recorded.meta is None:
        return recorded
    return msgspec.structs.replace(
        recorded,
        sha256=sha256,
        meta=None if art.meta is None else msgspec.json.encode(art.meta).decode(),
    )


def _sha256(fd: int, whole: bytes | None) -> str:
    if whole is not None:
        return hashlib.sha256(whole).hexdigest()
    h = hashlib.sha256()
    offset = 0
    while chunk := os.pread(fd, _HASH_CHUNK, offset):  # hashlib releases the GIL per chunk
        h.update(chunk)
        offset += len(chunk)
        on_read()
    return h.hexdigest()


_MAGIC = b"PAR1"


def _parquet_footer(
    fd: int, size: int, whole: bytes | None, name: str, path: str
) -> tuple[int, str, str]:
    """Rows, columns (JSON) and schema hash from the footer: from ``whole`` (the file's
    bytes) when given, else from two ``pread`` calls on the checked fd.

    pyarrow parses the footer from a buffer (the whole file, or ``PAR1`` + footer + length +
    ``PAR1``): no Python file object, whose every read re-takes the GIL (it was a quarter of
    busd's CPU). Its reader is opened directly: ``pq.read_metadata`` wraps it in a
    ``ParquetFile`` whose Python set-up cost twice the parse itself."""

    def bad(why: str) -> InvalidEvent:
        return InvalidEvent(Reason.NOT_PARQUET, f"{name}: {path} is not a Parquet file ({why})")

    if size < 12:
        raise bad(f"{size} bytes")
    head = whole[:4] if whole is not None else os.pread(fd, 4, 0)
    if head != _MAGIC:
        raise bad("no PAR1 magic at the start")
    tail = whole[-8:] if whole is not None else os.pread(fd, 8, size - 8)
    if len(tail) != 8 or tail[4:] != _MAGIC:
        raise bad("no PAR1 magic at the end")
    footer_len = int.from_bytes(tail[:4], "little")
    if footer_len <= 0 or footer_len > size - 12:
        raise bad(f"a footer of {footer_len} bytes in a file of {size}")
    start = size - 8 - footer_len
    footer = whole[start : size - 8] if whole is not None else os.pread(fd, footer_len, start)
    if len(footer) != footer_len:
        raise bad("the file shrank while it was read")
    try:
        reader = pq.ParquetReader()
        reader.open(pa.BufferReader(whole if whole is not None else _MAGIC + footer + tail))
        meta = reader.metadata
        schema = meta.schema.to_arrow_schema()
        rows = int(meta.num_rows)
        columns = tuple((f.name, str(f.type)) for f in schema)
    except (pa.ArrowException, OSError, ValueError, IndexError, TypeError) as exc:
        why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if isinstance(exc, pa.ArrowMemoryError) or "bad_alloc" in why:  # the machine's
            raise FileUnavailable(
                f"{name}: {path}: out of memory reading its footer: {why}"
            ) from None
        raise bad(why) from None
    if rows < 0:  # a damaged footer can say so; artifacts_f.rows would record it
        raise bad(f"its footer says {rows} rows")
    columns_json, schema_hash = _columns(columns)
    return rows, columns_json, schema_hash


@functools.lru_cache(maxsize=256)
def _columns(columns: tuple[tuple[str, str], ...]) -> tuple[str, str]:
    """Columns as JSON (name and type of each) and their hash; producers write few schemas.
    Keyed by the (name, type) pairs: hashing a ``pa.Schema`` cost more than making them."""
    columns_json = msgspec.json.encode([{"name": n, "type": t} for n, t in columns]).decode()
    return columns_json, hashlib.sha256(columns_json.encode()).hexdigest()[:16]


def check_event(
    event: ArtifactEvent, roots: Sequence[Path], checksum: ChecksumPolicy
) -> list[CheckedArtifact]:
    """All artifacts of an event, or the first permanent failure (a missing file comes last)."""
    return check_artifacts(event.artifacts, roots, checksum)


def check_artifacts(
    artifacts: Sequence[Artifact],
    roots: Sequence[Path],
    checksum: ChecksumPolicy,
    settle_s: float = 0.0,
) -> list[CheckedArtifact]:
    """Every artifact checked; of several failures the first permanent one wins, then an
    error of the machine (nothing is known yet), then a file still awaited."""
    checked: list[CheckedArtifact] = []
    missing: FileNotYetThere | None = None
    unavailable: FileUnavailable | None = None
    for art in artifacts:
        faults.hit_for("in_checker", art.path)
        try:
            checked.append(check_artifact(art, roots, checksum, settle_s))
        except FileNotYetThere as exc:
            missing = missing or exc
        except FileUnavailable as exc:
            unavailable = unavailable or exc
    if unavailable is not None:
        raise unavailable
    if missing is not None:
        raise missing
    return checked
