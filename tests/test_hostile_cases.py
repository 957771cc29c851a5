"""Hostile input, named cases: each payload or file path with the one outcome busd gives it
(the decode cases, files and paths of every odd kind, symlinks and directories swapped while
they are checked). Fuzzing is in ``test_hostile_fuzz.py``, the real daemon in
``test_hostile_daemon.py``; the cases and the world of files are in ``hostile.py``.
"""

from __future__ import annotations

import collections
import itertools
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hostile import (
    DECODE_CASES,
    World,
    assert_closed,
    dup_keys,
    facts_of,
    outcome,
    with_run,
    write_parquet,
)

from busd import events, validate
from busd.errors import InvalidEvent, Reason
from busd.model import Artifact

pytestmark = pytest.mark.usefixtures("hostile_counts")


@pytest.mark.parametrize("case", sorted(DECODE_CASES))
def test_decode_case(world: World, case: str) -> None:
    make, expected = DECODE_CASES[case]
    payload = make(world)
    started = time.perf_counter()
    assert outcome(world, payload) == expected
    assert time.perf_counter() - started < 5.0


def test_duplicate_keys_keep_the_last_value(world: World) -> None:
    event = events.decode(dup_keys(world, "run", "first", "last", "status"))
    assert event.run.status == "last"
    event = events.decode(
        dup_keys(
            world, "top", [{"name": "a", "path": "x"}], [{"name": "b", "path": "y"}], "artifacts"
        )
    )
    assert [a.name for a in event.artifacts] == ["b"]


def test_huge_numbers_in_params_survive_as_numbers(world: World) -> None:
    event = events.decode(with_run(world, params={"a": 2**70, "b": -(2**70), "c": 10**400}))
    assert event.run.params == {"a": 2**70, "b": -(2**70), "c": 10**400}


def check(world: World, path: str, **fields: Any) -> str:
    """``check_artifact`` in a thread: its reason (or "ok"), failing if it takes over 5 s."""
    result: list[str | BaseException] = []

    def go() -> None:
        try:
            got = validate.check_artifact(
                Artifact(name="a", path=path, **fields), world.roots, "always"
            )
            result.append("ok" if got.path in world.facts else f"facts of {got.path!r}")
        except InvalidEvent as exc:
            assert_closed(exc)
            result.append(exc.reason.value)
        except BaseException as exc:  # noqa: BLE001 - re-raised below, in the test's thread
            result.append(exc)

    worker = threading.Thread(target=go, daemon=True)
    worker.start()
    worker.join(5.0)
    assert not worker.is_alive(), f"check_artifact hangs on {path!r}"
    if isinstance(result[0], BaseException):
        raise result[0]
    return result[0]


FILE_CASES = {
    "runs/r1/fills.parquet": "ok",
    "runs/r1/../r1/fills.parquet": "ok",
    "in.parquet": "ok",  # a symlink that stays inside
    "we'ird \";--%\\ ünï 𝔘/x.parquet": "ok",
    "../outside/secret.parquet": "path_outside_roots",
    "runs/../../outside/secret.parquet": "path_outside_roots",
    "out.parquet": "path_outside_roots",  # a symlink out of the root
    "outdir/secret.parquet": "path_outside_roots",  # through a symlinked directory
    "/etc/passwd": "path_outside_roots",
    "/": "path_outside_roots",
    "..": "path_outside_roots",
    "missing.parquet": "file_missing",
    "dangling.parquet": "file_missing",
    "loop_a.parquet": "path_outside_roots",  # a symlink loop: "keeps changing"
    "fake.parquet": "not_parquet",
    "zero.parquet": "not_parquet",
    "magic.parquet": "not_parquet",
    "truncated.parquet": "not_parquet",
    "badfooter.parquet": "not_parquet",
    "negrows.parquet": "not_parquet",  # a footer saying -1 rows was recorded as such
    "dir.parquet": "not_parquet",
    "fifo.parquet": "not_parquet",  # opened without waiting for a writer
    "sock.parquet": "not_parquet",
    ".": "not_parquet",  # the root itself
    "nonutf8.parquet": "not_parquet",  # its real path is not UTF-8: the catalog can't hold it
    "x" * 300: "not_parquet",  # ENAMETOOLONG
}


@pytest.mark.parametrize("path", sorted(FILE_CASES))
def test_file_case(world: World, path: str) -> None:
    assert check(world, path) == FILE_CASES[path]


@pytest.mark.parametrize("where", ["root", "outside", "evil"])
def test_absolute_paths(world: World, where: str) -> None:
    path = {
        "root": str(world.root / "runs/r1/fills.parquet"),
        "outside": str(world.outside / "secret.parquet"),
        "evil": f"{world.root}_evil/x.parquet",
    }[where]  # a sibling sharing the prefix
    assert check(world, path) == ("ok" if where == "root" else "path_outside_roots")


