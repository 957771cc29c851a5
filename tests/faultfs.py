"""A FUSE filesystem for the tests: a passthrough over a backing folder whose files can be
made to fail the way real storage fails (EIO, EACCES, a read that stalls, a file that is not
there), switched from the test while busd reads them.

It runs in a process of its own (``python faultfs.py BACKING MOUNTPOINT CONTROL ro|rw``) so that
libfuse's signal handlers and a stalled request never touch the test process. Faults live in
the JSON file CONTROL, re-read whenever it changes: ``{"rel/path": {"open": errno,
"read": errno, "stall": true, "hide": true, "rate": bytes_per_s, "fsync_s": seconds}}``; the
last makes each fsync of a file on a writable mount (``rw``) take that long. A stalled read waits
until its fault is cleared, for at most ``STALL_MAX_S``; a ``rate`` makes every read take as
long as that many bytes a second allow (a slow disk that keeps going). Two keys narrow a
fault: ``"pid": N`` serves it to process N only (its threads included; other processes read
the file as it is), and ``"over": n`` fails or stalls only reads of more than n bytes (the
first bytes of a file come from a cache, the rest from storage that hangs).

The mount uses ``direct_io`` and no attribute or entry caching, so every read and every
lookup reaches this process and a fault takes effect at once.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

STALL_MAX_S = 60.0
_POLL_S = 0.02


class FaultFS:
    """The test's handle on a mounted fault filesystem."""

    def __init__(self, backing: Path, mountpoint: Path, control: Path) -> None:
        self.backing, self.mountpoint, self.control = backing, mountpoint, control
        self.faults: dict[str, dict[str, Any]] = {}

    def path(self, rel: str) -> Path:
        """Where busd sees the backing file ``rel``."""
        return self.mountpoint / rel

    def set(self, rel: str, **fault: Any) -> None:
        """Fail ``rel``: ``open=errno.EACCES``, ``read=errno.EIO``, ``stall=True``,
        ``hide=True``, ``rate=bytes_per_s`` (or several); ``pid=N`` for process N only,
        ``over=n`` for reads of more than n bytes only."""
        self.faults[rel] = fault
        self._write()

    def clear(self, rel: str | None = None) -> None:
        if rel is None:
            self.faults.clear()
        else:
            self.faults.pop(rel, None)
        self._write()

    def hits(self) -> dict[str, int]:
        """How many times each fault was served, by ``rel:kind``."""
        path = self.control.with_suffix(".hits")
        try:
            return dict(json.loads(path.read_text()))
        except (OSError, ValueError):
            return {}

    def _write(self) -> None:
        tmp = self.control.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.faults))
        os.replace(tmp, self.control)


def _is_mount(mountpoint: Path) -> bool:
    """Mounted, even dead (its process gone: ``os.path.ismount`` then says False)."""
    try:
        with open("/proc/self/mounts") as f:
            return any(line.split()[1] == str(mountpoint) for line in f if line.strip())
    except OSError:
        return os.path.ismount(mountpoint)


def unmount(mountpoint: Path) -> None:
    """Unmount, lazily if something still holds the mount; never leaves it mounted."""
    tools = [t for t in ("fusermount3", "fusermount") if shutil.which(t)]
    for args in (["-u"], ["-uz"]):
        for tool in tools:
            if not _is_mount(mountpoint):
                return
            subprocess.run(
                [tool, *args, str(mountpoint)], capture_output=True, timeout=10, check=False
            )
    if _is_mount(mountpoint):
        subprocess.run(
            ["umount", "-l", str(mountpoint)], capture_output=True, timeout=10, check=False
        )


def usable() -> str | None:
    """Why FUSE cannot be used here, or None."""
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse"
    if not os.access("/dev/fuse", os.R_OK | os.W_OK):
        return "/dev/fuse is not accessible"
    try:
        import fuse  # noqa: F401
    except (ImportError, OSError) as exc:  # OSError: libfuse2 missing
        return f"fusepy cannot load: {exc}"
    return None


@contextlib.contextmanager
def mounted(
    backing: Path, mountpoint: Path, log: Path, *, writable: bool = False
) -> Iterator[FaultFS]:
    """Mount, yield, and always unmount and stop the process (every wait bounded).
    ``writable``: files can be created and written too (a catalog's folder)."""
    mountpoint.mkdir(parents=True, exist_ok=True)
    control = mountpoint.parent / f"{mountpoint.name}.faults.json"
    fs = FaultFS(backing, mountpoint, control)
    fs.clear()
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                __file__,
                str(backing),
                str(mountpoint),
                str(control),
                "rw" if writable else "ro",
            ],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 15
        while not os.path.ismount(mountpoint):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"faultfs did not mount: {log.read_text()[-2000:]}")
            time.sleep(0.05)
        yield fs
    finally:
        fs.clear()  # releases stalled reads
        unmount(mountpoint)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        unmount(mountpoint)


