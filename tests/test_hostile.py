"""Hostile input: whatever arrives, busd ends with a valid event or a closed-set rejection.

Never an unexpected exception, a hang, a crash, or facts recorded about a file outside the
artifact roots. Three layers: hypothesis fuzzing of ``events.decode`` → ``resolve_identity`` →
``validate.check_event`` (and of Parquet bytes through ``check_artifact``); specific cases, each
with its reason; and a mix of hostile and good messages through the real daemon.

Duplicate keys in a JSON object: msgspec validates every occurrence and keeps the last one,
so ``{"schema_version": 2, …, "schema_version": 1}`` is a valid event (and an invalid first
occurrence is still a ``schema`` rejection). The catalog stores decoded values, never the raw
payload's reading of them, so nothing downstream can see another value.
"""

from __future__ import annotations

import collections
import copy
import hashlib
import json
import os
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from hashlib import sha256
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import Bus

from busd import events, model, validate
from busd.errors import FileNotYetThere, InvalidEvent, Reason
from busd.model import Artifact

SUBJECT = "artifacts.lab.sim"
REASONS = {r.value for r in Reason}
COUNTS: collections.Counter[str] = collections.Counter()
# scale of the fuzz runs: the default run, and `--long` (marker `slow`)
SCALES = [pytest.param(1, id="default"), pytest.param(10, id="long", marks=pytest.mark.slow)]


def fuzz_settings(n: int) -> settings:
    return settings(max_examples=n, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much])


# ---- the world: an artifact root full of good, odd and hostile files ---------------------------
def write_parquet(path: Path, rows: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"x": list(range(rows)), "y": [f"v{i}" for i in range(rows)]}), path)


def negative_rows(good: bytes) -> bytes:
    """``good`` with one footer byte changed so that the footer says it has -1 rows."""
    for pos in range(len(good) - 9, 3, -1):
        blob = bytearray(good)
        blob[pos] = 1
        try:
            if pq.ParquetFile(pa.BufferReader(bytes(blob))).metadata.num_rows < 0:
                return bytes(blob)
        except (pa.ArrowException, OSError, ValueError):
            continue
    raise AssertionError("no byte makes the row count negative")


@dataclass
class World:
    root: Path
    outside: Path
    facts: dict[str, tuple[int, int, str]]  # real path inside the root → (bytes, rows, sha256)
    paths: list[str]  # hostile `path` values
    base: dict[str, Any]  # a valid event

    @property
    def roots(self) -> list[Path]:
        return [self.root]

    def fact(self, rel: str) -> tuple[int, int, str]:
        return self.facts[os.path.realpath(self.root / rel)]

    def __repr__(self) -> str:
        return f"World({self.root.name})"


def facts_of(path: Path) -> tuple[int, int, str]:
    data = path.read_bytes()
    return len(data), pq.ParquetFile(path).metadata.num_rows, hashlib.sha256(data).hexdigest()