def test_parquet_facts_are_checked(world: World) -> None:
    size, rows, digest = world.fact("runs/r1/fills.parquet")
    path = "runs/r1/fills.parquet"
    assert check(world, path, rows=rows, bytes=size, sha256=digest) == "ok"
    assert check(world, path, rows=rows + 1) == "rows_mismatch"
    assert check(world, path, bytes=size + 1) == "size_mismatch"
    assert check(world, path, sha256="0" * 64) == "checksum_mismatch"


def swap_loop(link: Path, targets: tuple[Path, Path], stop: threading.Event) -> int:
    """Atomically repoint ``link`` between two targets until ``stop``; return the swaps."""
    swaps = 0
    tmp = link.with_name(link.name + ".tmp")
    while not stop.is_set():
        os.symlink(targets[swaps % 2], tmp)
        os.replace(tmp, link)
        swaps += 1
    return swaps


def test_symlink_swapped_while_checked(world: World) -> None:
    """A symlink flipping between a file inside and one outside the root: busd records the
    inside file's exact facts or rejects — never the outside file's."""
    inside_file = world.root / "runs/r1/fills.parquet"
    size, rows, digest = world.fact("runs/r1/fills.parquet")
    link = world.root / "swap.parquet"
    os.symlink(inside_file, link)
    stop = threading.Event()
    swaps: list[int] = []
    swapper = threading.Thread(
        target=lambda: swaps.append(
            swap_loop(link, (world.outside / "secret.parquet", inside_file), stop)
        )
    )
    swapper.start()

    def inside(got: validate.CheckedArtifact) -> None:
        assert (got.path, got.bytes, got.rows, got.sha256) == (str(inside_file), size, rows, digest)

    try:
        seen = check_while_swapping(world, "swap.parquet", {Reason.PATH_OUTSIDE_ROOTS}, inside)
    finally:
        stop.set()
        swapper.join()
        link.unlink()
    print("\nsymlink swap:", swaps, dict(seen))
    assert swaps[0] > 10 and seen["inside"] and seen["path_outside_roots"], (swaps, seen)


def check_while_swapping(
    world: World,
    path: str,
    allowed: set[Reason],
    inside: Callable[[validate.CheckedArtifact], None],
) -> collections.Counter[str]:
    """``check_artifact`` of ``path``, again and again for up to 2 s (2,000 tries), and on
    for up to 20 s until one passed (under load every try can land while the swap is
    away), while a test swaps what it points to: each try fails for an ``allowed`` reason
    (counted by reason) or passes ``inside`` (counted as "inside")."""
    seen: collections.Counter[str] = collections.Counter()
    started = time.monotonic()
    for tries in itertools.count():
        took = time.monotonic() - started
        if took > 20 or ((tries >= 2000 or took > 2) and seen["inside"]):
            break
        try:
            got = validate.check_artifact(Artifact(name="a", path=path), world.roots, "always")
        except InvalidEvent as exc:
            assert exc.reason in allowed, exc
            seen[exc.reason.value] += 1
        else:
            inside(got)
            seen["inside"] += 1
    return seen


def test_directory_swapped_while_checked(world: World) -> None:
    """A real directory on the resolved path becomes a symlink out of the root between
    ``realpath`` and ``open``: the open fd's own path gives it away."""
    real = world.root / "mid"
    write_parquet(real / "x.parquet", 4)
    facts = facts_of(real / "x.parquet")
    write_parquet(world.outside / "mid" / "x.parquet", 9)
    parked = world.root / "mid.parked"
    stop = threading.Event()

    def swap() -> None:
        while not stop.is_set():
            os.rename(real, parked)
            os.symlink(world.outside / "mid", real)
            time.sleep(0)
            os.unlink(real)
            os.rename(parked, real)

    swapper = threading.Thread(target=swap)
    swapper.start()

    def inside(got: validate.CheckedArtifact) -> None:
        assert (got.bytes, got.rows, got.sha256) == facts
        # where the file was when opened: renamed to mid.parked under busd, it is still the
        # same file, still inside the root
        assert got.path in (str(real / "x.parquet"), str(parked / "x.parquet"))

    try:  # file_missing too, while the directory is away
        seen = check_while_swapping(
            world, "mid/x.parquet", {Reason.PATH_OUTSIDE_ROOTS, Reason.FILE_MISSING}, inside
        )
    finally:
        stop.set()
        swapper.join()
    print("\ndirectory swap:", dict(seen))
    assert seen["inside"], seen