# ---- the filesystem process ----------------------------------------------------------------
def _tgid(tid: int) -> int:
    """The process a thread belongs to (FUSE names the thread that asks)."""
    try:
        with open(f"/proc/{tid}/status") as f:
            for line in f:
                if line.startswith("Tgid:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return tid


def _serve(backing: str, mountpoint: str, control: str, mode: str) -> None:  # pragma: no cover
    from fuse import FUSE, FuseOSError, Operations, fuse_get_context

    class Faults:
        def __init__(self) -> None:
            self.stamp: int | None = None
            self.table: dict[str, dict[str, Any]] = {}
            self.hits: dict[str, int] = {}

        def get(self, path: str, size: int | None = None) -> dict[str, Any]:
            """The fault of ``path`` for the process asking now (and a read of ``size``)."""
            fault = self.table_of(path)
            if "pid" in fault and _tgid(fuse_get_context()[2]) != fault["pid"]:
                return {}
            if "over" in fault and (size is None or size <= int(fault["over"])):
                return {k: v for k, v in fault.items() if k not in ("read", "stall")}
            return fault

        def table_of(self, path: str) -> dict[str, Any]:
            try:
                stamp = os.stat(control).st_mtime_ns
            except OSError:
                stamp = None
            if stamp != self.stamp:
                self.stamp = stamp
                try:
                    with open(control) as f:
                        self.table = json.load(f)
                except (OSError, ValueError):
                    self.table = {}
            return self.table.get(path.lstrip("/"), {})

        def hit(self, path: str, kind: str) -> None:
            key = f"{path.lstrip('/')}:{kind}"
            self.hits[key] = self.hits.get(key, 0) + 1
            tmp = control + ".hits.tmp"
            with open(tmp, "w") as f:
                json.dump(self.hits, f)
            os.replace(tmp, control.removesuffix(".json") + ".hits")

    faults = Faults()

    class Passthrough(Operations):  # type: ignore[misc]
        def _real(self, path: str) -> str:
            return os.path.join(backing, path.lstrip("/"))

        def _hidden(self, path: str) -> None:
            if faults.get(path).get("hide"):
                faults.hit(path, "hide")
                raise FuseOSError(errno.ENOENT)

        def getattr(self, path: str, fh: int | None = None) -> dict[str, Any]:
            self._hidden(path)
            st = os.lstat(self._real(path))
            return {
                k: getattr(st, k)
                for k in (
                    "st_mode",
                    "st_nlink",
                    "st_uid",
                    "st_gid",
                    "st_size",
                    "st_atime",
                    "st_mtime",
                    "st_ctime",
                )
            }

        def readdir(self, path: str, fh: int) -> list[str]:
            return [".", "..", *os.listdir(self._real(path))]

        def readlink(self, path: str) -> str:
            return os.readlink(self._real(path))

        def access(self, path: str, mode: int) -> None:
            self._hidden(path)
            if not os.access(self._real(path), mode):
                raise FuseOSError(errno.EACCES)

        def open(self, path: str, flags: int) -> int:
            self._hidden(path)
            code = faults.get(path).get("open")
            if code:
                faults.hit(path, "open")
                raise FuseOSError(int(code))
            return os.open(self._real(path), flags)

        def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
            fault = faults.get(path, size)
            if fault.get("stall"):
                faults.hit(path, "stall")
                deadline = time.monotonic() + STALL_MAX_S
                while faults.get(path, size).get("stall") and time.monotonic() < deadline:
                    time.sleep(_POLL_S)
                fault = faults.get(path, size)
            code = fault.get("read")
            if code:
                faults.hit(path, "read")
                raise FuseOSError(int(code))
            if fault.get("rate"):
                time.sleep(size / float(fault["rate"]))
            return os.pread(fh, size, offset)

        def release(self, path: str, fh: int) -> None:
            os.close(fh)

        # ---- writes (a writable mount) ----------------------------------------------------
        def create(self, path: str, mode: int, fi: Any = None) -> int:
            return os.open(self._real(path), os.O_RDWR | os.O_CREAT | os.O_TRUNC, mode)

        def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
            return os.pwrite(fh, data, offset)

        def truncate(self, path: str, length: int, fh: int | None = None) -> None:
            if fh is not None:
                os.ftruncate(fh, length)
            else:
                os.truncate(self._real(path), length)

        def fsync(self, path: str, datasync: int, fh: int) -> None:
            delay_s = float(faults.get(path).get("fsync_s", 0))
            if delay_s:  # a slow disk: each fsync of this file takes this long
                faults.hit(path, "fsync")
                time.sleep(delay_s)
                faults.hit(path, "fsync_done")
            os.fsync(fh)

        def flush(self, path: str, fh: int) -> None:
            return None

        def unlink(self, path: str) -> None:
            os.unlink(self._real(path))

        def rename(self, old: str, new: str) -> None:
            os.rename(self._real(old), self._real(new))

        def mkdir(self, path: str, mode: int) -> None:
            os.mkdir(self._real(path), mode)

        def rmdir(self, path: str) -> None:
            os.rmdir(self._real(path))

        def chmod(self, path: str, mode: int) -> None:
            os.chmod(self._real(path), mode)

        def chown(self, path: str, uid: int, gid: int) -> None:
            os.chown(self._real(path), uid, gid)

        def utimens(self, path: str, times: tuple[float, float] | None = None) -> None:
            os.utime(self._real(path), times)

        def statfs(self, path: str) -> dict[str, Any]:
            st = os.statvfs(self._real(path))
            return {
                k: getattr(st, k)
                for k in (
                    "f_bavail",
                    "f_bfree",
                    "f_blocks",
                    "f_bsize",
                    "f_favail",
                    "f_ffree",
                    "f_files",
                    "f_flag",
                    "f_frsize",
                    "f_namemax",
                )
            }

    FUSE(
        Passthrough(),
        mountpoint,
        foreground=True,
        nothreads=False,
        ro=mode != "rw",
        direct_io=True,
        attr_timeout=0,
        entry_timeout=0,
        negative_timeout=0,
        fsname="faultfs",
    )


if __name__ == "__main__":  # pragma: no cover
    _serve(*sys.argv[1:5])
