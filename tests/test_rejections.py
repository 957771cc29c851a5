"""Every rejection reason in docs/reference/reasons.md, through the real daemon, which keeps
running."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from support import Bus, sha256_file


def event_with(bus: Bus, **artifact: Any) -> dict[str, Any]:
    return bus.event("r", [{"name": "fills", **artifact}])


CASES: dict[str, Any] = {
    "malformed": lambda bus: b"{not json",
    "malformed_array": lambda bus: b"[1, 2]",
    "malformed_utf8": lambda bus: b'{"schema_version": 1, "x": "\xff\xfe"}',
    "schema_unknown_field": lambda bus: {**bus.event("r"), "colour": "red"},
    "schema_missing_run": lambda bus: {
        "schema_version": 1,
        "artifacts": [{"name": "a", "path": "a"}],
    },
    "schema_bad_ident": lambda bus: bus.event("bad id with spaces"),
    "schema_duplicate_name": lambda bus: bus.event(
        "r", [{"name": "a", "path": "a.parquet"}, {"name": "a", "path": "b.parquet"}]
    ),
    "schema_no_artifacts": lambda bus: bus.event("r", []),
    "unsupported_version": lambda bus: {**bus.event("r"), "schema_version": 2},
    "producer_mismatch": lambda bus: {**bus.event("r"), "producer": "someone.else"},
    "path_outside_roots": lambda bus: event_with(bus, path="/etc/hostname"),
    "path_outside_roots_dotdot": lambda bus: event_with(bus, path="../../../etc/hostname"),
    "file_missing": lambda bus: event_with(bus, path="nope/missing.parquet"),
    "size_mismatch": lambda bus: event_with(bus, path=str(bus.parquet("s.parquet")), bytes=1),
    "checksum_mismatch": lambda bus: event_with(
        bus, path=str(bus.parquet("c.parquet")), sha256="0" * 64
    ),
    "not_parquet": lambda bus: event_with(bus, path=str(_text_file(bus))),
    "rows_mismatch": lambda bus: event_with(
        bus, path=str(bus.parquet("w.parquet", rows=3)), rows=4
    ),
    "too_large_artifacts": lambda bus: bus.event(
        "r", [{"name": f"a{i}", "path": "x.parquet"} for i in range(1001)]
    ),
    "too_large_nesting": lambda bus: b'{"a":' * 100 + b"1" + b"}" * 100,
    "too_large_params": lambda bus: {
        **bus.event("r"),
        "run": {"run_id": "r", "kind": "k", "params": {"deep": json.loads("[" * 70 + "]" * 70)}},
    },
}


def _text_file(bus: Bus) -> Path:
    path = bus.artifacts / "fake.parquet"
    path.write_text("this is not parquet at all")
    return path


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_reason_rejects_and_keeps_the_payload(bus: Bus, case: str) -> None:
    payload = CASES[case](bus)
    good = bus.event("after")
    bus.publish([payload, good])
    stats = bus.drain()
    assert stats.outcomes == {"rejected": 1, "committed": 1}
    reason = case.split("_")[0] if case.startswith(("malformed", "schema")) else case
    reason = {
        "path_outside_roots_dotdot": "path_outside_roots",
        "too_large_artifacts": "too_large",
        "too_large_nesting": "too_large",
        "too_large_params": "too_large",
    }.get(reason, reason)
    ((got_reason, detail, stored, deliveries),) = bus.sql(
        "SELECT reason, detail, payload, deliveries FROM catalog.rejections_f"
    )
    assert got_reason == reason, detail
    assert detail
    expected = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    assert stored == expected
    assert deliveries == 1
    assert bus.sql("SELECT outcome, reason FROM catalog.events_f WHERE seq = 1") == [
        ("rejected", reason)
    ]
    assert bus.sql("SELECT run_id FROM catalog.runs_d") == [("after",)]


def test_unknown_field_is_named(bus: Bus) -> None:
    bus.publish([{**bus.event("r"), "colour": "red"}])
    bus.drain()
    ((detail,),) = bus.sql("SELECT detail FROM catalog.rejections_f")
    assert "colour" in detail


def test_event_id_conflict(bus: Bus) -> None:
    first = bus.event("r", event_id="same")
    other = bus.event("r2", event_id="same")
    bus.publish([first, other])
    assert bus.drain().outcomes == {"committed": 1, "rejected": 1}
    assert bus.sql("SELECT reason FROM catalog.rejections_f") == [("event_id_conflict",)]
    # and across runs of busd
    bus.publish([bus.event("r3", event_id="same")])
    assert bus.drain().outcomes == {"rejected": 1}


def test_rejected_event_id_can_be_reused(bus: Bus) -> None:
    """A rejection does not claim its event_id: the producer's fixed event commits."""
    bus.publish([bus.event("r", [{"name": "a", "path": "missing.parquet"}], event_id="e1")])
    bus.drain()
    bus.parquet("missing.parquet")
    bus.publish([bus.event("r", [{"name": "a", "path": "missing.parquet"}], event_id="e1")])
    assert bus.drain().outcomes == {"committed": 1}


def test_missing_file_is_retried_until_it_appears(bus: Bus) -> None:
    path = bus.artifacts / "late" / "fills.parquet"
    bus.publish([bus.event("late", [{"name": "fills", "path": str(path)}])])
    import threading
    import time

    def write_later() -> None:
        time.sleep(1.0)
        bus.parquet("late/fills.parquet")

    writer = threading.Thread(target=write_later)
    writer.start()
    stats = bus.drain(verify={"file_wait_s": 30})
    writer.join()
    assert stats.outcomes == {"committed": 1}
    ((deliveries,),) = bus.sql("SELECT count(*) FROM catalog.events_f")
    assert deliveries == 1


def test_missing_file_is_rejected_after_file_wait(bus: Bus) -> None:
    bus.publish([event_with(bus, path="never.parquet")])
    stats = bus.drain(verify={"file_wait_s": 2})
    assert stats.outcomes == {"rejected": 1}
    ((detail,),) = bus.sql("SELECT detail FROM catalog.rejections_f")
    assert "does not exist" in detail


def test_symlink_out_of_roots_is_outside(bus: Bus, tmp_path: Path) -> None:
    outside = tmp_path / "outside.parquet"
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"x": [1]}), outside)
    link = bus.artifacts / "link.parquet"
    os.symlink(outside, link)
    bus.publish([event_with(bus, path=str(link))])
    bus.drain()
    assert bus.sql("SELECT reason FROM catalog.rejections_f") == [("path_outside_roots",)]


def test_checksum_policy_always_computes(bus: Bus) -> None:
    path = bus.parquet("sum.parquet")
    bus.publish([event_with(bus, path=str(path))])
    bus.drain(verify={"checksum": "always"})
    assert bus.sql("SELECT sha256 FROM catalog.artifacts_f") == [(sha256_file(path),)]


def test_checksum_policy_never_skips(bus: Bus) -> None:
    path = bus.parquet("sum.parquet")
    bus.publish([event_with(bus, path=str(path), sha256="1" * 64)])
    assert bus.drain(verify={"checksum": "never"}).outcomes == {"committed": 1}
