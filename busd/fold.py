"""The fold: a batch of deliveries → an outcome for each and the catalog rows to commit.

Used by the daemon and by replay (``busd rebuild``/``verify``), so both fold the stream the
same way. The result does not depend on delivery order: a sequence already recorded is never
applied again, rows are derived by "highest sequence wins", and an ``event_id`` belongs to the
*lowest* sequence that carried it validly — when a lower one arrives late (a redelivery after
a crash), it takes the claim over and the later one is demoted to duplicate or conflict.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import msgspec

from busd import events as ev
from busd import faults, log, model
from busd.checker import Checker
from busd.config import Settings
from busd.errors import (
    FileNotYetThere,
    FileUnavailable,
    InvalidEvent,
    Outcome,
    Reason,
    TransientError,
)
from busd.model import Batch, Claim, Decided, Delivery, Folded, Known, Sibling
from busd.validate import CONTENT_REASONS, CheckedArtifact

RECHECK_MAX_S = 10.0  # an event whose files the machine failed to read is checked again
REPLAY_RECHECKS = 3  # replay has no message to keep in hand: it checks again, then gives up
Checks = dict[int, list[CheckedArtifact] | InvalidEvent | FileUnavailable]


@dataclass
class Prepared:
    """A batch decoded, its files being checked."""

    decoded: list[tuple[Decided, model.ArtifactEvent | None]]
    copies: list[Delivery]
    checks: asyncio.Future[Checks]

    def cancel(self) -> None:
        self.checks.cancel()


def merge(parts: Sequence[Prepared]) -> Prepared:
    """Batches prepared one by one, decided and committed as one (a group commit): a
    sequence in two of them is decided once, the other delivery settled as its copy."""
    if len(parts) == 1:
        return parts[0]
    decoded: list[tuple[Decided, model.ArtifactEvent | None]] = []
    copies: list[Delivery] = []
    seen: set[int] = set()
    for p in parts:
        copies.extend(p.copies)
        for item, event in p.decoded:
            if item.d.seq in seen:
                copies.append(item.d)
            else:
                seen.add(item.d.seq)
                decoded.append((item, event))

    async def checks() -> Checks:
        merged: Checks = {}
        try:
            for p in parts:
                merged.update(await p.checks)
        except BaseException:
            for p in parts:
                p.cancel()
            raise
        return merged

    return Prepared(decoded, copies, asyncio.ensure_future(checks()))


class Store(Protocol):
    """What the fold reads: the catalog (on its writer thread) and stored payloads."""

    async def lookup(
        self, seqs: Sequence[int], event_ids: Sequence[str]
    ) -> tuple[dict[int, Known], dict[str, Claim]]: ...

    async def siblings(self, event_id: str, after_seq: int) -> list[Sibling]: ...

    async def payload(self, seq: int) -> bytes: ...


class Recorded(Protocol):
    """What earlier checks of the same events found (a replay's, from the catalog it
    replaces or is compared with): per event, the checks that still stand because its files
    are unchanged since, or None to check them."""

    async def checks(
        self, events: Sequence[tuple[int, model.ArtifactEvent]]
    ) -> list[list[CheckedArtifact] | None]: ...


TURN_ARTIFACTS = 2000  # decoded or folded between two turns of the event loop


class Turns:
    """Gives the event loop a turn every ``TURN_ARTIFACTS`` artifacts of work."""

    def __init__(self) -> None:
        self.since = 0

    async def after(self, event: model.ArtifactEvent | None) -> None:
        self.since += 1 if event is None else len(event.artifacts)
        if self.since >= TURN_ARTIFACTS:
            self.since = 0
            await asyncio.sleep(0)


class Folder:
    """Decides a batch."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        *,
        replay: bool = False,
        quarantined: dict[int, str] | None = None,
        checker: Checker | None = None,
        recorded: Recorded | None = None,
        deaths: Callable[[int], int] | None = None,
    ) -> None:
        self.settings = settings
        # live: busd's deaths holding a sequence (poison); and the consumer's own max_deliver
        # (-1: unlimited, as busd declares it; a bound-only consumer may keep a limit)
        self.deaths = deaths
        self.server_max_deliver = -1
        self.recorded = recorded
        self.files_checked = 0  # artifacts whose files were checked
        self.files_reused = 0  # artifacts whose earlier check ``recorded`` says still stands
        self.store = store
        self.quarantined = quarantined or {}  # replay: poison decided by the live catalog
        self.replay = replay  # replaying history: no waiting for files, no poison
        self.roots = settings.roots
        v = settings.verify
        self.checker = checker or Checker(
            settings.roots,
            v.checksum,
            processes=v.processes,
            threads=v.threads,
            settle_s=v.settle_s,
            timeout_s=v.check_timeout_s,
        )
        self._rechecked: dict[int, int] = {}  # seq → times kept in hand for a recheck

    async def fold(self, batch: Sequence[Delivery]) -> Folded:
        return await self.finish(await self.prepare(batch))

    async def prepare(self, batch: Sequence[Delivery]) -> Prepared:
        """Decode, and start checking files on worker threads; nothing here reads the
        catalog, so a daemon can prepare batch N+1 while batch N commits. The event loop
        gets a turn every ``TURN_ARTIFACTS`` artifacts: 500 events of 1,000 artifacts each
        took it for seconds, and the watchdog's and in-progress pings waited."""
        # A sequence delivered twice in one batch (a redelivery overtaking the first) is
        # decided once; its copies are settled the same way.
        firsts: dict[int, Delivery] = {}
        copies: list[Delivery] = []
        for d in batch:
            if d.seq in firsts:
                copies.append(d)
            else:
                firsts[d.seq] = d
        decoded: list[tuple[Decided, model.ArtifactEvent | None]] = []
        turn = Turns()
        for d in firsts.values():
            decoded.append(self._decode(d))
            await turn.after(decoded[-1][1])
        faults.hit("after_decode")
        # Every event's files are checked, duplicates included: an invalid event is rejected
        # for its own reason whatever else the stream holds, which keeps the fold independent
        # of delivery order.
        candidates = [(item, event) for item, event in decoded if event is not None]
        checks = asyncio.ensure_future(self._validate(candidates))
        return Prepared(decoded, copies, checks)

    async def finish(self, p: Prepared) -> Folded:
        """Read the catalog, then decide; the catalog must hold every earlier batch."""
        try:
            folded = await self._decide(p)
        except BaseException:
            p.checks.cancel()
            raise
        by_seq = {item.d.seq: item for item in folded.decided}
        for d in p.copies:
            first = by_seq[d.seq]
            folded.decided.append(
                Decided(
                    d,
                    first.outcome,
                    first.reason,
                    first.detail,
                    event_id=first.event_id,
                    nak_delay_s=first.nak_delay_s,
                    recheck_s=first.recheck_s,
                    known=True,
                )
            )
        return folded

    async def _decide(self, p: Prepared) -> Folded:
        decoded = p.decoded
        ids = [item.event_id for item, event in decoded if event is not None and item.event_id]
        known, claims = await self.store.lookup([item.d.seq for item, _ in decoded], ids)
        decided: list[Decided] = []
        fresh: list[tuple[Decided, model.ArtifactEvent]] = []
        for item, event in decoded:
            k = known.get(item.d.seq)
            if k is not None:
                decided.append(
                    Decided(
                        item.d,
                        Outcome(k.outcome),
                        None if k.reason is None else Reason(k.reason),
                        "already recorded",
                        event_id=item.event_id,
                        known=True,
                    )
                )
                continue
            decided.append(item)
            if event is not None:
                fresh.append((item, event))
        checked = await p.checks
        now = dt.datetime.now(dt.UTC)
        rows = Batch()
        touched: set[str] = set()
        turn = Turns()
        for item, event in sorted(fresh, key=lambda pair: pair[0].d.seq):
            await turn.after(event)
            assert item.event_id is not None
            result = checked[id(item)]
            if isinstance(result, FileUnavailable):
                self._recheck(item, result)
                continue
            if isinstance(result, FileNotYetThere):
                self._missing(item, result)
                continue
            if isinstance(result, InvalidEvent):
                reject(item, result.reason, result.detail)
                continue
            claim = claims.get(item.event_id)
            if claim is not None and claim.seq < item.d.seq:
                if claim.payload_hash == item.payload_hash:
                    item.outcome = Outcome.DUPLICATE
                else:
                    reject(
                        item, Reason.EVENT_ID_CONFLICT, conflict_detail(item.event_id, claim.seq)
                    )
                continue
            item.outcome = Outcome.COMMITTED
            if claim is not None and not claim.in_batch:  # a later sequence held the claim
                await self._demote(rows, item)
            claims[item.event_id] = Claim(item.payload_hash, item.d.seq, in_batch=True)
            log_rows(rows, item, event, result, now)
            touched.update(a.name for a in result)
        for item in decided:
            if item.outcome is not None and not item.known:
                event_rows(rows, item, now)
            if item.recheck_s is None:
                self._rechecked.pop(item.d.seq, None)
        held = [item for item in decided if item.recheck_s is not None]
        if held:
            log.get().warning(
                "the machine failed to read files; checking again later, messages kept in hand",
                events=len(held),
                first_seq=held[0].d.seq,
                detail=held[0].detail,
                recheck_in_s=held[0].recheck_s,
            )
        return Folded(decided, rows, touched)

    def _decode(self, d: Delivery) -> tuple[Decided, model.ArtifactEvent | None]:
        payload_hash = ev.payload_sha256(d.data)
        item = Decided(
            d,
            None,
            event_id=ev.usable_msg_id(d.msg_id) or payload_hash,
            producer=ev.producer_of(d.subject),
            payload_hash=payload_hash,
            traceparent=ev.traceparent_of(d.headers),
        )
        poison = None if self.replay else self._poison(d)
        if poison is not None:
            reject(item, Reason.POISON, poison)
            return item, None
        if d.seq in self.quarantined:
            reject(item, Reason.POISON, self.quarantined[d.seq])
            return item, None
        try:
            event = ev.decode(d.data)
            item.event_id, item.producer = ev.resolve_identity(
                event, d.subject, d.msg_id, payload_hash
            )
        except InvalidEvent as exc:
            reject(item, exc.reason, exc.detail)
            return item, None
        except Exception as exc:  # noqa: BLE001 - a decoder bug must not stop the stream
            reject(item, Reason.MALFORMED, f"undecodable: {type(exc).__name__}: {exc}")
            return item, None
        item.run_id = event.run.run_id
        item.n_artifacts = len(event.artifacts)
        return item, event

    def _poison(self, d: Delivery) -> str | None:
        """Why a delivery is poison: busd died holding it ``max_deliver - 2`` times (this is
        its ``max_deliver - 1``-th delivery that could reach an outcome), or the consumer
        would deliver it no more. Redeliveries after a NATS outage count for nothing."""
        died = self.deaths(d.seq) if self.deaths is not None else 0
        if died >= self.settings.consumer.max_deliver - 2:
            return f"busd died {died} times while handling it, without reaching an outcome"
        last = self.server_max_deliver
        if last > 0 and d.delivered >= last - 1:
            return (
                f"delivered {d.delivered} times without reaching an outcome (the consumer's "
                f"max_deliver is {last})"
            )
        return None

    async def _demote(self, rows: Batch, winner: Decided) -> None:
        """A lower sequence takes an event_id over: every later sequence that carried it is
        decided again against the new holder (duplicate if same payload, else conflict)."""
        assert winner.event_id is not None
        for sib in await self.store.siblings(winner.event_id, winner.d.seq):
            if sib.payload_hash == winner.payload_hash:
                rows.demotions.append((sib.seq, Outcome.DUPLICATE.value, None, None, None))
                continue
            # a payload already kept in rejections_f is reused; else read it from the stream
            payload = (
                None
                if sib.reason == Reason.EVENT_ID_CONFLICT.value
                else await self.store.payload(sib.seq)
            )
            rows.demotions.append(
                (
                    sib.seq,
                    Outcome.REJECTED.value,
                    Reason.EVENT_ID_CONFLICT.value,
                    conflict_detail(winner.event_id, winner.d.seq),
                    payload,
                )
            )

    def _recheck(self, item: Decided, exc: FileUnavailable) -> None:
        """An error of the machine: no outcome, no nak (a nak would cost a delivery and bring
        the event closer to `poison`); the daemon keeps the message in hand and checks it
        again after a growing pause, for as long as the error lasts."""
        if len(self._rechecked) > 100_000:  # sequences settled elsewhere (a redelivery)
            self._rechecked.clear()
        n = self._rechecked[item.d.seq] = self._rechecked.get(item.d.seq, 0) + 1
        item.recheck_s = min(RECHECK_MAX_S, 0.5 * 2.0 ** (n - 1))
        item.detail = exc.detail

    def _missing(self, item: Decided, exc: FileNotYetThere) -> None:
        """Retry a file not there, not readable or still changing, with backoff until
        ``verify.file_wait_s``, then reject it for that reason."""
        waited_s = max(0.0, time.time() - item.d.published_ns / 1e9)
        remaining_s = self.settings.verify.file_wait_s - waited_s
        # a consumer with a max_deliver of its own: two deliveries kept in reserve, so a slow
        # file never turns into `poison` (busd's own consumer has none: the file wait decides)
        last = self.server_max_deliver
        tries_left = last - 3 - item.d.delivered if last > 0 else None
        if self.replay or remaining_s <= 0 or (tries_left is not None and tries_left <= 0):
            # no wall-clock figure in the detail: a replay must write the same words
            reject(item, exc.reason, exc.detail)
            return
        spread_s = remaining_s / tries_left if tries_left is not None else 0.0
        item.nak_delay_s = min(remaining_s, max(2.0 ** (item.d.delivered - 1), spread_s))
        if exc.reason in CONTENT_REASONS and item.d.delivered == 1:
            # a file that stops changing now is judged once settled, not a while later
            item.nak_delay_s = min(item.nak_delay_s, self.settings.verify.settle_s + 0.5)

    async def _validate(self, items: Sequence[tuple[Decided, model.ArtifactEvent]]) -> Checks:
        """Each event's checked artifacts (or why they fail), by ``id`` of its item."""
        if not items:
            return {}
        faults.hit("during_validate")
        checks: Checks = {}
        if self.recorded is not None:
            reused = await self.recorded.checks([(item.d.seq, event) for item, event in items])
            for (item, _), r in zip(items, reused, strict=True):
                if r is not None:
                    checks[id(item)] = r
                    self.files_reused += len(r)
            items = [(item, event) for item, event in items if id(item) not in checks]
        results = await self.checker.check([event.artifacts for _, event in items])
        self.files_checked += sum(len(event.artifacts) for _, event in items)
        checks.update((id(item), r) for (item, _), r in zip(items, results, strict=True))
        for attempt in range(REPLAY_RECHECKS if self.replay else 0):
            again = [
                (item, event)
                for item, event in items
                if isinstance(checks[id(item)], FileUnavailable)
            ]
            if not again:
                break
            await asyncio.sleep(0.5 * 2.0**attempt)
            results = await self.checker.check([event.artifacts for _, event in again])
            checks.update((id(item), r) for (item, _), r in zip(again, results, strict=True))
        if self.replay:
            for item, _ in items:
                failed = checks[id(item)]
                if isinstance(failed, FileUnavailable):  # never a rejection: try again later
                    raise TransientError(f"sequence {item.d.seq}: {failed.detail}")
        return checks

    async def close(self) -> None:
        await self.checker.close()


