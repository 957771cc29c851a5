"""Settlement: what each decided delivery gets, and when (no I/O here).

Committed and duplicate events are acked only after the export refresh that covers them:
they wait, tagged with the generation of their commit. Rejections are terminated at once,
once their rejection row is committed. An event with no outcome yet is nak'ed with a delay
when its file is still awaited, and kept in hand (:class:`Rechecks`) when the machine failed
to read it: a nak would cost a delivery, and an error of the machine must not bring an event
closer to `poison`. The daemon sends what :func:`settle` returns and logs what it says.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from busd import model
from busd.errors import Outcome
from busd.model import Decided

Action = Literal["ack", "term", "nak"]


def settlement(outcome: Outcome | None) -> Action:
    """The one decision point: committed and duplicate are acked, rejected terminated, and a
    message with no outcome yet (a file still missing) is nak'ed with a delay."""
    if outcome is None:
        return "nak"
    if outcome is Outcome.REJECTED:
        return "term"
    return "ack"


def wire_body(action: Action, delay_s: float = 0.0) -> bytes:
    """What settles a message now: a term, or a nak with its delay (acks wait for exports)."""
    return model.TERM if action == "term" else model.nak_body(delay_s)


@dataclass(slots=True)
class Waiting:
    """A committed delivery waiting for the export refresh that covers it."""

    d: model.Delivery
    generation: int
    since: float


@dataclass
class Settled:
    """One batch, settled: what waits for the export, what goes out now, what to count."""

    waiting: list[Waiting] = field(default_factory=list)
    now: list[tuple[str, bytes]] = field(default_factory=list)  # terms and naks
    naks: list[Decided] = field(default_factory=list)
    held: list[Decided] = field(default_factory=list)  # kept in hand, checked again later
    new: list[Decided] = field(default_factory=list)  # outcomes recorded by this batch
    outcomes: Counter[str] = field(default_factory=Counter)
    reasons: Counter[str] = field(default_factory=Counter)


def settle(decided: Sequence[Decided], generation: int, since: float) -> Settled:
    out = Settled()
    for item in decided:
        outcome = item.outcome
        if outcome is not None and not item.known:
            out.new.append(item)
            out.outcomes[outcome.value] += 1
            if item.reason is not None:
                out.reasons[item.reason.value] += 1
        action = settlement(outcome)
        if outcome is None and item.recheck_s is not None:
            out.held.append(item)
        elif action == "ack":
            out.waiting.append(Waiting(item.d, generation, since))
        else:
            out.now.append((item.d.reply, wire_body(action, item.nak_delay_s)))
            if action == "nak":
                out.naks.append(item)
    return out


@dataclass(order=True, slots=True)
class _Due:
    at: float
    seq: int
    d: model.Delivery = field(compare=False)


class Rechecks:
    """Deliveries kept in hand, not nak'ed, until their files are checked again; owned by
    the daemon's event loop. The server is told they are in progress like any message in
    hand, so the wait costs no delivery however long the machine keeps failing."""

    def __init__(self) -> None:
        self._due: dict[int, _Due] = {}

    def __len__(self) -> int:
        return len(self._due)

    def hold(self, items: Sequence[Decided], now: float) -> None:
        for item in items:
            assert item.recheck_s is not None
            self._due[item.d.seq] = _Due(now + item.recheck_s, item.d.seq, item.d)

    def due(self, now: float) -> list[model.Delivery]:
        """Those to check again now (they leave; the fold decides them again)."""
        ready = sorted(e for e in self._due.values() if e.at <= now)
        for e in ready:
            del self._due[e.seq]
        return [e.d for e in ready]

    def held(self) -> list[model.Delivery]:
        return [e.d for e in self._due.values()]


def outcome_line(item: Decided) -> tuple[str, str, dict[str, Any]]:
    """(level, message, fields) of the log line for one new outcome."""
    fields: dict[str, Any] = {
        "seq": item.d.seq,
        "event_id": item.event_id,
        "subject": item.d.subject,
        "outcome": item.outcome.value if item.outcome else None,
    }
    if item.traceparent is not None:  # the producer's trace leads to this line
        fields["traceparent"] = item.traceparent
    if item.outcome is Outcome.REJECTED:
        return (
            "warning",
            "event rejected",
            {"reason": item.reason.value if item.reason else None, "detail": item.detail, **fields},
        )
    if item.outcome is Outcome.DUPLICATE:
        return "info", "duplicate event", fields
    return (
        "debug",
        "event committed",
        {"run_id": item.run_id, "artifacts": item.n_artifacts, **fields},
    )
