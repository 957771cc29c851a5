"""Where file checks run: worker processes by default, threads on request.

A check is mostly Python between short syscalls and a footer parse. On threads, every check
competes with the event loop and the catalog writer for the GIL, and the hand-offs cost more
than the work (60 µs of CPU per file inside the daemon against 33 µs alone). Worker processes
share no GIL with the daemon: each is ``python -m busd.checker``, reads requests (a slice of a
batch's events) on stdin and answers on stdout, both as length-prefixed msgpack, and exits when
its stdin closes — so it never outlives busd. They are plain subprocesses, not
``multiprocessing``: nothing re-imports the program that embeds busd.

A worker that dies (a file that crashes the Parquet reader, the OOM killer) is started again
and the events of its slice are checked one at a time, so the event that kills a worker
again is rejected for it and the others are decided as usual — provided a fresh worker
answers an empty request: when workers cannot run at all, that is a TransientError (busd
exits, nothing is rejected, the messages are delivered again).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import anyio
import msgspec

from busd import faults, log
from busd.errors import FileNotYetThere, InvalidEvent, Reason, TransientError
from busd.events import Artifact
from busd.validate import CheckedArtifact, ChecksumPolicy, check_artifacts

Result = list[CheckedArtifact] | InvalidEvent

_CHUNK_MIN = 32  # events per worker request, at least (a request costs ~0.1 ms)
_HEADER = 4  # bytes of length before each message


def check_all(events: Sequence[Sequence[Artifact]], roots: Sequence[Path],
              checksum: ChecksumPolicy) -> list[Result]:
    """Check each event's artifacts; an event's result is its artifacts or why it failed."""
    results: list[Result] = []
    for artifacts in events:
        try:
            results.append(check_artifacts(artifacts, roots, checksum))
        except InvalidEvent as exc:
            results.append(exc)
        except (OSError, ValueError, RuntimeError) as exc:  # odd paths, EIO, …
            results.append(InvalidEvent(
                Reason.NOT_PARQUET, f"could not be checked: {type(exc).__name__}: {exc}"))
    return results


# ---- the wire: a request is (roots, checksum, events); an answer has one item per event ----
class _Request(msgspec.Struct, array_like=True):
    roots: list[str]
    checksum: str
    events: list[list[Artifact]]


class _Failed(msgspec.Struct, array_like=True, tag=True):
    missing: bool
    reason: str
    detail: str


class _Checked(msgspec.Struct, array_like=True, tag=True):
    artifacts: list[CheckedArtifact]


# one answer per event: its checked artifacts, or why they failed
_encoder = msgspec.msgpack.Encoder()
_request_decoder = msgspec.msgpack.Decoder(_Request)
_answer_decoder = msgspec.msgpack.Decoder(list[_Checked | _Failed])


def _to_wire(result: Result) -> _Checked | _Failed:
    if isinstance(result, InvalidEvent):
        return _Failed(isinstance(result, FileNotYetThere), result.reason.value, result.detail)
    return _Checked(result)


def _from_wire(answer: _Checked | _Failed) -> Result:
    if isinstance(answer, _Checked):
        return answer.artifacts
    if answer.missing:
        return FileNotYetThere(answer.detail)
    return InvalidEvent(Reason(answer.reason), answer.detail)


def _with_meta(result: Result, artifacts: Sequence[Artifact]) -> Result:
    """Put back each artifact's ``meta`` (as JSON), which workers are not sent."""
    if isinstance(result, InvalidEvent) or all(a.meta is None for a in artifacts):
        return result
    return [msgspec.structs.replace(checked, meta=None if art.meta is None
                                    else msgspec.json.encode(art.meta).decode())
            for checked, art in zip(result, artifacts, strict=True)]


def _frame(payload: bytes) -> bytes:
    return len(payload).to_bytes(_HEADER, "little") + payload


def worker_main() -> None:  # pragma: no cover - runs in the worker process
    """``python -m busd.checker``: answer requests on stdin until it closes."""
    # only stdin's end stops a worker: a Ctrl-C or a SIGTERM for the whole process group
    # must not fail checks that busd is finishing before it exits
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    faults.hit_for("in_checker", "@start")  # tests: a worker that cannot run at all
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # anything printed by accident goes to stderr, not into the answers
    inp = sys.stdin.buffer
    while True:
        header = inp.read(_HEADER)
        if len(header) < _HEADER:
            return
        req = _request_decoder.decode(inp.read(int.from_bytes(header, "little")))
        results = check_all(req.events, [Path(r) for r in req.roots],
                            req.checksum)  # type: ignore[arg-type]
        out.write(_frame(_encoder.encode([_to_wire(r) for r in results])))
        out.flush()


# ---- the parent side ----------------------------------------------------------------------
class WorkerDied(Exception):
    """A worker process exited while it checked a request."""