def build_world(base: Path) -> World:
    root, outside, evil = base / "artifacts", base / "outside", base / "artifacts_evil"
    write_parquet(root / "runs/r1/fills.parquet", 3)
    write_parquet(root / "runs/r1/positions.parquet", 5)
    write_parquet(root / "we'ird \";--%\\ ünï 𝔘/x.parquet", 2)
    write_parquet(outside / "secret.parquet", 7)
    write_parquet(evil / "x.parquet", 11)  # shares the root's name as a prefix
    good = (root / "runs/r1/fills.parquet").read_bytes()
    (root / "fake.parquet").write_text("this is not parquet at all")
    (root / "zero.parquet").write_bytes(b"")
    (root / "magic.parquet").write_bytes(b"PAR1PAR1")
    (root / "truncated.parquet").write_bytes(good[: len(good) // 2])
    footer = bytearray(good)
    for i in range(len(footer) - 40, len(footer) - 8):  # the footer, before its length + PAR1
        footer[i] ^= 0xFF
    (root / "badfooter.parquet").write_bytes(bytes(footer))
    (root / "negrows.parquet").write_bytes(negative_rows(good))
    (root / "dir.parquet").mkdir()
    os.mkfifo(root / "fifo.parquet")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(root / "sock.parquet"))
    sock.close()
    os.symlink(outside / "secret.parquet", root / "out.parquet")
    os.symlink(Path("..") / "outside", root / "outdir")
    os.symlink("runs/r1/fills.parquet", root / "in.parquet")
    os.symlink("nowhere/none.parquet", root / "dangling.parquet")
    os.symlink("loop_b.parquet", root / "loop_a.parquet")
    os.symlink("loop_a.parquet", root / "loop_b.parquet")
    raw_root = os.fsencode(root)
    os.mkdir(raw_root + b"/\xff")  # a directory whose name is not UTF-8
    with open(raw_root + b"/\xff/x.parquet", "wb") as handle:
        pq.write_table(pa.table({"x": [1]}), handle)
    os.symlink(raw_root + b"/\xff/x.parquet", raw_root + b"/nonutf8.parquet")
    facts = {os.path.realpath(root / rel): facts_of(root / rel)
             for rel in ("runs/r1/fills.parquet", "runs/r1/positions.parquet",
                         "we'ird \";--%\\ ünï 𝔘/x.parquet")}
    names = ["runs/r1/fills.parquet", "runs/r1/positions.parquet",
             "we'ird \";--%\\ ünï 𝔘/x.parquet", "fake.parquet", "zero.parquet", "magic.parquet",
             "truncated.parquet", "badfooter.parquet", "negrows.parquet", "dir.parquet",
             "fifo.parquet", "sock.parquet", "out.parquet", "outdir/secret.parquet", "in.parquet",
             "dangling.parquet", "loop_a.parquet", "nonutf8.parquet", "missing.parquet"]
    paths = [*names, *(str(root / n) for n in names[:3]),
             "../outside/secret.parquet", "runs/../../outside/secret.parquet",
             "runs/r1/../r1/fills.parquet", "./runs//r1/./fills.parquet", "runs/r1/fills.parquet/",
             str(outside / "secret.parquet"), str(evil / "x.parquet"),
             f"{root}/../outside/secret.parquet", f"{root}_evil/x.parquet",
             "/etc/passwd", "/dev/zero", "/proc/self/environ", "/", ".", "..", "//", "~",
             "x" * 300, "a/" * 2040, "\t", " ", "ü.parquet", "\u202e", "runs\\r1\\fills.parquet",
             "file:///etc/passwd", "%2e%2e/outside/secret.parquet", "a\x00b", "\x00", "",
             "runs/r1/fills.parquet\x00.txt"]
    fills = root / "runs/r1/fills.parquet"
    size, rows, digest = facts[os.path.realpath(fills)]
    event: dict[str, Any] = {
        "schema_version": 1, "event_id": "sim-1:final", "producer": "lab.sim",
        "run": {"run_id": "sim-1", "kind": "simulation", "status": "succeeded",
                "started_at": "2026-11-28T10:00:00Z", "finished_at": "2026-11-28T10:05:00Z",
                "params": {"strategy": "meanrev", "seed": 7}, "code_version": "a1b2c3d",
                "parent_run_id": None},
        "artifacts": [{"name": "fills", "path": "runs/r1/fills.parquet", "rows": rows,
                       "bytes": size, "sha256": digest, "meta": {"k": "v"}},
                      {"name": "positions", "path": str(root / "runs/r1/positions.parquet")}]}
    return World(root, outside, facts, paths, event)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    return build_world(tmp_path_factory.mktemp("hostile").resolve())


@pytest.fixture(scope="module", autouse=True)
def _report_counts() -> Iterator[None]:
    yield
    if COUNTS:
        print("\nhostile payloads:", dict(sorted(COUNTS.items())))


# ---- the property every payload must satisfy -------------------------------------------------
def assert_closed(exc: InvalidEvent) -> None:
    assert isinstance(exc.reason, Reason) and exc.reason.value in REASONS
    assert exc.detail
    exc.detail.encode("utf-8")  # storable in rejections_f.detail (no lone surrogates)


def decode_once(payload: bytes) -> model.ArtifactEvent | InvalidEvent:
    try:
        return events.decode(payload)
    except InvalidEvent as exc:  # any other exception fails the test
        assert type(exc) is InvalidEvent
        assert_closed(exc)
        return exc


def outcome(world: World, payload: bytes, msg_id: str | None = None,
            subject: str = SUBJECT) -> str:
    """What busd makes of ``payload``: ``ok`` or the rejection reason. Asserts the contract."""
    first, again = decode_once(payload), decode_once(payload)
    if isinstance(first, InvalidEvent):  # deterministic
        assert isinstance(again, InvalidEvent)
        assert (first.reason, first.detail) == (again.reason, again.detail)
        return first.reason.value
    assert isinstance(again, model.ArtifactEvent) and again == first
    event = first
    assert events.decode(events.encode(event)) == event  # what the catalog stores re-reads
    try:
        event_id, producer = events.resolve_identity(event, subject, msg_id,
                                                     events.payload_sha256(payload))
    except InvalidEvent as exc:
        assert_closed(exc)
        assert exc.reason is Reason.PRODUCER_MISMATCH
        return exc.reason.value
    assert event_id and producer == events.producer_of(subject)
    try:
        checked = validate.check_event(event, world.roots, "if_given")
    except InvalidEvent as exc:
        assert type(exc) in (InvalidEvent, FileNotYetThere)
        assert_closed(exc)
        assert exc.reason not in (Reason.MALFORMED, Reason.SCHEMA, Reason.TOO_LARGE)
        return exc.reason.value
    assert len(checked) == len(event.artifacts)
    for art, got in zip(event.artifacts, checked, strict=True):
        assert got.path in world.facts, f"facts recorded about {got.path!r}"
        size, rows, digest = world.facts[got.path]
        assert (got.bytes, got.rows) == (size, rows)
        assert got.sha256 in (None, digest) and got.sha256 == art.sha256
        assert got.name == art.name
    return "ok"


def run(world: World, label: str, payload: bytes, msg_id: str | None = None) -> str:
    result = outcome(world, payload, msg_id)
    COUNTS[label] += 1
    return result


# ---- payload strategies ----------------------------------------------------------------------
@dataclass(frozen=True)
class Raw:
    """A JSON fragment written as is: numbers Python's json would not write, bad escapes."""

    text: str


@dataclass(frozen=True)
class Pairs:
    """An object with duplicate keys."""

    items: tuple[tuple[str, Any], ...]


def dumps(value: Any, ascii_only: bool = True) -> str:
    """JSON text; ``Raw`` is written as is, ``{"__pairs__": Pairs(...)}`` with duplicate keys."""
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, dict) and set(value) == {"__pairs__"}:
        value = value["__pairs__"]
    if isinstance(value, (dict, Pairs)):
        items = value.items if isinstance(value, Pairs) else value.items()
        return "{" + ",".join(f"{json.dumps(k, ensure_ascii=ascii_only)}:{dumps(v, ascii_only)}"
                              for k, v in items) + "}"
    if isinstance(value, list):
        return "[" + ",".join(dumps(v, ascii_only) for v in value) + "]"
    return json.dumps(value, ensure_ascii=ascii_only)


RAW_NUMBERS = [Raw(t) for t in ("1e999", "-1e999", "1E400", "1e-400", "NaN", "Infinity",
                                "-Infinity", "18446744073709551616", "-9223372036854775809",
                                "1180591620717411303424", "3.0", "1.0e0", "01", "-0", "+1",
                                ".5", "0x10", "1_000")]
RAW_STRINGS = [Raw(t) for t in (r'"\ud800"', r'"\udc00x"', r'"\ud800\ud800"', r'"\u0000"',
                                r'"a\u0000b"', r'"\x41"', r'"\q"', r'"\u12"', '"a\tb"',
                                '"\\u005c\\u0022"')]
