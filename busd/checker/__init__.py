"""Where file checks run: worker processes by default, threads on request.

A check is mostly Python between short syscalls and a footer parse. On threads, every check
competes with the event loop and the catalog writer for the GIL, and the hand-offs cost more
than the work (60 µs of CPU per file inside the daemon against 33 µs alone). Worker processes
share no GIL with the daemon: each is ``python -c WORKER_CODE`` (see wire.py), reads requests
(a slice of a batch's events) on stdin and answers on stdout, both as length-prefixed msgpack,
and exits when its stdin closes — so it never outlives busd. They are plain subprocesses, not
``multiprocessing``: nothing re-imports the program that embeds busd.

A worker that dies (a file that crashes the Parquet reader, the OOM killer) is started again
and the events of its slice are checked one at a time, so the event that kills a worker
again is rejected for it and the others are decided as usual — provided a fresh worker
answers an empty request. Workers that cannot run at all (their interpreter cannot be
executed, a process limit, a crash as they start) are the machine's fault: busd waits for
them before it fetches anything (:meth:`Checker.ready`), and the events in hand when it
happens later are checked again later (FileUnavailable), so no restart and no wait uses up
a delivery.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from busd import log, validate
from busd.checker.wire import (
    HEADER,
    WORKER_CODE,
    Answer,
    Request,
    Result,
    answer_decoder,
    check_one,
    encoder,
    frame,
    from_wire,
    timed_out,
    with_meta,
)
from busd.errors import FileUnavailable, InvalidEvent, Reason, TransientError
from busd.model import Artifact
from busd.validate import ChecksumPolicy

_CHUNK_MIN = 32  # events per worker request, at least (a request costs ~0.1 ms)
_START_S = 30.0  # a fresh worker imports pyarrow, then says it is ready
_KILL_WAIT_S = 5.0  # a killed worker stuck in the kernel is left behind after this


# ---- the parent side ----------------------------------------------------------------------
class WorkerDied(Exception):
    """A worker process exited while it checked a request; ``answers`` came before."""

    def __init__(
        self, why: str, answers: list[Answer], *, crashed: bool = True, ran: bool = True
    ) -> None:
        super().__init__(why)
        self.answers = answers
        self.crashed = crashed  # by a signal of its own faults, not killed from outside
        self.ran = ran  # False: it could not even be started (fork or exec failed)


# what a process dies of when the code it runs crashes (a file that breaks the reader)
_CRASHES = frozenset({signal.SIGSEGV, signal.SIGBUS, signal.SIGABRT, signal.SIGILL, signal.SIGFPE})


def _crash_signal(returncode: int | None) -> bool:
    """A death by a crash signal; an exit status or SIGKILL/SIGTERM says nothing of a file."""
    return returncode is not None and returncode < 0 and -returncode in _CRASHES


class WorkerStalled(Exception):
    """A worker sent nothing for the check timeout (it was killed); ``answers`` came before:
    the event after them is the one whose check hung."""

    def __init__(self, answers: list[Answer]) -> None:
        super().__init__("stalled")
        self.answers = answers


_reaping: set[asyncio.Future[int]] = set()  # killed workers not exited yet


class _Worker:
    def __init__(self, advanced: Callable[[], None]) -> None:
        self.advanced = advanced  # called on each frame of an answer, a sign of progress
        self.proc: asyncio.subprocess.Process | None = None
        self.lock = asyncio.Lock()
        self.fresh = False  # started, its "ready" not read yet

    async def start(self) -> None:
        try:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-c",
                WORKER_CODE,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                limit=1 << 26,
            )
        except OSError as exc:  # no fork or exec: a process limit, the interpreter gone
            raise WorkerDied(str(exc), [], crashed=False, ran=False) from None
        self.fresh = True

    @staticmethod
    async def _frame(stdout: asyncio.StreamReader) -> bytes:
        header = await stdout.readexactly(HEADER)
        return await stdout.readexactly(int.from_bytes(header, "little"))

    async def ensure(self) -> None:
        if self.proc is None or self.proc.returncode is not None:
            await self.start()

    async def ask(
        self,
        request: bytes,
        count: int,
        timeout_s: float,
        *,
        pace: Callable[[int, float], None] | None = None,
    ) -> list[Answer]:
        """One request, its ``count`` answers; each frame of them must come within
        ``timeout_s`` (a worker hashing a large file sends empty frames as it reads).
        ``pace(events, seconds)`` learns how long it took."""
        async with self.lock:
            await self.ensure()
            proc = self.proc
            assert proc is not None and proc.stdin is not None and proc.stdout is not None
            started = time.monotonic()
            answers: list[Answer] = []
            try:
                if self.fresh:  # its imports take a while, once
                    async with asyncio.timeout(_START_S):
                        await self._frame(proc.stdout)
                    self.fresh = False
                    started = time.monotonic()
                proc.stdin.write(request)
                while True:
                    async with asyncio.timeout(timeout_s):
                        await proc.stdin.drain()
                        frame = await self._frame(proc.stdout)
                    answers += answer_decoder.decode(frame)
                    if count:
                        self.advanced()
                    if len(answers) >= count:
                        break
            except TimeoutError:
                await self._reap()
                raise WorkerStalled(answers) from None
            except (asyncio.IncompleteReadError, ConnectionError) as exc:
                await self._exited()
                raise WorkerDied(
                    f"exit status {proc.returncode}",
                    answers,
                    crashed=_crash_signal(proc.returncode),
                ) from exc
            except asyncio.CancelledError:
                # its answer would be read by the next request: this worker is done
                self.proc = None
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                raise
            if pace is not None:
                pace(len(answers), time.monotonic() - started)
            return answers

    async def _exited(self) -> None:
        """Its pipe closed: the worker is dying; wait for its exit status, which says whether
        a file crashed it. Killing it at once would race the kernel: ``Popen.kill`` polls
        first and reaps a zombie under asyncio's child watcher, which then reports 255."""
        proc = self.proc
        if proc is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(proc.wait()), _KILL_WAIT_S)
        except TimeoutError:
            await self._reap()  # closed its output but lives on: it is no use
        else:
            self.proc = None

    async def _reap(self) -> None:
        """Kill it and go on: one in a read the kernel will not interrupt (a hung network
        or FUSE filesystem) exits only when that read returns, and is reaped then."""
        proc, self.proc = self.proc, None
        if proc is not None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            task = asyncio.ensure_future(proc.wait())
            _reaping.add(task)
            task.add_done_callback(_reaping.discard)

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
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), _KILL_WAIT_S)


