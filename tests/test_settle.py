"""The settlement table, in memory: every outcome → ack, term or nak (with its delay), new and
known outcomes counted once, files the machine failed to read kept in hand, not nak'ed.

Pure logic, no server: that acks, naks and terms do what they say on a real server is proven by
the daemon's tests (``test_pipeline.py``, ``test_crashes.py``, ``test_file_faults.py``).
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from busd import model
from busd.errors import Outcome, Reason
from busd.model import Decided, Delivery
from busd.settle import Rechecks, Waiting, outcome_line, settle, settlement, wire_body


def delivery(seq: int, **over: Any) -> Delivery:
    fields: dict[str, Any] = {
        "seq": seq,
        "subject": "artifacts.lab.sim",
        "data": b"{}",
        "headers": None,
        "reply": f"$JS.ACK.busd.{seq}",
        "delivered": 1,
        "published_ns": 1_700_000_000_000_000_000,
    }
    return Delivery(**{**fields, **over})


def decided(seq: int, outcome: Outcome | None, **over: Any) -> Decided:
    return Decided(delivery(seq), outcome, **over)


def nak_delay_s(body: bytes) -> float:
    assert body.startswith(b"-NAK ")
    return float(json.loads(body.removeprefix(b"-NAK "))["delay"]) / 1e9


# ---- the table ---------------------------------------------------------------------------------
EXPECTED = {
    Outcome.COMMITTED: "ack",
    Outcome.DUPLICATE: "ack",
    Outcome.REJECTED: "term",
    None: "nak",
}


def test_every_outcome_has_an_action() -> None:
    assert set(EXPECTED) == {*Outcome, None}  # a new outcome must be added to this table


@pytest.mark.parametrize("outcome", list(EXPECTED), ids=lambda o: o.value if o else "none")
def test_settlement(outcome: Outcome | None) -> None:
    assert settlement(outcome) == EXPECTED[outcome]


def test_wire_bodies() -> None:
    assert wire_body("term") == model.TERM == b"+TERM"
    assert wire_body("nak") == b'-NAK {"delay": 0}'
    assert nak_delay_s(wire_body("nak", 2.5)) == 2.5
    assert wire_body("nak", 0.000_000_001) == b'-NAK {"delay": 1}'  # nanoseconds on the wire
    assert model.nak_body(30) == b'-NAK {"delay": 30000000000}'


# ---- one batch ---------------------------------------------------------------------------------
def test_committed_and_duplicates_wait_for_the_export() -> None:
    out = settle(
        [decided(1, Outcome.COMMITTED), decided(2, Outcome.DUPLICATE)], generation=7, since=123.5
    )
    assert [(w.d.seq, w.generation, w.since) for w in out.waiting] == [(1, 7, 123.5), (2, 7, 123.5)]
    assert all(isinstance(w, Waiting) for w in out.waiting)
    assert out.now == [] and out.naks == [] and out.held == []


def test_rejections_are_termed_at_once() -> None:
    item = decided(3, Outcome.REJECTED, reason=Reason.SCHEMA, detail="no run")
    out = settle([item], generation=1, since=0.0)
    assert out.now == [("$JS.ACK.busd.3", b"+TERM")]
    assert out.waiting == [] and out.naks == [] and out.held == []


def test_naks_carry_their_delay() -> None:
    items = [
        decided(4, None, nak_delay_s=5.0),
        decided(5, None, nak_delay_s=0.25),
        decided(6, None),
    ]
    out = settle(items, generation=1, since=0.0)
    assert [(reply, nak_delay_s(body)) for reply, body in out.now] == [
        ("$JS.ACK.busd.4", 5.0),
        ("$JS.ACK.busd.5", 0.25),
        ("$JS.ACK.busd.6", 0.0),
    ]
    assert out.naks == items
    assert out.new == [] and not out.outcomes  # no outcome yet: nothing to count


def test_a_file_the_machine_failed_to_read_is_held_not_nakd() -> None:
    held = decided(8, None, recheck_s=2.0, nak_delay_s=5.0)
    out = settle([held], generation=1, since=0.0)
    assert out.held == [held]
    assert out.now == [] and out.naks == [] and out.waiting == []  # costs no delivery


def test_a_recheck_means_nothing_once_there_is_an_outcome() -> None:
    out = settle(
        [
            decided(9, Outcome.COMMITTED, recheck_s=2.0),
            decided(10, Outcome.REJECTED, reason=Reason.FILE_MISSING, recheck_s=2.0),
        ],
        generation=1,
        since=0.0,
    )
    assert out.held == []
    assert [w.d.seq for w in out.waiting] == [9]
    assert out.now == [("$JS.ACK.busd.10", b"+TERM")]


def test_new_outcomes_are_counted_once_known_ones_not_at_all() -> None:
    items = [
        decided(1, Outcome.COMMITTED),
        decided(2, Outcome.DUPLICATE),
        decided(3, Outcome.REJECTED, reason=Reason.SCHEMA),
        decided(4, Outcome.REJECTED, reason=Reason.SCHEMA),
        decided(5, Outcome.REJECTED, reason=Reason.POISON),
        # redelivered after a crash: recorded before, settled again, counted never
        decided(6, Outcome.COMMITTED, known=True),
        decided(7, Outcome.REJECTED, reason=Reason.SCHEMA, known=True),
        decided(8, None),
        decided(9, None, recheck_s=1.0),
    ]
    out = settle(items, generation=2, since=0.0)
    assert [i.d.seq for i in out.new] == [1, 2, 3, 4, 5]
    assert out.outcomes == {"committed": 1, "duplicate": 1, "rejected": 3}
    assert out.reasons == {"schema": 2, "poison": 1}
    # known ones are still settled the same way
    assert [w.d.seq for w in out.waiting] == [1, 2, 6]
    assert [reply for reply, body in out.now if body == b"+TERM"] == [
        f"$JS.ACK.busd.{seq}" for seq in (3, 4, 5, 7)
    ]


def test_a_rejection_without_a_reason_counts_its_outcome_only() -> None:
    out = settle([decided(1, Outcome.REJECTED)], generation=1, since=0.0)
    assert out.outcomes == {"rejected": 1} and not out.reasons


def test_an_empty_batch() -> None:
    out = settle([], generation=1, since=0.0)
    assert (out.waiting, out.now, out.naks, out.held, out.new) == ([], [], [], [], [])


outcomes = st.sampled_from([*Outcome, None])


@st.composite
def batches(draw: st.DrawFn) -> list[Decided]:
    n = draw(st.integers(0, 30))
    return [
        decided(
            seq,
            draw(outcomes),
            reason=draw(st.sampled_from([None, *Reason])),
            nak_delay_s=draw(st.floats(0, 3600)),
            recheck_s=draw(st.none() | st.floats(0, 60)),
            known=draw(st.booleans()),
        )
        for seq in range(1, n + 1)
    ]


# no deadline: the suite shares a small machine, and a slow example is not a wrong one
@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batches())
def test_each_delivery_is_settled_exactly_once(items: list[Decided]) -> None:
    out = settle(items, generation=3, since=1.0)
    replies = (
        [w.d.reply for w in out.waiting]
        + [reply for reply, _ in out.now]
        + [i.d.reply for i in out.held]
    )
    assert sorted(replies) == sorted(i.d.reply for i in items)
    assert all(body == b"+TERM" or body.startswith(b"-NAK ") for _, body in out.now)
    assert sum(out.outcomes.values()) == len(out.new)
    assert all(i.outcome is not None and not i.known for i in out.new)
    assert len(out.naks) == sum(body != b"+TERM" for _, body in out.now)


# ---- kept in hand ------------------------------------------------------------------------------
def test_rechecks_fall_due_in_time_order() -> None:
    rechecks = Rechecks()
    rechecks.hold(
        [
            decided(1, None, recheck_s=5.0),
            decided(2, None, recheck_s=1.0),
            decided(3, None, recheck_s=5.0),
        ],
        now=100.0,
    )
    assert len(rechecks) == 3
    assert rechecks.due(100.5) == []
    assert [d.seq for d in rechecks.due(101.0)] == [2]
    assert sorted(d.seq for d in rechecks.held()) == [1, 3]
    assert [d.seq for d in rechecks.due(1000.0)] == [1, 3]  # same time: by seq
    assert len(rechecks) == 0 and rechecks.held() == [] and rechecks.due(2000.0) == []


def test_holding_a_delivery_again_replaces_it() -> None:
    rechecks = Rechecks()
    rechecks.hold([decided(1, None, recheck_s=1.0)], now=0.0)
    rechecks.hold([decided(1, None, recheck_s=10.0)], now=5.0)
    assert len(rechecks) == 1
    assert rechecks.due(14.0) == []
    assert [d.seq for d in rechecks.due(15.0)] == [1]


def test_what_settle_holds_goes_into_rechecks() -> None:
    out = settle(
        [decided(1, None, recheck_s=2.0), decided(2, Outcome.COMMITTED)], generation=1, since=0.0
    )
    rechecks = Rechecks()
    rechecks.hold(out.held, now=10.0)
    assert [d.seq for d in rechecks.held()] == [1]
    assert [d.seq for d in rechecks.due(12.0)] == [1]


# ---- the types and the log line ----------------------------------------------------------------
def test_delivery() -> None:
    d = delivery(1, headers={"Nats-Msg-Id": "m-1"}, published_ns=1_700_000_000_500_000_000)
    assert d.msg_id == "m-1"
    assert d.published_at == dt.datetime(2023, 11, 14, 22, 13, 20, 500_000, tzinfo=dt.UTC)
    assert delivery(2).msg_id is None
    assert delivery(3, headers={"Other": "x"}).msg_id is None


def test_decided_defaults() -> None:
    item = decided(1, None)
    assert (item.reason, item.nak_delay_s, item.recheck_s, item.known) == (None, 0.0, None, False)


@pytest.mark.parametrize(
    ("outcome", "level", "message"),
    [
        (Outcome.COMMITTED, "debug", "event committed"),
        (Outcome.DUPLICATE, "info", "duplicate event"),
        (Outcome.REJECTED, "warning", "event rejected"),
    ],
)
def test_outcome_line(outcome: Outcome, level: str, message: str) -> None:
    item = decided(
        4,
        outcome,
        event_id="e-1",
        run_id="r-1",
        n_artifacts=2,
        reason=Reason.SCHEMA if outcome is Outcome.REJECTED else None,
        detail="why",
    )
    got_level, got_message, fields = outcome_line(item)
    assert (got_level, got_message) == (level, message)
    assert fields["seq"] == 4 and fields["event_id"] == "e-1"
    assert fields["outcome"] == outcome.value
    if outcome is Outcome.REJECTED:
        assert (fields["reason"], fields["detail"]) == ("schema", "why")
    if outcome is Outcome.COMMITTED:
        assert (fields["run_id"], fields["artifacts"]) == ("r-1", 2)