HOSTILE_SCALARS: list[Any] = [
    2**70, -(2**70), 2**63, -(2**63) - 1, 2**64, 2**62, 2**62 + 1, -1, 0, 1.5, 1e308, -0.0,
    "NaN", "Infinity", "1e999", "", " ", "\x00", "a\x00b", "..", "../../etc/passwd",
    "/etc/passwd", "ü", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "\u202e", "\ufeff", "'", '";--', "\\", "%", "_",
    "'; DROP TABLE catalog.runs_d; --", "A" * 200, "A" * 201, "r\n", "x" * 5000, True, False,
    None, [], {}, [[[]]], {"": None}, *RAW_NUMBERS, *RAW_STRINGS]
IDENT_CHARS = "ABCXYZabcxyz0189._:/-"
HOSTILE_IDENTS = ["a" * 200, "a" * 201, "", "a b", "r\n", "\nr", "r\r", "ü", "a/b:c.d-e_f", ".",
                  "..", "/", "-" * 200, "lab.sim", "lab.sim\n", "LAB.SIM", "a\x00", "a'b", "0"]
TIMES = ["2026-11-28T10:00:00Z", "2026-11-28T10:00:00", "2026-11-28T10:00:00.123456789+05:30",
         "0001-01-01T00:00:00+23:59", "9999-12-31T23:59:59-23:59", "2026-02-30T00:00:00Z",
         "2026-11-28T25:00:00Z", "2026-11-28T10:00:60Z", "", "now", "2026-11-28", 0, 1e10,
         "2026-11-28T10:00:00+24:00", "+12026-01-01T00:00:00Z"]

json_leaves = (st.none() | st.booleans() | st.integers()
               | st.integers(min_value=-(2**80), max_value=2**80)
               | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20))