_check_thread = threading.local()  # .job: the _ThreadJob a check thread runs


def _read_on_thread() -> None:
    """validate.on_read on the checks' threads: the job advances."""
    job: _ThreadJob | None = getattr(_check_thread, "job", None)
    if job is not None:
        job.read()


class _ThreadJob:
    """Checks on a daemon thread of its own: one stuck in a read can be left behind (it
    stops after that read), and never holds up busd's exit."""

    def __init__(
        self,
        events: Sequence[Sequence[Artifact]],
        roots: Sequence[Path],
        checksum: ChecksumPolicy,
        settle_s: float,
        advanced: Callable[[], None],
    ) -> None:
        self.events, self.roots, self.checksum, self.settle_s = events, roots, checksum, settle_s
        self.advanced = advanced
        self.results: list[Result] = []
        self.last = time.monotonic()  # when the last check finished or read a chunk
        self.abandoned = False
        self.done = asyncio.Event()
        self._loop = asyncio.get_running_loop()

    def start(self) -> None:
        threading.Thread(target=self._run, name="busd-check", daemon=True).start()

    def read(self) -> None:
        self.last = time.monotonic()
        self.advanced()

    def _run(self) -> None:
        _check_thread.job = self
        try:
            for artifacts in self.events:
                if self.abandoned:
                    return
                self.results.append(check_one(artifacts, self.roots, self.checksum, self.settle_s))
                self.read()
        finally:
            _check_thread.job = None
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                self._loop.call_soon_threadsafe(self.done.set)