def conflict_detail(event_id: str, holder_seq: int) -> str:
    """The same words whichever order the two sequences arrived in (replay compares them)."""
    return f"event_id {event_id!r} was committed with another payload at sequence {holder_seq}"


def reject(item: Decided, reason: Reason, detail: str) -> None:
    item.outcome = Outcome.REJECTED
    item.reason = reason
    item.detail = detail


def log_rows(
    rows: Batch,
    item: Decided,
    event: model.ArtifactEvent,
    checked: Sequence[CheckedArtifact],
    now: dt.datetime,
) -> None:
    d, run = item.d, event.run
    published = d.published_at
    for a in checked:
        rows.artifacts.append(
            (
                run.run_id,
                a.name,
                d.seq,
                a.path,
                a.format,
                a.rows,
                a.bytes,
                a.sha256,
                a.columns,
                a.schema_hash,
                a.meta,
                item.event_id,
                published,
                now,
                a.dev,
                a.ino,
                a.mtime_ns,
                a.ctime_ns,
                a.hashed,
            )
        )
    params = None if run.params is None else msgspec.json.encode(run.params).decode()
    rows.runs.append(
        (
            d.seq,
            run.run_id,
            run.kind,
            item.producer,
            run.status,
            run.started_at,
            run.finished_at,
            params,
            run.code_version,
            run.parent_run_id,
            published,
            item.event_id,
            item.traceparent,
        )
    )


def event_rows(rows: Batch, item: Decided, now: dt.datetime) -> None:
    d = item.d
    assert item.outcome is not None
    reason = item.reason.value if item.reason else None
    rows.events.append(
        (
            d.seq,
            item.event_id,
            item.payload_hash,
            d.subject,
            item.producer,
            item.run_id,
            item.outcome.value,
            reason,
            item.n_artifacts,
            d.published_at,
            now,
            item.traceparent,
        )
    )
    if item.outcome is Outcome.REJECTED:
        rows.rejections.append(
            (
                d.seq,
                d.subject,
                item.event_id,
                reason,
                item.detail,
                d.data,
                d.delivered,
                d.published_at,
                now,
            )
        )