def _json_containers(kids: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.lists(kids, max_size=5) | st.dictionaries(st.text(max_size=8), kids, max_size=5)


json_values = st.recursive(json_leaves, _json_containers, max_leaves=25)
idents = (st.sampled_from(HOSTILE_IDENTS)
          | st.text(alphabet=IDENT_CHARS, min_size=1, max_size=202) | st.text(max_size=10))
# deep copies: a mutation must never edit the shared `{}` or `[[[]]]` of HOSTILE_SCALARS
hostile = st.sampled_from(HOSTILE_SCALARS).map(copy.deepcopy) | json_values | idents
FIELDS = {"top": ["schema_version", "run", "artifacts", "event_id", "producer"],
          "run": ["run_id", "kind", "status", "started_at", "finished_at", "params",
                  "code_version", "parent_run_id"],
          "art": ["name", "path", "rows", "bytes", "sha256", "meta"],
          "params": ["strategy", "seed"], "meta": ["k"]}


def container(event: Any, where: str, data: st.DataObject) -> dict[str, Any] | None:
    """The (mutable) object ``where`` names in a possibly already mutated event."""
    if not isinstance(event, dict):
        return None
    if where == "top":
        return event
    run_ = event.get("run")
    arts = event.get("artifacts")
    if where in ("run", "params"):
        if not isinstance(run_, dict):
            return None
        if where == "run":
            return run_
        params = run_.get("params")
        return params if isinstance(params, dict) else None
    if not isinstance(arts, list) or not arts:
        return None
    art = arts[data.draw(st.integers(0, len(arts) - 1), label="artifact")]
    if not isinstance(art, dict):
        return None
    if where == "art":
        return art
    meta = art.setdefault("meta", {})
    return meta if isinstance(meta, dict) else None


def mutate(world: World, data: st.DataObject) -> bytes:
    """A real valid event, changed by a few hostile edits, then maybe by byte edits."""
    event: Any = json.loads(json.dumps(world.base))
    for _ in range(data.draw(st.integers(0, 4), label="edits")):
        op = data.draw(st.sampled_from(["del", "set", "add", "path", "ident", "count", "time",
                                        "version", "dup", "type"]), label="op")
        where = {"path": "art", "count": "art", "time": "run", "version": "top",
                 "dup": "top"}.get(op) or data.draw(st.sampled_from(sorted(FIELDS)))
        obj = container(event, where, data)
        if obj is None:
            continue
        if op == "del" and obj:
            del obj[data.draw(st.sampled_from(sorted(obj)))]
        elif op == "set":
            obj[data.draw(st.sampled_from(FIELDS[where]))] = data.draw(hostile)
        elif op == "add":
            obj[data.draw(st.text(max_size=12))] = data.draw(hostile)
        elif op == "path":
            obj["path"] = data.draw(st.sampled_from(world.paths) | st.text(max_size=30))
        elif op == "ident":
            key = data.draw(st.sampled_from({"top": ["event_id", "producer"],
                                             "run": ["run_id", "kind", "parent_run_id"],
                                             "art": ["name", "sha256"]}.get(where, ["k"])))
            obj[key] = data.draw(idents)
        elif op == "count":
            key = data.draw(st.sampled_from(["rows", "bytes"]))
            right = obj.get(key) if isinstance(obj.get(key), int) else 3
            obj[key] = data.draw(st.sampled_from([right, right + 1, right - 1, -1, 0, 2**62,
                                                  2**62 + 1, 2**63, 2**70, -(2**70), "3",
                                                  True, None, *RAW_NUMBERS[:8]]))
        elif op == "time":
            obj[data.draw(st.sampled_from(["started_at", "finished_at"]))] = data.draw(
                st.sampled_from(TIMES) | st.text(max_size=30))
        elif op == "version":
            obj["schema_version"] = data.draw(st.sampled_from(
                [1, 0, 2, -1, 2**70, -(2**70), 1.0, "1", True, None, Raw("1e999"),
                 Raw("1.0e0"), Raw("1E0"), [1]]))
        elif op == "dup" and isinstance(obj.get("artifacts"), list) and obj["artifacts"]:
            arts = obj["artifacts"]
            copies = data.draw(st.sampled_from([1] * 8 + [2] * 8 + [max(1, 1000 - len(arts)),
                                                                    max(1, 1001 - len(arts))]))
            rename = data.draw(st.booleans())  # else the same name twice: `schema`
            for i in range(copies):
                clone = arts[0]
                if copies > 2:  # ~1000 artifacts: small ones, not 1000 footers to read
                    clone = {"name": f"c{i}" if rename else "c", "path": "missing.parquet"}
                elif isinstance(clone, dict):
                    clone = {**clone, "name": f"c{i}"} if rename else dict(clone)
                arts.append(clone)
        elif op == "type":
            key = data.draw(st.sampled_from(sorted(obj))) if obj else "x"
            obj[key] = data.draw(st.sampled_from([[obj.get(key)], {"v": obj.get(key)}, None,
                                                  str(obj.get(key)), 1]))
    where = data.draw(st.sampled_from([None, None, "top", "run", "art"]), label="dupkey")
    if where is not None:
        obj = container(event, where, data)
        if obj is not None:
            key = data.draw(st.sampled_from(FIELDS[where]))
            pairs = Pairs((*obj.items(), (key, data.draw(hostile))))
            obj.clear()
            obj["__pairs__"] = pairs
    return dumps(event, data.draw(st.booleans(), label="ascii")).encode()


EDIT_BYTES = b'\x00"\\[{}\xff\xc0\x80\n0:,'


def byte_edits(payload: bytes, rng: random.Random) -> bytes:
    """``payload`` with 1–4 byte flips, insertions, deletions or a cut."""
    out = bytearray(payload)
    for _ in range(rng.randint(1, 4)):
        pos = rng.randrange(len(out) + 1)
        byte = rng.choice(EDIT_BYTES) if rng.random() < 0.7 else rng.randrange(256)
        how = rng.choice(["flip", "insert", "delete", "delete", "cut"])
        if how == "flip" and pos < len(out):
            out[pos] = byte
        elif how == "insert":
            out[pos:pos] = bytes([byte])
        elif how == "delete":
            del out[pos:pos + rng.randint(1, 8)]
        elif how == "cut" and rng.random() < 0.3:
            del out[pos:]
    return bytes(out)


token_soup = st.lists(st.sampled_from(
    [b"{", b"}", b"[", b"]", b'"', b":", b",", b"\\", b"1", b"-1", b"e9", b"null", b"true",
     b'"schema_version"', b'"run"', b'"artifacts"', b'"name"', b'"path"', b"\xff", b"\x00",
     b" ", b"\\u", b"d800", b"\xc0\xaf", b"\xed\xa0\x80", b"1e999", b"\n"]),
    max_size=120).map(b"".join)


def event_shaped() -> st.SearchStrategy[dict[str, Any]]:
    """Objects with the event's field names and hostile values, nested like an event."""
    art = st.fixed_dictionaries({}, optional={k: hostile for k in FIELDS["art"]})
    run_ = st.fixed_dictionaries({}, optional={k: hostile for k in FIELDS["run"]})
    return st.fixed_dictionaries({}, optional={
        "schema_version": st.sampled_from([1, 1, 2]) | hostile, "run": run_ | hostile,
        "artifacts": st.lists(art, max_size=3) | hostile, "event_id": idents,
        "producer": idents})


# ---- 1. fuzzing --------------------------------------------------------------------------------
N_BYTES, N_SOUP, N_JSON, N_SHAPED, N_MUTATED, N_DEPTH, N_PARQUET = (
    5000, 4000, 3000, 2000, 4000, 2000, 800)


@pytest.mark.parametrize("scale", SCALES)
def test_fuzz_arbitrary_bytes(world: World, scale: int) -> None:
    @fuzz_settings(N_BYTES * scale)
    @given(st.binary(max_size=600))
    def bytes_(payload: bytes) -> None:
        assert run(world, "bytes", payload) in REASONS

    @fuzz_settings(N_SOUP * scale)
    @given(token_soup)
    def soup(payload: bytes) -> None:
        run(world, "token soup", payload)

    bytes_()
    soup()


def in_event(world: World, value: Any) -> list[tuple[str, Any]]:
    """``value`` in each typed slot ("typed") or free object ("free") of a valid event."""
    base = world.base
    run_, art = base["run"], base["artifacts"][0]
    return [("typed", {**base, "run": value}), ("typed", {**base, "artifacts": value}),
            ("typed", {**base, "artifacts": [value, *base["artifacts"][1:]]}),
            ("free", {**base, "run": {**run_, "params": value}}),
            ("free", {**base, "artifacts": [{**art, "meta": value}]})]


@pytest.mark.parametrize("scale", SCALES)
def test_fuzz_json_values(world: World, scale: int) -> None:
    """Arbitrary JSON (st.recursive), alone and in every free or typed slot of an event."""

    @fuzz_settings(N_JSON * scale)
    @given(json_values, st.booleans())
    def values(value: Any, ascii_only: bool) -> None:
        result = run(world, "json values", dumps(value, ascii_only).encode())
        assert result == ("malformed" if not isinstance(value, dict) else "schema")
        for slot, payload in in_event(world, value):
            result = run(world, "json values in an event", dumps(payload, ascii_only).encode())
            if slot == "free":  # params and meta take any JSON object
                assert result == ("ok" if isinstance(value, dict) or value is None
                                  else "schema")

    @fuzz_settings(N_SHAPED * scale)
    @given(event_shaped(), st.booleans())
    def shaped(value: dict[str, Any], ascii_only: bool) -> None:
        run(world, "event-shaped", dumps(value, ascii_only).encode())

    values()
    shaped()


@pytest.mark.parametrize("scale", SCALES)
def test_fuzz_mutated_events(world: World, scale: int) -> None:
    """A real event with hostile edits (fields dropped, added, retyped, huge numbers, odd
    identifiers and paths, duplicate keys), then each also with random byte edits."""
    assert outcome(world, dumps(world.base).encode()) == "ok"
    seen: collections.Counter[str] = collections.Counter()

    @fuzz_settings(N_MUTATED * scale)
    @given(st.data(), st.sampled_from([None, None, "m-1", "x y'\";--", "ü" * 300, ""]),
           st.randoms(use_true_random=False))
    def mutated(data: st.DataObject, msg_id: str | None, rng: random.Random) -> None:
        payload = mutate(world, data)
        seen[run(world, "mutated event", payload, msg_id)] += 1
        for _ in range(3):
            seen[run(world, "mutated event + byte edits", byte_edits(payload, rng))] += 1

    mutated()
    print("\nmutated events:", dict(seen.most_common()))
    # the mutations reach every layer: decode, identity and the files
    assert {"ok", "schema", "malformed", "too_large", "unsupported_version", "producer_mismatch",
            "path_outside_roots", "not_parquet", "file_missing"} <= set(seen)


def depth(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max((depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((depth(v) for v in value), default=0)
    return 0


@pytest.mark.parametrize("scale", SCALES)
def test_fuzz_depth_scan_matches_json(scale: int) -> None:
    """The pre-decode depth bound is exact on JSON, whatever its strings hold."""
    tricky = st.text(alphabet='[]{}"\\\'ab \n', max_size=12)
    def containers(kids: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
        return st.lists(kids, max_size=3) | st.dictionaries(tricky, kids, max_size=3)

    nested = st.recursive(st.none() | st.integers() | tricky, containers, max_leaves=40)

    @fuzz_settings(N_DEPTH * scale)
    @given(nested, st.integers(0, 12))
    def scan(value: Any, limit: int) -> None:
        payload = json.dumps(value).encode()
        assert events.nesting_depth_exceeds(payload, limit) == (depth(value) > limit)
        COUNTS["depth scan"] += 1

    scan()


@pytest.mark.parametrize("scale", SCALES)
def test_fuzz_parquet_bytes(world: World, scale: int) -> None:
    """Damaged Parquet files (footer flips, cuts, junk): a closed-set reason or true facts."""
    good = (world.root / "runs/r1/fills.parquet").read_bytes()
    target = world.root / "fuzz" / "f.parquet"
    target.parent.mkdir(exist_ok=True)

    @fuzz_settings(N_PARQUET * scale)
    @given(st.data())
    def damaged(data: st.DataObject) -> None:
        blob = bytearray(good)
        for _ in range(data.draw(st.integers(1, 6))):
            how = data.draw(st.sampled_from(["flip", "flip", "cut", "junk", "len"]))
            # mostly the footer: the last ~200 bytes hold the Thrift metadata and its length
            pos = data.draw(st.integers(max(0, len(blob) - 200), max(0, len(blob) - 1))
                            | st.integers(0, max(0, len(blob) - 1)))
            if how == "flip" and blob:
                blob[pos] = data.draw(st.integers(0, 255))
            elif how == "cut":
                del blob[pos:pos + data.draw(st.integers(1, 64))]
            elif how == "junk":
                blob[pos:pos] = data.draw(st.binary(min_size=1, max_size=32))
            elif how == "len" and len(blob) >= 8:  # the footer length, just before PAR1
                blob[-8:-4] = data.draw(st.integers(0, 2**32 - 1)).to_bytes(4, "little")
        target.write_bytes(bytes(blob))
        art = Artifact(name="f", path="fuzz/f.parquet",
                       rows=data.draw(st.sampled_from([None, 3])))
        try:
            got = validate.check_artifact(art, world.roots, "always")
        except InvalidEvent as exc:
            assert_closed(exc)
            assert exc.reason in (Reason.NOT_PARQUET, Reason.ROWS_MISMATCH)
        else:
            assert got.bytes == len(blob) and got.rows >= 0
            assert got.sha256 == hashlib.sha256(blob).hexdigest()
        COUNTS["damaged parquet"] += 1

    damaged()


# ---- 2. specific cases ------------------------------------------------------------------------
def with_run(world: World, **fields: Any) -> bytes:
    return dumps({**world.base, "run": {**world.base["run"], **fields}}).encode()


def with_art(world: World, **fields: Any) -> bytes:
    return dumps({**world.base, "artifacts": [{**world.base["artifacts"][0], **fields}]}).encode()


def deep_params(levels: int) -> dict[str, Any]:
    value: Any = 1
    for _ in range(levels):
        value = [value]
    return {"deep": value}


def padded(world: World, size: int) -> bytes:
    payload = dumps(world.base).encode()
    return payload[:-1] + b" " * (size - len(payload)) + b"}"


def dup_keys(world: World, where: str, first: Any, last: Any, key: str) -> bytes:
    """The valid event with ``key`` written twice in object ``where``: ``first`` then ``last``."""
    base = json.loads(json.dumps(world.base))
    obj = {"top": base, "run": base["run"], "art": base["artifacts"][0]}[where]
    rest = {k: v for k, v in obj.items() if k != key}
    obj.clear()
    obj["__pairs__"] = Pairs(((key, first), *rest.items(), (key, last)))
    return dumps(base).encode()


ID200, ID201 = "a" * 200, "a" * 201
DECODE_CASES: dict[str, tuple[Callable[[World], bytes], str]] = {
    # nesting: bounded before msgspec sees it (msgspec#1033)
    "deep_array": (lambda w: b"[" * 100_000, "too_large"),
    "deep_object": (lambda w: b'{"a":' * 100_000, "too_large"),
    "deep_closed": (lambda w: b"[" * 100_000 + b"]" * 100_000, "too_large"),
    "depth_64_ok": (lambda w: with_run(w, params=deep_params(61)), "ok"),
    "depth_65": (lambda w: with_run(w, params=deep_params(62)), "too_large"),
    "brackets_in_strings_ok": (lambda w: with_run(w, params={"s": "[{" * 100_000}), "ok"),
    # an unclosed string of escaped quotes made the depth scan quadratic (~20 min at 1 MiB)
    "unclosed_escapes": (lambda w: b'"' + b'\\"' * 500_000 + b"[" * 65, "malformed"),
    # size
    "one_mib_ok": (lambda w: padded(w, model.MAX_PAYLOAD_BYTES), "ok"),
    "one_mib_plus_one": (lambda w: padded(w, model.MAX_PAYLOAD_BYTES + 1), "too_large"),
    "1001_artifacts": (lambda w: dumps({**w.base, "artifacts": [
        {"name": f"a{i}", "path": "x"} for i in range(1001)]}).encode(), "too_large"),
    # not JSON, not an object, not UTF-8
    "empty": (lambda w: b"", "malformed"),
    "whitespace": (lambda w: b" \n\t", "malformed"),
    "null": (lambda w: b"null", "malformed"),
    "array": (lambda w: b"[]", "malformed"),
    "string": (lambda w: b'"{}"', "malformed"),
    "nan_literal": (lambda w: with_run(w, params={"x": Raw("NaN")}), "malformed"),
    "infinity_literal": (lambda w: with_run(w, params={"x": Raw("Infinity")}), "malformed"),
    "bad_utf8_value": (lambda w: with_run(w, status="\udcff").replace(b"\\udcff", b"\xff"),
                       "malformed"),
    "bad_utf8_key": (lambda w: b'{"\xff":1}', "malformed"),
    "overlong_utf8": (lambda w: with_run(w, status="\udcff").replace(b"\\udcff", b"\xc0\xaf"),
                      "malformed"),
    "cesu_surrogate": (lambda w: with_run(w, status="\udcff").replace(b"\\udcff",
                                                                      b"\xed\xa0\x80"),
                       "malformed"),
    "lone_surrogate_escape": (lambda w: with_run(w, status=Raw(r'"\ud800"')), "malformed"),
    "utf8_bom": (lambda w: b"\xef\xbb\xbf" + dumps(w.base).encode(), "malformed"),
    # NUL
    "nul_in_path": (lambda w: with_art(w, path="runs/r1/fills.parquet\x00.txt"), "schema"),
    "nul_path": (lambda w: with_art(w, path="\x00"), "schema"),
    "nul_in_status_ok": (lambda w: with_run(w, status="a\x00b"), "ok"),
    "empty_path": (lambda w: with_art(w, path=""), "schema"),
    # numbers
    "params_2_70_ok": (lambda w: with_run(w, params={"a": 2**70, "b": -(2**70),
                                                     "c": 10**400}), "ok"),
    "params_1e999": (lambda w: with_run(w, params={"x": Raw("1e999")}), "schema"),
    "params_minus_1e999": (lambda w: with_run(w, params={"x": Raw("-1e999")}), "schema"),
    "meta_1e400": (lambda w: with_art(w, meta={"x": Raw("1E400")}), "schema"),
    "rows_2_70": (lambda w: with_art(w, rows=2**70), "schema"),
    "rows_minus_2_70": (lambda w: with_art(w, rows=-(2**70)), "schema"),
    "rows_minus_1": (lambda w: with_art(w, rows=-1), "schema"),
    "rows_2_62_plus_1": (lambda w: with_art(w, rows=2**62 + 1), "schema"),
    "rows_2_62": (lambda w: with_art(w, rows=2**62), "rows_mismatch"),
    "rows_float": (lambda w: with_art(w, rows=3.0), "schema"),
    "rows_1e999": (lambda w: with_art(w, rows=Raw("1e999")), "schema"),
    "rows_nan_string": (lambda w: with_art(w, rows="NaN"), "schema"),
    "rows_string": (lambda w: with_art(w, rows="3"), "schema"),
    "rows_bool": (lambda w: with_art(w, rows=True), "schema"),
    "bytes_2_63": (lambda w: with_art(w, bytes=2**63), "schema"),
    "version_2_70": (lambda w: dumps({**w.base, "schema_version": 2**70}).encode(),
                     "unsupported_version"),
    "version_minus_2_70": (lambda w: dumps({**w.base, "schema_version": -(2**70)}).encode(),
                           "unsupported_version"),
    "version_float": (lambda w: dumps({**w.base, "schema_version": 1.0}).encode(), "schema"),
    "version_string": (lambda w: dumps({**w.base, "schema_version": "1"}).encode(), "schema"),
    # identifiers
    "ident_200_ok": (lambda w: with_run(w, run_id=ID200, kind=ID200), "ok"),
    "ident_201": (lambda w: with_run(w, run_id=ID201), "schema"),
    "name_201": (lambda w: with_art(w, name=ID201), "schema"),
    "event_id_201": (lambda w: dumps({**w.base, "event_id": ID201}).encode(), "schema"),
    "ident_empty": (lambda w: with_run(w, kind=""), "schema"),
    "ident_unicode": (lambda w: with_run(w, run_id="rün"), "schema"),
    "ident_sql": (lambda w: with_run(w, run_id="r';--"), "schema"),
    # Python's `$` matches before a final newline: these passed before the fix
    "ident_trailing_newline": (lambda w: with_run(w, run_id="sim-1\n"), "schema"),
    "producer_trailing_newline": (lambda w: dumps({**w.base, "producer": "lab.sim\n"}).encode(),
                                  "schema"),
    "sha256_trailing_newline": (lambda w: with_art(w, sha256="0" * 64 + "\n"), "schema"),
    "status_201": (lambda w: with_run(w, status="s" * 201), "schema"),
    "status_unicode_ok": (lambda w: with_run(w, status="ü𝔘\u202e\ufeff'\";--%\\"), "ok"),
    "status_empty_ok": (lambda w: with_run(w, status=""), "ok"),
    # times
    "time_year_10000_utc_ok": (lambda w: with_run(w, started_at="9999-12-31T23:59:59-23:59"),
                               "ok"),
    "time_feb_30": (lambda w: with_run(w, started_at="2026-02-30T00:00:00Z"), "schema"),
    "time_number": (lambda w: with_run(w, started_at=1e10), "schema"),
    # duplicate keys: msgspec keeps the last occurrence, after validating each one
    "dup_version_last_wins_ok": (lambda w: dup_keys(w, "top", 2, 1, "schema_version"), "ok"),
    "dup_version_last_wins": (lambda w: dup_keys(w, "top", 1, 2, "schema_version"),
                              "unsupported_version"),
    "dup_run_id_first_invalid": (lambda w: dup_keys(w, "run", "bad id", "sim-1", "run_id"),
                                 "schema"),
    "dup_path_last_outside": (lambda w: dup_keys(w, "art", "runs/r1/fills.parquet",
                                                 "../outside/secret.parquet", "path"),
                              "path_outside_roots"),
    "dup_producer_last_wrong": (lambda w: dup_keys(w, "top", "lab.sim", "other", "producer"),
                                "producer_mismatch"),
}


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
    event = events.decode(dup_keys(world, "top", [{"name": "a", "path": "x"}],
                                   [{"name": "b", "path": "y"}], "artifacts"))
    assert [a.name for a in event.artifacts] == ["b"]


def test_huge_numbers_in_params_survive_as_numbers(world: World) -> None:
    event = events.decode(with_run(world, params={"a": 2**70, "b": -(2**70), "c": 10**400}))
    assert event.run.params == {"a": 2**70, "b": -(2**70), "c": 10**400}


def check(world: World, path: str, **fields: Any) -> str:
    """``check_artifact`` in a thread: its reason (or "ok"), failing if it takes over 5 s."""
    result: list[str | BaseException] = []

    def go() -> None:
        try:
            got = validate.check_artifact(Artifact(name="a", path=path, **fields),
                                          world.roots, "always")
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
    path = {"root": str(world.root / "runs/r1/fills.parquet"),
            "outside": str(world.outside / "secret.parquet"),
            "evil": f"{world.root}_evil/x.parquet"}[where]  # a sibling sharing the prefix
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
    swapper = threading.Thread(target=lambda: swaps.append(
        swap_loop(link, (world.outside / "secret.parquet", inside_file), stop)))
    swapper.start()
    def inside(got: validate.CheckedArtifact) -> None:
        assert (got.path, got.bytes, got.rows, got.sha256) == (
            str(inside_file), size, rows, digest)

    try:
        seen = check_while_swapping(world, "swap.parquet", {Reason.PATH_OUTSIDE_ROOTS}, inside)
    finally:
        stop.set()
        swapper.join()
        link.unlink()
    print("\nsymlink swap:", swaps, dict(seen))
    assert swaps[0] > 10 and seen["inside"] and seen["path_outside_roots"], (swaps, seen)


def check_while_swapping(world: World, path: str, allowed: set[Reason],
                         inside: Callable[[validate.CheckedArtifact], None]
                         ) -> collections.Counter[str]:
    """``check_artifact`` of ``path``, again and again for up to 2 s, while a test swaps
    what it points to: each try fails for an ``allowed`` reason (counted by reason) or
    passes ``inside`` (counted as "inside")."""
    seen: collections.Counter[str] = collections.Counter()
    deadline = time.monotonic() + 2.0
    for _ in range(2000):
        if time.monotonic() > deadline:
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
        seen = check_while_swapping(world, "mid/x.parquet",
                                    {Reason.PATH_OUTSIDE_ROOTS, Reason.FILE_MISSING}, inside)
    finally:
        stop.set()
        swapper.join()
    print("\ndirectory swap:", dict(seen))
    assert seen["inside"], seen


# ---- 3. through the real daemon ---------------------------------------------------------------
SQL_TEXT = "'; DROP TABLE catalog.runs_d; --\"\\%_ü𝔘\u202e"


def test_sql_metacharacters_are_data(bus: Bus) -> None:
    """Quotes, comment markers, backslashes, LIKE wildcards and unicode in every free text
    field (and in a directory name and the subject) reach the catalog and exports as is."""
    path = bus.parquet("o'hara \";--%_\\ ü𝔘/fills.parquet")
    params = {"'": '";--', "%": "\\", "ü𝔘": ["'", {"k'ey": 'v"al'}], "nul": "\x00",
              "big": 2**70, SQL_TEXT: SQL_TEXT}
    meta = {"q": "' OR '1'='1", "like": "%_", "bs": "\\\\", "": SQL_TEXT}
    event = bus.event("r.1:a/b-c_d", [{"name": "f.i-l:e/s_", "path": str(path), "meta": meta}])
    event["run"].update(kind="k'", status=SQL_TEXT, code_version="a\x00b\\'", params=params,
                        parent_run_id="p/../q")
    event["run"]["kind"] = "k.-_:/"
    subject = "artifacts.o'hara;--%\\ü"
    bus.publish([event], subject=subject)
    assert bus.drain().outcomes == {"committed": 1}
    ((run_id, kind, producer, status, got_params, code_version, parent),) = bus.sql(
        "SELECT run_id, kind, producer, status, params, code_version, parent_run_id "
        "FROM catalog.runs_d")
    assert (run_id, kind, producer, status, code_version, parent) == (
        "r.1:a/b-c_d", "k.-_:/", "o'hara;--%\\ü", SQL_TEXT, "a\x00b\\'", "p/../q")
    assert json.loads(got_params) == params
    ((name, got_path, got_meta),) = bus.sql("SELECT name, path, meta FROM catalog.artifacts_f")
    assert (name, got_path) == ("f.i-l:e/s_", str(path.resolve()))
    assert json.loads(got_meta) == meta
    assert bus.sql("SELECT subject FROM catalog.events_f") == [(subject,)]
    runs = bus.export("runs").to_pylist()
    assert [(r["status"], r["producer"]) for r in runs] == [(SQL_TEXT, "o'hara;--%\\ü")]
    assert bus.sql("SELECT count(*) FROM catalog.runs_d WHERE status LIKE '%'") == [(1,)]


def hostile_mix(world: World, rng: random.Random, n: int) -> list[bytes]:
    """About ``n`` hostile payloads: every specific case that fits a NATS message, hostile
    values in fields, hostile paths, byte edits of valid events, random bytes."""
    out = [make(world) for make, _ in DECODE_CASES.values()]
    out = [p for p in out if len(p) < 1_048_000]  # NATS refuses bigger messages
    while len(out) < n:
        i = len(out)
        base = {**world.base, "event_id": f"h-{i}",
                "run": {**world.base["run"], "run_id": f"h-{i}"}}
        kind = rng.choice(["run", "art", "path", "bytes", "random"])
        if kind == "run":
            key = rng.choice(FIELDS["run"])
            payload = dumps({**base, "run": {**base["run"], key: rng.choice(HOSTILE_SCALARS)}})
        elif kind in ("art", "path"):
            key = rng.choice(FIELDS["art"]) if kind == "art" else "path"
            value = rng.choice(HOSTILE_SCALARS if kind == "art" else world.paths)
            payload = dumps({**base, "artifacts": [{**base["artifacts"][0], key: value}]})
        elif kind == "bytes":
            payload = byte_edits(dumps(base).encode(), rng).decode("latin-1")
        else:
            out.append(rng.randbytes(rng.randint(0, 300)))
            continue
        out.append(payload.encode("latin-1" if kind == "bytes" else "utf-8"))
    return out


def test_hostile_mix_through_the_daemon(bus: Bus) -> None:
    """~200 hostile messages and a few good ones: each ends in exactly one recorded outcome,
    the one the library predicts; the good ones commit; the daemon keeps running."""
    world = build_world(bus.root)  # the same files, in this bus's artifact root
    rng = random.Random(20261128)
    hostile_payloads = hostile_mix(world, rng, 200)
    goods = [json.dumps(bus.event(f"good-{i}")).encode() for i in range(5)]
    for i in range(5):
        good_file = bus.artifacts / f"good-{i}" / "fills.parquet"
        world.facts[str(good_file)] = facts_of(good_file)
    payloads = list(hostile_payloads)
    for good in goods:
        payloads.insert(rng.randrange(len(payloads) + 1), good)
    msg_ids: list[str | None] = [None] * len(payloads)
    for i in rng.sample(range(len(payloads)), 20):  # odd but unique Nats-Msg-Id headers
        msg_ids[i] = rng.choice(["m'{}", 'm";--{}', "m\\%{}", "m ü{}", "{}" + "x" * 300]
                                ).format(i)
    subjects = [rng.choice([SUBJECT] * 9 + ["artifacts.o'hara;--"]) for _ in payloads]
    seqs: list[int] = []
    for i, payload in enumerate(payloads):  # one publish per message: subjects, headers
        hdr = {"Nats-Msg-Id": msg_ids[i]} if msg_ids[i] else None
        seqs += bus.publish([payload], subject=subjects[i],
                            headers=[hdr] if hdr else None)
    assert len(set(seqs)) == len(payloads)
    stats = bus.drain()
    assert sum(stats.outcomes.values()) == len(payloads)
    rows = {seq: (outcome_, reason) for seq, outcome_, reason in bus.sql(
        "SELECT seq, outcome, reason FROM catalog.events_f")}
    assert sorted(rows) == sorted(seqs)  # exactly one row per message
    rejected = dict(bus.sql("SELECT seq, payload FROM catalog.rejections_f"))
    for i, (seq, payload) in enumerate(zip(seqs, payloads, strict=True)):
        got, reason = rows[seq]
        expected = outcome(world, payload, msg_ids[i], subjects[i])
        if got == "rejected":
            assert reason in REASONS and rejected[seq] == payload
        if expected == "ok":  # or the same event_id as an earlier message
            assert (got, reason) in (("committed", None), ("duplicate", None),
                                     ("rejected", "event_id_conflict")), (i, payload)
        else:
            assert (got, reason) == ("rejected", expected), (i, payload)
    for good, seq in ((g, seqs[payloads.index(g)]) for g in goods):
        assert rows[seq] == ("committed", None), good
    assert len(bus.sql("SELECT run_id FROM catalog.runs_d WHERE run_id LIKE 'good-%'")) == 5
    assert bus.export("runs").num_rows == bus.sql("SELECT count(*) FROM catalog.runs_d")[0][0]
    print("\ndaemon mix:", dict(stats.outcomes), len(payloads), "messages")
    COUNTS["through the daemon"] += len(payloads)


def raw_publish(bus: Bus, frames: list[bytes]) -> None:
    """Speak the NATS protocol directly: what a hostile client can send that nats-py can't."""
    host, port = bus.url.removeprefix("nats://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as conn:
        conn.recv(4096)  # INFO
        conn.sendall(b'CONNECT {"verbose":false,"pedantic":false,"headers":true}\r\n')
        conn.sendall(b"".join(frames) + b"PING\r\n")
        reply = b""
        while b"PONG" not in reply:
            reply += conn.recv(4096)
    assert b"-ERR" not in reply, reply


def test_non_utf8_header_is_data(bus: Bus) -> None:
    hdr = b"NATS/1.0\r\nNats-Msg-Id: \xff\xfe\r\n\r\n"
    body = json.dumps(bus.event("r")).encode()
    raw_publish(bus, [b"HPUB artifacts.lab.sim %d %d\r\n%s%s\r\n" % (
        len(hdr), len(hdr) + len(body), hdr, body)])
    assert bus.drain().outcomes == {"committed": 1}
    # not a valid identifier: the event id falls back to the payload's hash
    assert bus.sql("SELECT event_id FROM catalog.events_f") == [(sha256(body).hexdigest(),)]


def test_non_utf8_subject_does_not_kill_busd(bus: Bus) -> None:
    good = json.dumps(bus.event("after")).encode()
    raw_publish(bus, [b"PUB artifacts.\xff 2\r\n{}\r\n",
                      b"PUB artifacts.lab.sim %d\r\n%s\r\n" % (len(good), good)])
    stats = bus.drain()
    assert sum(stats.outcomes.values()) == 2
    assert bus.sql("SELECT outcome FROM catalog.events_f ORDER BY seq") == [
        ("rejected",), ("committed",)]
