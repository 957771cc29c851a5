"""Hot standby: two real `busd serve` processes, one lease in a NATS KV bucket."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

from support import Bus, wait_for
from test_chaos import Publisher, check_exactly_once, exported_all

from busd.embedded import EmbeddedServer

HA = {"ha": {"enabled": True, "lease_ttl_s": 2}, "consumer": {"ack_wait_s": 1}}


def pair(tmp_path: Path, server: EmbeddedServer) -> tuple[Bus, Bus]:
    """Two instances with their own data dirs and one shared artifact root."""
    a = Bus(tmp_path / "a", server, overrides=HA)
    b = Bus(tmp_path / "b", server, overrides=HA)
    for bus in (a, b):
        bus.root.mkdir()
    a.artifacts.mkdir()
    b.overrides = {**HA, "artifact_roots": [str(a.artifacts)]}
    a.init()
    return a, b


def start_pair(tmp_path: Path, server: EmbeddedServer
               ) -> tuple[Bus, Bus, subprocess.Popen[str], subprocess.Popen[str]]:
    """a active, then b standby, each a real `busd serve`."""
    a, b = pair(tmp_path, server)
    pa = a.spawn("serve", "--config", str(a.write_config()))
    wait_for(lambda: "busd ready" in a.log(), 30, "a active")
    pb = b.spawn("serve", "--config", str(b.write_config()))
    wait_for(lambda: "standby: following" in b.log(), 30, "b standby")
    return a, b, pa, pb


def test_standby_takes_over_when_the_active_is_killed(tmp_path: Path,
                                                      nats_server: EmbeddedServer) -> None:
    a, b, pa, pb = start_pair(tmp_path, nats_server)
    try:
        with Publisher(a, 1500, rate_per_s=300) as pub:
            wait_for(lambda: pub.acked >= 300, 30, "events flowing")
            pa.kill()
            killed = time.monotonic()
            wait_for(lambda: "took over the lease" in b.log(), 30, "b took over")
            takeover_s = time.monotonic() - killed
        wait_for(lambda: exported_all(b, 1500), 60, "b caught up")
    finally:
        pb.send_signal(signal.SIGTERM)
        assert pb.wait(60) == 0, b.log()[-2000:]
        pa.wait(10)
    found = check_exactly_once(b, pub.ids)
    out = b.cli("verify", "--config", str(b.write_config()), timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    print(f"\nstandby: took over {takeover_s:.1f}s after kill -9 of the active (lease 2 s); "
          f"{pub.acked} events, {found}; its catalog equals a rebuild")


def test_a_former_active_that_lost_the_lease_stops_acking(tmp_path: Path,
                                                          nats_server: EmbeddedServer) -> None:
    a, b, pa, pb = start_pair(tmp_path, nats_server)
    try:
        with Publisher(a, 600, rate_per_s=300) as pub:
            wait_for(lambda: pub.acked >= 200, 30, "events flowing")
            pa.send_signal(signal.SIGSTOP)  # cut off, not dead
            wait_for(lambda: "took over the lease" in b.log(), 30, "b took over")
            pa.send_signal(signal.SIGCONT)
            rc = pa.wait(30)
        wait_for(lambda: exported_all(b, 600), 60, "b caught up")
    finally:
        pb.send_signal(signal.SIGTERM)
        assert pb.wait(60) == 0
    assert rc == 1
    assert "lost the lease" in a.log()
    check_exactly_once(b, pub.ids)
