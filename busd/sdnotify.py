"""A tiny sd_notify client: systemd's notification protocol spoken directly over its socket.

systemd passes ``$NOTIFY_SOCKET`` to a ``Type=notify`` service: an AF_UNIX datagram socket, in
the abstract namespace when the path starts with ``@``. Each datagram holds newline-separated
``KEY=VALUE`` assignments (``READY=1``, ``WATCHDOG=1``, ``STOPPING=1``, ``STATUS=...``).

Outside systemd (a terminal, the tests, CI) the variable is unset and every call is a no-op.
A failed send is logged and reported by the return value, never raised: losing a status line
must not stop the daemon, and a lost ``WATCHDOG=1`` is what the watchdog exists to catch.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping

log = logging.getLogger(__name__)


class SdNotifier:
    """Sends notifications to systemd; does nothing when ``$NOTIFY_SOCKET`` is unset.

    The environment is read once, when the notifier is built (never at import time), and can be
    passed in explicitly for tests.
    """

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self._address = _socket_address(env.get("NOTIFY_SOCKET", ""))
        self._watchdog_interval_s = _watchdog_interval_s(env, os.getpid())
        self._status_at: float | None = None

    @property
    def enabled(self) -> bool:
        """True when running under systemd with a notification socket."""
        return self._address is not None

    def ready(self) -> bool:
        """Startup finished (consumer bound): systemd moves the unit to ``active``."""
        return self.notify("READY=1")

    def watchdog(self) -> bool:
        """Keep-alive ping; send at :meth:`watchdog_interval_s` while making progress."""
        return self.notify("WATCHDOG=1")

    def stopping(self) -> bool:
        """Shutdown began: systemd shows ``deactivating`` and stops expecting watchdog pings."""
        return self.notify("STOPPING=1")

    def status(self, text: str, *, extend_start_s: float | None = None) -> bool:
        """A one-line human status shown by ``systemctl status``; ``extend_start_s`` also
        asks systemd for that much more time before ``TimeoutStartSec`` fails the start (a
        service waiting for a dependency is not hung)."""
        # A newline would start a new assignment in the datagram.
        assignments = ["STATUS=" + " ".join(text.splitlines())]
        if extend_start_s is not None:
            assignments.append(f"EXTEND_TIMEOUT_USEC={int(extend_start_s * 1_000_000)}")
        return self.notify(*assignments)

    def status_every(self, text: str, every_s: float = 5.0) -> bool:
        """:meth:`status`, at most once per ``every_s``: a loop may call it each turn without
        flooding systemd (every STATUS= is a message to PID 1). True when sent."""
        now = time.monotonic()
        if self._address is None or (
            self._status_at is not None and now - self._status_at < every_s
        ):
            return False
        self._status_at = now
        return self.status(text)

    def watchdog_interval_s(self) -> float | None:
        """How often to ping: half of ``$WATCHDOG_USEC``, or None when no watchdog is armed.

        Only when ``$WATCHDOG_PID`` is unset or names this process, so a child that inherited
        the environment does not believe it is being watched.
        """
        return self._watchdog_interval_s

    def notify(self, *assignments: str) -> bool:
        """Send ``KEY=VALUE`` assignments in one datagram; True when it was sent."""
        if self._address is None:
            return False
        payload = "\n".join(assignments).encode("utf-8")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                # never wait on the receiver (this runs on the event loop): a full queue of
                # a manager that reads slowly drops this message, not busd's other work
                sock.setblocking(False)
                sock.sendto(payload, self._address)
        except BlockingIOError:
            log.debug("sd_notify %s dropped: the receiver's queue is full", assignments[0])
            return False
        except OSError as exc:
            log.warning("sd_notify %s failed: %s", assignments[0].split("=", 1)[0], exc)
            return False
        return True


def active_status(
    outcomes: Mapping[str, int], pending: int, ack_pending: int, oldest_s: float
) -> str:
    """The active daemon's ``systemctl status`` line: what it did since it started, and its
    lag in messages and in time."""
    done = ", ".join(f"{outcomes.get(o, 0):,} {o}" for o in ("committed", "duplicate", "rejected"))
    return (
        f"active: {done}; lag {pending:,} pending, {ack_pending:,} awaiting ack, "
        f"oldest unsettled {oldest_s:.0f} s"
    )


def _socket_address(path: str) -> str | bytes | None:
    if not path:
        return None
    if path.startswith("@"):
        # Abstract namespace: a leading NUL byte instead of '@', no file on disk.
        return b"\0" + path[1:].encode("utf-8")
    if not path.startswith("/"):
        # systemd also allows vsock:// addresses; busd does not use them.
        log.warning("NOTIFY_SOCKET %r is not a unix socket path; sd_notify disabled", path)
        return None
    return path


def _watchdog_interval_s(env: Mapping[str, str], pid: int) -> float | None:
    usec_text = env.get("WATCHDOG_USEC", "")
    if not usec_text:
        return None
    pid_text = env.get("WATCHDOG_PID", "")
    try:
        usec = int(usec_text)
        if pid_text and int(pid_text) != pid:
            return None
    except ValueError:
        log.warning("ignoring malformed WATCHDOG_USEC=%r / WATCHDOG_PID=%r", usec_text, pid_text)
        return None
    if usec <= 0:
        return None
    return usec / 1_000_000 / 2
