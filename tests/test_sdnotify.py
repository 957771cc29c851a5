"""sd_notify against a real AF_UNIX datagram socket standing in for systemd's NOTIFY_SOCKET."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import Bus, FakeSystemd

from busd.sdnotify import SdNotifier, active_status


@pytest.fixture
def abstract_systemd() -> Iterator[FakeSystemd]:
    name = f"busd-test-notify-{os.getpid()}-{id(object())}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        sock.settimeout(5)
        yield FakeSystemd(sock, "@" + name)


def test_sends_ready_watchdog_status_stopping(fake_systemd: FakeSystemd) -> None:
    notifier = SdNotifier({"NOTIFY_SOCKET": fake_systemd.address})
    assert notifier.enabled

    assert notifier.ready()
    assert fake_systemd.receive() == ["READY=1"]
    assert notifier.watchdog()
    assert fake_systemd.receive() == ["WATCHDOG=1"]
    assert notifier.status("consuming: lag 0, seq 42")
    assert fake_systemd.receive() == ["STATUS=consuming: lag 0, seq 42"]
    assert notifier.stopping()
    assert fake_systemd.receive() == ["STOPPING=1"]
    assert fake_systemd.nothing_waiting()


def test_status_stays_one_assignment(fake_systemd: FakeSystemd) -> None:
    notifier = SdNotifier({"NOTIFY_SOCKET": fake_systemd.address})
    notifier.status("line one\nREADY=1")
    assert fake_systemd.receive() == ["STATUS=line one READY=1"]


def test_status_every_sends_at_most_once_per_interval(fake_systemd: FakeSystemd) -> None:
    notifier = SdNotifier({"NOTIFY_SOCKET": fake_systemd.address})
    assert notifier.status_every("one", every_s=0.3)
    assert not notifier.status_every("two", every_s=0.3)
    assert fake_systemd.receive() == ["STATUS=one"]
    assert fake_systemd.nothing_waiting()
    time.sleep(0.35)
    assert notifier.status_every("three", every_s=0.3)
    assert fake_systemd.receive() == ["STATUS=three"]
    assert not SdNotifier({}).status_every("nobody listens")


def test_active_status_line() -> None:
    line = active_status({"committed": 1234, "rejected": 2}, 5, 3, 61.4)
    assert line == (
        "active: 1,234 committed, 0 duplicate, 2 rejected; lag 5 pending, "
        "3 awaiting ack, oldest unsettled 61 s"
    )


def test_several_assignments_in_one_datagram(fake_systemd: FakeSystemd) -> None:
    notifier = SdNotifier({"NOTIFY_SOCKET": fake_systemd.address})
    assert notifier.notify("READY=1", "STATUS=up")
    assert fake_systemd.receive() == ["READY=1", "STATUS=up"]


def test_abstract_namespace_socket(abstract_systemd: FakeSystemd) -> None:
    notifier = SdNotifier({"NOTIFY_SOCKET": abstract_systemd.address})
    assert notifier.ready()
    assert abstract_systemd.receive() == ["READY=1"]


def test_no_socket_is_a_no_op() -> None:
    notifier = SdNotifier({})
    assert not notifier.enabled
    assert not notifier.ready()
    assert not notifier.watchdog()
    assert not notifier.status("x")
    assert not notifier.stopping()
    assert notifier.watchdog_interval_s() is None


def test_vanished_socket_does_not_raise(tmp_path: Path) -> None:
    notifier = SdNotifier({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")})
    assert notifier.enabled
    assert not notifier.ready()


def test_reads_os_environ_when_not_given(
    fake_systemd: FakeSystemd, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", fake_systemd.address)
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    notifier = SdNotifier()
    assert notifier.watchdog_interval_s() == 15.0
    assert notifier.watchdog()
    assert fake_systemd.receive() == ["WATCHDOG=1"]


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),
        ({"WATCHDOG_USEC": "1000"}, 0.0005),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "me"}, None),
        ({"WATCHDOG_PID": str(os.getpid())}, None),
        ({}, None),
    ],
)
def test_watchdog_interval(env: dict[str, str], expected: float | None) -> None:
    assert SdNotifier(env).watchdog_interval_s() == expected


def test_real_serve_notifies_ready_watchdog_and_stopping(
    fake_systemd: FakeSystemd, bus: Bus
) -> None:
    """A real `busd serve` under a fake systemd: READY=1 once the consumer is bound, WATCHDOG=1
    pings paced by WATCHDOG_USEC while it works, STOPPING=1 on SIGTERM."""
    cfg = bus.write_config()
    proc = bus.spawn(
        "serve",
        "--config",
        str(cfg),
        env={"NOTIFY_SOCKET": fake_systemd.address, "WATCHDOG_USEC": "400000"},
    )
    got: list[str] = []
    try:
        deadline = time.monotonic() + 30
        while "READY=1" not in got and time.monotonic() < deadline:
            got += fake_systemd.receive()
        assert "READY=1" in got
        assert "busd ready" in bus.log()  # ready means bound: the log line comes first
        bus.publish([bus.event("r")])
        pings = 0
        statuses: list[str] = []
        # STATUS= while active, not only while waiting for NATS or in standby: it shows the
        # committed event within one status interval (5 s)
        while (
            pings < 3 or not any("1 committed" in s for s in statuses)
        ) and time.monotonic() < deadline:
            datagram = fake_systemd.receive()
            pings += datagram.count("WATCHDOG=1")
            statuses += [a for a in datagram if a.startswith("STATUS=active: ")]
        assert pings >= 3
        assert any("1 committed" in s and "lag " in s for s in statuses), statuses
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    rest: list[str] = []
    with contextlib.suppress(TimeoutError, BlockingIOError):
        while "STOPPING=1" not in rest:
            rest += fake_systemd.receive()
    assert "STOPPING=1" in rest


def test_a_manager_that_does_not_read_never_blocks_busd(fake_systemd: FakeSystemd) -> None:
    """The notifications go out on the event loop: once the manager's queue is full (Linux
    keeps 10 datagrams by default) they are dropped, not waited on. Before, the send
    blocked until the manager read: a test's unread socket froze a standby's event loop."""
    notifier = SdNotifier({"NOTIFY_SOCKET": fake_systemd.address})
    sent = [notifier.watchdog() for _ in range(200)]  # nobody reads meanwhile
    assert sent[0] and not all(sent)
    assert fake_systemd.receive() == ["WATCHDOG=1"]
