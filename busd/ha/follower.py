"""The standby's side of hot standby: follow the stream into our own catalog, no acks.

A standby folds, with an ephemeral consumer, only what the active has settled (up to its ack
floor), with the active's poison decisions, so the two catalogs never diverge; and it tries to
take the lease every third of its TTL.

The stream and the active's decisions are the truth, not the files as the standby finds them
later: a file the active read may be gone for a while (moved, deleted and put back, a mount
away) or unreadable (EIO) when the standby folds its event. Such a verdict is recorded only
when the active reached the same one; otherwise that event is held back and checked again,
the others folded meanwhile (the fold does not depend on order), for ``verify.file_wait_s``;
past that, the standby's own verdict stands (what a rebuild would find), with a warning. An
error of the machine is never a verdict: the batch is folded again later.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import anyio

from busd import log, model, source
from busd.checker import Checker
from busd.config import Settings
from busd.errors import (
    BusdError,
    ConsumerGone,
    FatalStorageError,
    Outcome,
    Reason,
    StorageError,
    TransientError,
)
from busd.fold import Folder, Store
from busd.ha.lease import Lease
from busd.model import Batch, Decided, Folded
from busd.validate import CONTENT_REASONS

# verdicts that depend on what the file system holds at the time of the check
FILE_REASONS = frozenset(
    {Reason.FILE_MISSING, Reason.FILE_UNREADABLE, Reason.PATH_OUTSIDE_ROOTS, *CONTENT_REASONS}
)
RETRY_MAX_S = 10.0  # the longest pause before a held-back event's files are checked again
MAX_DELETED_RUNS = 100  # runs of sequences gone from the stream skipped to find a gap
REFRESH_RETRY_S = (0.5, 30.0)  # the first and the longest pause after a failed refresh


@dataclass
class _HeldBack:
    """An event whose file verdict the active may not share, checked again later."""

    since: float  # monotonic: first held back
    tries: int = 0
    retry_at: float = 0.0

    def due(self, now: float) -> bool:
        return now >= self.retry_at


async def resume_after(
    nc: source.Client, s: Settings, recorded_through: Callable[[int], Awaitable[int]]
) -> int:
    """Where a standby resumes following: the sequence before the first one its catalog
    lacks. Not the highest it holds: a former active's catalog lacks the events it was still
    waiting for (a late file, nak'ed), and they are folded only if the follower starts below
    them. A sequence no longer in the stream (deleted, aged out at its head) is no gap."""
    start = await recorded_through(0)
    for _ in range(MAX_DELETED_RUNS):
        there = await source.next_stored_seq(nc, s.nats.stream, start + 1)
        if there is None or there == start + 1:
            break
        start = await recorded_through(there - 1)
    return start


class Follower:
    """The standby's loop body: fold what the stream has beyond the catalog, no acks."""

    def __init__(
        self,
        s: Settings,
        nc: source.Client,
        store: Store,
        commit: Callable[[Batch], Awaitable[None]],
        checker: Checker,
        quarantined: dict[int, str] | None = None,
    ) -> None:
        self.settings, self.nc, self.store, self.commit = s, nc, store, commit
        self.name = _reader_name()
        self.pull: source.PullSource | None = None
        self.reader_lost = False  # its reader is to be created again (NATS did not answer)
        self.waiting = source.Waiting(source.jetstream_patience_s(s.nats))  # for the reader
        self.folder = Folder(
            s, store, replay=True, checker=checker, quarantined=dict(quarantined or {})
        )
        self._held: list[model.Delivery] = []
        self._back: dict[int, _HeldBack] = {}  # held, by sequence: see the module docstring
        self._machine_tries = 0  # folds in a row that failed on an error of the machine
        self._paused_until = 0.0
        self.through = 0  # every sequence up to here has been folded (or was already recorded)
        self._settled_to = 0  # the highest sequence taken up to fold (some may be held back)
        self.floor = 0  # the active's ack floor, as last read
        self._floor_at = 0.0
        self.idle = False  # the last step found nothing to fetch or hold
        self.waited = False  # the last step waited for messages (else its caller may pause)
        self.log = log.get()

    def reached(self, seq: int) -> bool:
        """Everything up to ``seq`` that the stream still holds is in the catalog."""
        return self.through >= seq or (self.idle and self.floor >= seq)

    async def start(self, after_seq: int) -> None:
        """Follow from the sequence after the last one our catalog holds."""
        self._held = []
        self._settled_to = after_seq
        await source.add_reader(
            self.nc, self.settings.nats.stream, self.name, after_seq + 1, idle_s=30.0
        )
        self.through = after_seq
        self.pull = source.PullSource(self.nc, self.settings.nats.stream, self.name)
        await self.pull.start()

    async def step(self) -> tuple[int, set[str]]:
        """One batch: returns (messages folded, artifact names committed).

        Only sequences the active has already settled (up to its ack floor) are folded, with
        the active's poison list: a file still being waited for, or a message that crashes
        busd, is decided by the active first and the standby follows that decision.
        Sequences the catalog already holds are skipped before their files are checked."""
        assert self.pull is not None
        if self.reader_lost and not await self._reader_again():
            return 0, set()
        c = self.settings.consumer
        fetched: list[model.Delivery] = []
        self.waited = len(self._held) - len(self._back) < c.batch_max
        if self.waited:
            try:
                fetched = await self.pull.fetch(c.batch_max, c.batch_wait_ms)
            except ConsumerGone:  # idle past its inactive threshold, or at a NATS restart
                await self.pull.stop()
                # a name of its own: the old reader may live on, from another sequence
                self.name, self.reader_lost = _reader_name(), True
                await self._reader_again()
                return 0, set()
            self._held += fetched
        self.idle = not fetched and not self._held
        if self._held or time.monotonic() - self._floor_at > 1.0:  # idle: once a second
            self._floor_at = time.monotonic()
            self.floor = await self._active_floor()
        now = time.monotonic()
        settled = [d for d in self._held if d.seq <= self.floor]
        batch = [d for d in settled if d.seq not in self._back or self._back[d.seq].due(now)]
        if not batch or now < self._paused_until:
            return 0, set()
        known, _ = await self.store.lookup([d.seq for d in batch], [])
        fresh = [d for d in batch if d.seq not in known]
        touched: set[str] = set()
        held_back: set[int] = set()
        if fresh:
            try:
                folded, held_back = await self._fold(fresh, now)
            except TransientError as exc:  # the machine failed to read files: not a verdict
                self._machine_error(exc)
                return 0, set()
            self._machine_tries = 0
            if folded is not None:
                await self.commit(folded.rows)
                touched = folded.touched
        # only once committed: a failed commit leaves the batch held, for the next step
        for seq in {d.seq for d in batch} - held_back:
            self._back.pop(seq, None)
        for seq in held_back:
            self._hold_back(seq, now)
        self._held = [d for d in self._held if d.seq > self.floor or d.seq in self._back]
        self._settled_to = max(self._settled_to, settled[-1].seq)
        top = self._settled_to if not self._back else min(self._back) - 1
        self.through = max(self.through, min(top, self._settled_to))
        return len(fresh) - len(held_back), touched

    async def _fold(
        self, fresh: Sequence[model.Delivery], now: float
    ) -> tuple[Folded | None, set[int]]:
        """Fold ``fresh``; an event whose file verdict the active did not reach is left
        out (folded again without it) and returned among the sequences held back."""
        held_back: set[int] = set()
        todo = list(fresh)
        for _ in range(3):
            if not todo:
                return None, held_back
            folded = await self.folder.fold(todo)
            hold: set[int] = set()
            answering = True  # an active that does not answer is not asked again this fold
            for item in folded.decided:
                if not _file_verdict(item):
                    continue
                answer = await self._active_outcome(item.d.seq) if answering else {}
                answering = bool(answer)
                if not self._may_record(item, answer, now):
                    hold.add(item.d.seq)
            if not hold:
                return folded, held_back
            held_back |= hold
            todo = [d for d in todo if d.seq not in hold]
        # files keep changing under the checks: all of it again later
        return None, held_back | {d.seq for d in todo}

    def _may_record(self, item: Decided, answer: dict[str, object], now: float) -> bool:
        """A file verdict is recorded when the active reached the same one (``answer``, the
        request API's ``outcome``), or once the file had ``verify.file_wait_s`` to come back
        here: then it is what a rebuild would find, said with a warning, as the two catalogs
        may differ on it."""
        reason = None if item.reason is None else item.reason.value
        if (
            answer.get("state") == "done"
            and answer.get("outcome") == Outcome.REJECTED.value
            and answer.get("reason") == reason
        ):
            return True
        back = self._back.get(item.d.seq)
        waited_s = 0.0 if back is None else now - back.since
        active = answer.get("outcome") or answer.get("state") or "no answer"
        if waited_s >= self.settings.verify.file_wait_s:
            self.log.warning(
                "the standby records a file verdict the active did not reach: the file "
                "stayed so for verify.file_wait_s",
                seq=item.d.seq,
                reason=reason,
                detail=item.detail,
                active=active,
            )
            return True
        if back is None:
            self.log.warning(
                "a file verdict the active did not reach; its event is held back and checked again",
                seq=item.d.seq,
                reason=reason,
                detail=item.detail,
                active=active,
            )
        return False

    async def _active_outcome(self, seq: int) -> dict[str, object]:
        """What the active recorded for ``seq`` (the request API's ``outcome``); empty when
        it does not answer."""
        try:
            subject = model.subject(self.settings.nats.consumer, "outcome")
            raw = await source.request(self.nc, subject, model.encode({"seq": seq}), timeout_s=1.0)
            answer = model.decode(raw)
        except Exception:  # noqa: BLE001 - no active, NATS away: it does not vouch for it
            return {}
        return answer if isinstance(answer, dict) else {}

    def _hold_back(self, seq: int, now: float) -> None:
        back = self._back.setdefault(seq, _HeldBack(now))
        back.tries += 1
        back.retry_at = now + min(RETRY_MAX_S, 0.5 * 2.0 ** (back.tries - 1))

    def _machine_error(self, exc: TransientError) -> None:
        self._machine_tries += 1
        pause_s = min(RETRY_MAX_S, 0.5 * 2.0 ** (self._machine_tries - 1))
        self._paused_until = time.monotonic() + pause_s
        self.log.warning(
            "the standby failed to read files; folding again later",
            error=str(exc),
            retry_in_s=pause_s,
        )

    async def _reader_again(self) -> bool:
        """The reader created again; False while NATS does not answer (the next step tries
        again: each step is a turn of the standby, an outage no hang)."""
        try:
            await self.start(self.through)
        except Exception as exc:
            if not source.unanswered(exc):
                raise
            if self.waiting.unanswered(exc, "create the standby's reader"):
                self.log.warning(
                    "NATS does not answer; creating the standby's reader again", error=repr(exc)
                )
            # unanswered is not undone: the reader may exist, assigned to a server now
            # gone, and a create of the same name would be refused ('consumer is offline')
            self.name = _reader_name()
            await anyio.sleep(1.0)
            return False
        self.reader_lost = False
        self.waiting.answered()
        return True

    async def _active_floor(self) -> int:
        """The active's ack floor, trusted only together with a poison list read after it.

        The active records a poison decision in its catalog before it terminates the
        message, so a list read after the floor holds every poison sequence below that floor.
        A list read before it (or not at all) may miss one, and the standby would fold, and
        check the files of, a message the active quarantined: then the floor stays where it
        was, and nothing new is folded until both reads succeed in that order."""
        try:
            floor = await source.ack_floor(self.nc, self.settings)
        except Exception:  # noqa: BLE001 - no durable consumer (yet), NATS down: not now
            return self.floor
        if floor <= self.floor:
            return self.floor  # nothing new settled: the poison list we hold covers it
        try:
            subject = model.subject(self.settings.nats.consumer, "poison")
            answer = model.decode(await source.request(self.nc, subject, b"{}", timeout_s=1.0))
        except Exception:  # noqa: BLE001 - the active does not answer: fold nothing new
            return self.floor
        if not isinstance(answer, dict) or "error" in answer:
            return self.floor
        self.folder.quarantined.update((int(k), str(v)) for k, v in answer.items())
        return floor

    async def stop(self) -> None:
        if self.pull is not None:
            await self.pull.stop()
        with contextlib.suppress(Exception):
            await source.delete_consumer(self.nc, self.settings.nats.stream, self.name)


async def follow_until_leader(
    lease: Lease,
    follower: Follower,
    refresh: Callable[[set[str]], Awaitable[None]],
    alive: Callable[[], None],
    stopping: Callable[[], bool],
) -> bool:
    """The standby's loop: follow, refresh the exports, try the lease every third of its TTL.
    True once the lease is ours; False when stopped first. The caller stops the follower.
    A refresh that fails (a full disk) is tried again with a back-off while the standby
    follows on: its exports lag, nothing is lost (the catalog holds the rows)."""
    tried = time.monotonic()
    waiting = source.Waiting(follower.waiting.patience_s)  # for the lease
    due, touched_since = False, set[str]()  # rows committed since the last refresh
    retry_at, delay_s = 0.0, REFRESH_RETRY_S[0]
    while not stopping():
        n, touched = await follower.step()
        due, touched_since = due or n > 0, touched_since | touched
        if due and time.monotonic() >= retry_at:
            try:
                await refresh(touched_since)
                due, touched_since, delay_s = False, set(), REFRESH_RETRY_S[0]
            except FatalStorageError:
                raise
            except StorageError as exc:
                log.get().error(
                    "standby: export refresh failed; retrying", error=str(exc), retry_in_s=delay_s
                )
                retry_at = time.monotonic() + delay_s
                delay_s = min(delay_s * 2, REFRESH_RETRY_S[1])
        if not n and not follower.waited:  # events held back fill the batch: no fetch paced it
            await anyio.sleep(0.1)
        alive()
        if time.monotonic() - tried > lease.ttl_s / 3:
            tried = time.monotonic()
            try:
                if await lease.acquire():
                    return True
                waiting.answered()
            except Exception as exc:
                if not source.unanswered(exc):
                    raise
                if waiting.unanswered(exc, "try the lease"):
                    log.get().warning(
                        "NATS does not answer; the lease is tried again", error=repr(exc)
                    )
    return False


async def stand_by(
    follower: Follower,
    after_seq: int,
    lease: Lease,
    refresh: Callable[[set[str]], Awaitable[None]],
    alive: Callable[[], None],
    ping_every_s: float,
    stopping: Callable[[], bool],
    patience_s: float,
) -> dict[int, str] | None:
    """Follow from ``after_seq`` as a standby until the lease is ours: the poison decisions
    the follower carries over, or None when stopped first. The watchdog is pinged from a
    task of its own, so a slow batch or refresh never starves it, for as long as the follow
    loop has turned within ``patience_s``: a standby stuck on a disk that does not answer is
    left to the watchdog, not kept alive."""
    turned_at = time.monotonic()

    def turned() -> None:
        nonlocal turned_at
        turned_at = time.monotonic()
        alive()

    refused_for_s = follower.settings.consumer.stall_s  # as an active's keeper allows

    async def ping() -> None:
        refused_since: float | None = None
        while True:
            await anyio.sleep(ping_every_s)
            refused = source.turned_away(follower.nc)  # no way back in: say so, exit
            now = time.monotonic()
            refused_since = None if refused is None else (refused_since or now)
            if refused_since is not None and now - refused_since > refused_for_s:
                raise BusdError(
                    f"NATS has refused the standby's reconnects for {refused_for_s:.0f}s: {refused}"
                )
            if now - turned_at < patience_s:
                alive()
            else:
                log.get().error("standby: no progress; no more watchdog pings", waited_s=patience_s)
                return

    try:
        async with anyio.create_task_group() as pings:
            pings.start_soon(ping)
            leader = await _started(follower, after_seq, stopping, turned)
            if leader:
                leader = await follow_until_leader(lease, follower, refresh, turned, stopping)
            pings.cancel_scope.cancel()
    finally:
        await follower.stop()
    return follower.folder.quarantined if leader else None


async def _started(
    follower: Follower, after_seq: int, stopping: Callable[[], bool], turned: Callable[[], None]
) -> bool:
    """The follower's reader created, asked again while NATS does not answer (each try is a
    turn: an outage is no hang of busd); False when stopped first."""
    while not stopping():
        try:
            await follower.start(after_seq)
            follower.waiting.answered()
            return True
        except Exception as exc:
            if not source.unanswered(exc):
                raise
            if follower.waiting.unanswered(exc, "create the standby's reader"):
                log.get().warning(
                    "NATS does not answer; creating the standby's reader", error=repr(exc)
                )
            follower.name = _reader_name()  # as in Follower._reader_again
        turned()
        await anyio.sleep(1.0)
    return False


def _reader_name() -> str:
    return f"busd-standby-{uuid.uuid4().hex[:10]}"


def _file_verdict(item: Decided) -> bool:
    """A rejection for what the files looked like at the time of this fold."""
    return not item.known and item.outcome is Outcome.REJECTED and item.reason in FILE_REASONS