class Checker:
    """Checks the files of many events at once, in ``processes`` worker processes (or on
    ``threads`` threads of this process when ``processes`` is 0). A check that makes no
    progress for ``timeout_s`` is given up (its worker killed, its thread left behind): its
    event gets FileUnavailable, the others are checked on."""

    def __init__(
        self,
        roots: Sequence[Path],
        checksum: ChecksumPolicy,
        *,
        processes: int,
        threads: int,
        settle_s: float = 0.0,
        timeout_s: float = 30.0,
    ) -> None:
        self.roots = list(roots)
        self.checksum = checksum
        self.threads = threads
        self.settle_s = settle_s
        self.timeout_s = timeout_s
        self._workers = [_Worker(self._advanced) for _ in range(processes)]
        self._advances = 0  # answers and signs of progress from checks, ever
        self._slots: asyncio.Semaphore | None = None
        self._per_event_s = 0.0  # recent seconds of checking per event, in one worker

    def progress(self) -> int:
        """Changes while checks advance: an answer, or a chunk of a large file read; never
        while a check is stuck in a read (or none runs)."""
        return self._advances

    def _advanced(self) -> None:
        self._advances += 1  # from check threads too: a lost increment still changes it

    def seconds_for(self, events: int) -> float:
        """About how long checking this many more events takes, by the recent pace."""
        return events * self._per_event_s / max(1, len(self._workers) or self.threads)

    def _pace(self, events: int, seconds: float) -> None:
        if events:
            self._per_event_s = 0.8 * self._per_event_s + 0.2 * seconds / events

    async def start(self) -> None:
        """Start the worker processes now: each imports pyarrow (about 0.3 s) while busd
        connects to NATS, instead of during the first batch. :meth:`ready` says whether
        they could."""
        for worker in self._workers:
            with contextlib.suppress(WorkerDied):  # ready() tries again and says why
                await worker.ensure()

    async def ready(self) -> None:
        """Every worker process answers; TransientError naming why one cannot (an exec that
        fails, a process limit, a worker that dies as it starts). The daemon fetches nothing
        before this passes, so a machine that cannot run workers uses up no delivery."""
        whys = await asyncio.gather(*(self._cannot_work(w) for w in self._workers))
        failed = [why for why in whys if why is not None]
        if failed:
            raise TransientError(f"file-check workers cannot start: {failed[0]}")

    async def close(self) -> None:
        await asyncio.gather(*(w.close() for w in self._workers))

    async def check(self, events: Sequence[Sequence[Artifact]]) -> list[Result]:
        if not events:
            return []
        if not self._workers:
            return await self._on_threads(events)
        n = max(1, min(len(self._workers), len(events) // _CHUNK_MIN))
        parts = await asyncio.gather(
            *(self._on_worker(self._workers[i], part) for i, part in enumerate(_slices(events, n)))
        )
        return [r for part in parts for r in part]

    def _request(self, events: Sequence[Sequence[Artifact]]) -> bytes:
        # without meta: the checks never read it, and JSON allows integers msgpack does not
        bare = [[Artifact(a.name, a.path, a.rows, a.bytes, a.sha256) for a in e] for e in events]
        return frame(
            encoder.encode(
                Request([str(r) for r in self.roots], self.checksum, self.settle_s, bare)
            )
        )

    def _stalled(self, events: int) -> FileUnavailable:
        log.get().warning(
            "a file check made no progress; its event is checked again later",
            timeout_s=self.timeout_s,
            events_in_request=events,
        )
        return timed_out(self.timeout_s)

    async def _on_worker(
        self, worker: _Worker, events: Sequence[Sequence[Artifact]]
    ) -> list[Result]:
        results: list[Result] = []

        def take(answers: list[Answer]) -> None:
            done = events[len(results) : len(results) + len(answers)]
            results.extend(with_meta(from_wire(a), e) for a, e in zip(answers, done, strict=True))

        while len(results) < len(events):
            rest = events[len(results) :]
            try:
                take(
                    await worker.ask(
                        self._request(rest), len(rest), self.timeout_s, pace=self._pace
                    )
                )
            except WorkerStalled as exc:  # the event after its answers hung: the rest go on
                take(exc.answers)
                results.append(self._stalled(len(rest)))
            except WorkerDied as exc:
                take(exc.answers)
                log.get().warning(
                    "a file-check worker died; checking its events one at a time",
                    events=len(events) - len(results),
                    worker=str(exc),
                )
                results += await self._one_at_a_time(worker, events[len(results) :])
        return results

    async def _one_at_a_time(
        self, worker: _Worker, events: Sequence[Sequence[Artifact]]
    ) -> list[Result]:
        """Each event alone, so the one that kills a worker again is known — provided a
        fresh worker can work at all; if not, nothing is decided: the events are checked
        again later, as after any error of the machine."""
        results: list[Result] = []
        for artifacts in events:
            why = await self._cannot_work(worker) if worker.proc is None else None
            if why is not None:
                return results + [self._cannot_run(why)] * (len(events) - len(results))
            try:
                answer = await worker.ask(self._request([artifacts]), 1, self.timeout_s)
                results.append(with_meta(from_wire(answer[0]), artifacts))
            except WorkerStalled:
                results.append(self._stalled(1))
            except WorkerDied as exc:
                why = await self._cannot_work(worker)
                if why is not None:  # the event may have had nothing to do with it
                    return results + [self._cannot_run(why)] * (len(events) - len(results))
                if not exc.crashed:  # killed from outside (the OOM killer, an operator)
                    results.append(FileUnavailable(f"the checking process was killed ({exc})"))
                    continue
                results.append(
                    InvalidEvent(
                        Reason.NOT_PARQUET,
                        f"checking its files killed the checking process ({exc}): a file that "
                        "crashes the Parquet reader?",
                    )
                )
        return results

    async def _cannot_work(self, worker: _Worker) -> str | None:
        """None when a (fresh) worker answers an empty request; else why it cannot, a fault
        of the machine and not of an event."""
        try:
            await worker.ask(self._request([]), 0, self.timeout_s)
        except WorkerDied as exc:
            if not exc.ran:
                return f"cannot run {sys.executable} -m busd.checker: {exc}"
            return f"a worker exited as it started ({exc}); its own errors are on stderr"
        except WorkerStalled:
            return f"no answer within {self.timeout_s:g}s"
        return None

    def _cannot_run(self, why: str) -> FileUnavailable:
        log.get().error("file-check workers cannot run; events checked again later", error=why)
        return FileUnavailable(f"the file-check workers cannot run: {why}")

    async def _on_threads(self, events: Sequence[Sequence[Artifact]]) -> list[Result]:
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.threads)
            validate.on_read = _read_on_thread
        slices = _slices(events, max(1, min(self.threads, len(events) // 8)))
        parts = await asyncio.gather(*(self._on_thread(part) for part in slices))
        return [r for part in parts for r in part]

    async def _on_thread(self, events: Sequence[Sequence[Artifact]]) -> list[Result]:
        assert self._slots is not None
        results: list[Result] = []
        while len(results) < len(events):
            rest = events[len(results) :]
            async with self._slots:  # a job left behind gives its slot back
                job = _ThreadJob(rest, self.roots, self.checksum, self.settle_s, self._advanced)
                job.start()
                try:
                    while not job.done.is_set():
                        left_s = job.last + self.timeout_s - time.monotonic()
                        if left_s <= 0:
                            break
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(job.done.wait(), left_s)
                finally:
                    job.abandoned = not job.done.is_set()
                got = list(job.results[: len(rest)])
            results += got
            if job.abandoned and len(got) < len(rest):
                results.append(self._stalled(len(rest)))
        return results


def _slices(items: Sequence[Sequence[Artifact]], n: int) -> list[Sequence[Sequence[Artifact]]]:
    """``n`` contiguous slices of about equal size (results are joined back in order)."""
    size = -(-len(items) // n)
    return [items[i : i + size] for i in range(0, len(items), size)]