class _Worker:
    def __init__(self) -> None:
        self.proc: asyncio.subprocess.Process | None = None
        self.lock = asyncio.Lock()

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "busd.checker", stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, limit=1 << 26)

    async def ensure(self) -> None:
        if self.proc is None or self.proc.returncode is not None:
            await self.start()

    async def ask(self, request: bytes, *,
                  pace: Callable[[int, float], None] | None = None) -> list[_Checked | _Failed]:
        """One request, one answer; ``pace(events, seconds)`` learns how long it took."""
        async with self.lock:
            await self.ensure()
            proc = self.proc
            assert proc is not None and proc.stdin is not None and proc.stdout is not None
            started = time.monotonic()
            try:
                proc.stdin.write(request)
                await proc.stdin.drain()
                header = await proc.stdout.readexactly(_HEADER)
                answer = await proc.stdout.readexactly(int.from_bytes(header, "little"))
            except (asyncio.IncompleteReadError, ConnectionError) as exc:
                await self._reap()
                raise WorkerDied(f"exit status {proc.returncode}") from exc
            except asyncio.CancelledError:
                # its answer would be read by the next request: this worker is done
                self.proc = None
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                raise
            answers = _answer_decoder.decode(answer)
            if pace is not None:
                pace(len(answers), time.monotonic() - started)
            return answers

    async def _reap(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()

    async def close(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.stdin is not None:
            proc.stdin.close()  # the worker's loop ends at EOF
        try:
            await asyncio.wait_for(proc.wait(), 5.0)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()


class Checker:
    """Checks the files of many events at once, in ``processes`` worker processes (or on
    ``threads`` threads of this process when ``processes`` is 0)."""

    def __init__(self, roots: Sequence[Path], checksum: ChecksumPolicy, *,
                 processes: int, threads: int) -> None:
        self.roots = list(roots)
        self.checksum = checksum
        self.threads = threads
        self._workers = [_Worker() for _ in range(processes)]
        self._limit: anyio.CapacityLimiter | None = None
        self._per_event_s = 0.0  # recent seconds of checking per event, in one worker

    def seconds_for(self, events: int) -> float:
        """About how long checking this many more events takes, by the recent pace."""
        return events * self._per_event_s / max(1, len(self._workers) or self.threads)

    def _pace(self, events: int, seconds: float) -> None:
        if events:
            self._per_event_s = 0.8 * self._per_event_s + 0.2 * seconds / events

    async def start(self) -> None:
        """Start the worker processes now: each imports pyarrow (about 0.3 s) while busd
        connects to NATS, instead of during the first batch."""
        for worker in self._workers:
            await worker.ensure()

    async def close(self) -> None:
        await asyncio.gather(*(w.close() for w in self._workers))

    async def check(self, events: Sequence[Sequence[Artifact]]) -> list[Result]:
        if not events:
            return []
        if not self._workers:
            return await self._on_threads(events)
        n = max(1, min(len(self._workers), len(events) // _CHUNK_MIN))
        parts = await asyncio.gather(*(self._on_worker(self._workers[i], part)
                                       for i, part in enumerate(_slices(events, n))))
        return [r for part in parts for r in part]

    def _request(self, events: Sequence[Sequence[Artifact]]) -> bytes:
        # without meta: the checks never read it, and JSON allows integers msgpack does not
        bare = [[Artifact(a.name, a.path, a.rows, a.bytes, a.sha256) for a in e] for e in events]
        return _frame(_encoder.encode(_Request([str(r) for r in self.roots], self.checksum,
                                               bare)))

    async def _on_worker(self, worker: _Worker, events: Sequence[Sequence[Artifact]]
                         ) -> list[Result]:
        try:
            answers = await worker.ask(self._request(events), pace=self._pace)
            return [_with_meta(_from_wire(a), e) for a, e in zip(answers, events, strict=True)]
        except WorkerDied as exc:
            log.get().warning("a file-check worker died; checking its events one at a time",
                              events=len(events), worker=str(exc))
        # each event alone, so the one that kills a worker again is known — provided a
        # fresh worker can work at all; if not, nothing is decided (and nothing acked)
        await self._must_work(worker)
        results: list[Result] = []
        for artifacts in events:
            try:
                answer = await worker.ask(self._request([artifacts]))
                results.append(_with_meta(_from_wire(answer[0]), artifacts))
            except WorkerDied as exc:
                await self._must_work(worker)
                results.append(InvalidEvent(
                    Reason.NOT_PARQUET,
                    f"checking its files killed the checking process ({exc}): a file that "
                    "crashes the Parquet reader?"))
        return results

    async def _must_work(self, worker: _Worker) -> None:
        """A fresh worker answers an empty request, or the fault is not an event's."""
        try:
            await worker.ask(self._request([]))
        except WorkerDied as exc:
            raise TransientError(f"file-check workers cannot run ({exc}); see their "
                                 "errors above") from None

    async def _on_threads(self, events: Sequence[Sequence[Artifact]]) -> list[Result]:
        if self._limit is None:
            self._limit = anyio.CapacityLimiter(self.threads)
        run = functools.partial(check_all, roots=self.roots, checksum=self.checksum)
        slices = _slices(events, max(1, min(self.threads, len(events) // 8)))
        parts: list[list[Result]] = [[] for _ in slices]

        async def one(i: int) -> None:
            parts[i] = await anyio.to_thread.run_sync(run, slices[i], limiter=self._limit)

        async with anyio.create_task_group() as tg:
            for i in range(len(slices)):
                tg.start_soon(one, i)
        return [r for part in parts for r in part]


def _slices(items: Sequence[Sequence[Artifact]], n: int) -> list[Sequence[Sequence[Artifact]]]:
    """``n`` contiguous slices of about equal size (results are joined back in order)."""
    size = -(-len(items) // n)
    return [items[i:i + size] for i in range(0, len(items), size)]


if __name__ == "__main__":  # pragma: no cover
    worker_main()
