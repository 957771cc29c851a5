"""What the hostile-input tests share: a world of good, odd and hostile files, the property
every payload must satisfy, hostile JSON values, and the named decode cases (the whole-daemon
run sends them too). Not a test module; the fixtures that use it are in ``conftest.py``.

Duplicate keys in a JSON object: msgspec validates every occurrence and keeps the last one,
so ``{"schema_version": 2, …, "schema_version": 1}`` is a valid event (and an invalid first
occurrence is still a ``schema`` rejection). The catalog stores decoded values, never the raw
payload's reading of them, so nothing downstream can see another value.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import random
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from busd import events, model, validate
from busd.errors import FileNotYetThere, InvalidEvent, Reason

SUBJECT = "artifacts.lab.sim"
REASONS = {r.value for r in Reason}
COUNTS: collections.Counter[str] = collections.Counter()


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
    facts = {
        os.path.realpath(root / rel): facts_of(root / rel)
        for rel in (
            "runs/r1/fills.parquet",
            "runs/r1/positions.parquet",
            "we'ird \";--%\\ ünï 𝔘/x.parquet",
        )
    }
    names = [
        "runs/r1/fills.parquet",
        "runs/r1/positions.parquet",
        "we'ird \";--%\\ ünï 𝔘/x.parquet",
        "fake.parquet",
        "zero.parquet",
        "magic.parquet",
        "truncated.parquet",
        "badfooter.parquet",
        "negrows.parquet",
        "dir.parquet",
        "fifo.parquet",
        "sock.parquet",
        "out.parquet",
        "outdir/secret.parquet",
        "in.parquet",
        "dangling.parquet",
        "loop_a.parquet",
        "nonutf8.parquet",
        "missing.parquet",
    ]
    paths = [
        *names,
        *(str(root / n) for n in names[:3]),
        "../outside/secret.parquet",
        "runs/../../outside/secret.parquet",
        "runs/r1/../r1/fills.parquet",
        "./runs//r1/./fills.parquet",
        "runs/r1/fills.parquet/",
        str(outside / "secret.parquet"),
        str(evil / "x.parquet"),
        f"{root}/../outside/secret.parquet",
        f"{root}_evil/x.parquet",
        "/etc/passwd",
        "/dev/zero",
        "/proc/self/environ",
        "/",
        ".",
        "..",
        "//",
        "~",
        "x" * 300,
        "a/" * 2040,
        "\t",
        " ",
        "ü.parquet",
        "\u202e",
        "runs\\r1\\fills.parquet",
        "file:///etc/passwd",
        "%2e%2e/outside/secret.parquet",
        "a\x00b",
        "\x00",
        "",
        "runs/r1/fills.parquet\x00.txt",
    ]
    fills = root / "runs/r1/fills.parquet"
    size, rows, digest = facts[os.path.realpath(fills)]
    event: dict[str, Any] = {
        "schema_version": 1,
        "event_id": "sim-1:final",
        "producer": "lab.sim",
        "run": {
            "run_id": "sim-1",
            "kind": "simulation",
            "status": "succeeded",
            "started_at": "2026-11-28T10:00:00Z",
            "finished_at": "2026-11-28T10:05:00Z",
            "params": {"strategy": "meanrev", "seed": 7},
            "code_version": "a1b2c3d",
            "parent_run_id": None,
        },
        "artifacts": [
            {
                "name": "fills",
                "path": "runs/r1/fills.parquet",
                "rows": rows,
                "bytes": size,
                "sha256": digest,
                "meta": {"k": "v"},
            },
            {"name": "positions", "path": str(root / "runs/r1/positions.parquet")},
        ],
    }
    return World(root, outside, facts, paths, event)


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


def outcome(world: World, payload: bytes, msg_id: str | None = None, subject: str = SUBJECT) -> str:
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
        event_id, producer = events.resolve_identity(
            event, subject, msg_id, events.payload_sha256(payload)
        )
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


# ---- payloads: raw JSON and duplicate keys --------------------------------------------------
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
        return (
            "{"
            + ",".join(
                f"{json.dumps(k, ensure_ascii=ascii_only)}:{dumps(v, ascii_only)}" for k, v in items
            )
            + "}"
        )
    if isinstance(value, list):
        return "[" + ",".join(dumps(v, ascii_only) for v in value) + "]"
    return json.dumps(value, ensure_ascii=ascii_only)


# ---- hostile values, and byte edits of a payload ---------------------------------------------
RAW_NUMBERS = [
    Raw(t)
    for t in (
        "1e999",
        "-1e999",
        "1E400",
        "1e-400",
        "NaN",
        "Infinity",
        "-Infinity",
        "18446744073709551616",
        "-9223372036854775809",
        "1180591620717411303424",
        "3.0",
        "1.0e0",
        "01",
        "-0",
        "+1",
        ".5",
        "0x10",
        "1_000",
    )
]
RAW_STRINGS = [
    Raw(t)
    for t in (
        r'"\ud800"',
        r'"\udc00x"',
        r'"\ud800\ud800"',
        r'"\u0000"',
        r'"a\u0000b"',
        r'"\x41"',
        r'"\q"',
        r'"\u12"',
        '"a\tb"',
        '"\\u005c\\u0022"',
    )
]
HOSTILE_SCALARS: list[Any] = [
    2**70,
    -(2**70),
    2**63,
    -(2**63) - 1,
    2**64,
    2**62,
    2**62 + 1,
    -1,
    0,
    1.5,
    1e308,
    -0.0,
    "NaN",
    "Infinity",
    "1e999",
    "",
    " ",
    "\x00",
    "a\x00b",
    "..",
    "../../etc/passwd",
    "/etc/passwd",
    "ü",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "\u202e",
    "\ufeff",
    "'",
    '";--',
    "\\",
    "%",
    "_",
    "'; DROP TABLE catalog.runs_d; --",
    "A" * 200,
    "A" * 201,
    "r\n",
    "x" * 5000,
    True,
    False,
    None,
    [],
    {},
    [[[]]],
    {"": None},
    *RAW_NUMBERS,
    *RAW_STRINGS,
]
FIELDS = {
    "top": ["schema_version", "run", "artifacts", "event_id", "producer"],
    "run": [
        "run_id",
        "kind",
        "status",
        "started_at",
        "finished_at",
        "params",
        "code_version",
        "parent_run_id",
    ],
    "art": ["name", "path", "rows", "bytes", "sha256", "meta"],
    "params": ["strategy", "seed"],
    "meta": ["k"],
}


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
            del out[pos : pos + rng.randint(1, 8)]
        elif how == "cut" and rng.random() < 0.3:
            del out[pos:]
    return bytes(out)


# ---- the named decode cases, each with its outcome ------------------------------------------
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
    "1001_artifacts": (
        lambda w: dumps(
            {**w.base, "artifacts": [{"name": f"a{i}", "path": "x"} for i in range(1001)]}
        ).encode(),
        "too_large",
    ),
    # not JSON, not an object, not UTF-8
    "empty": (lambda w: b"", "malformed"),
    "whitespace": (lambda w: b" \n\t", "malformed"),
    "null": (lambda w: b"null", "malformed"),
    "array": (lambda w: b"[]", "malformed"),
    "string": (lambda w: b'"{}"', "malformed"),
    "nan_literal": (lambda w: with_run(w, params={"x": Raw("NaN")}), "malformed"),
    "infinity_literal": (lambda w: with_run(w, params={"x": Raw("Infinity")}), "malformed"),
    "bad_utf8_value": (
        lambda w: with_run(w, status="\udcff").replace(b"\\udcff", b"\xff"),
        "malformed",
    ),
    "bad_utf8_key": (lambda w: b'{"\xff":1}', "malformed"),
    "overlong_utf8": (
        lambda w: with_run(w, status="\udcff").replace(b"\\udcff", b"\xc0\xaf"),
        "malformed",
    ),
    "cesu_surrogate": (
        lambda w: with_run(w, status="\udcff").replace(b"\\udcff", b"\xed\xa0\x80"),
        "malformed",
    ),
    "lone_surrogate_escape": (lambda w: with_run(w, status=Raw(r'"\ud800"')), "malformed"),
    "utf8_bom": (lambda w: b"\xef\xbb\xbf" + dumps(w.base).encode(), "malformed"),
    # NUL
    "nul_in_path": (lambda w: with_art(w, path="runs/r1/fills.parquet\x00.txt"), "schema"),
    "nul_path": (lambda w: with_art(w, path="\x00"), "schema"),
    "nul_in_status_ok": (lambda w: with_run(w, status="a\x00b"), "ok"),
    "empty_path": (lambda w: with_art(w, path=""), "schema"),
    # numbers
    "params_2_70_ok": (
        lambda w: with_run(w, params={"a": 2**70, "b": -(2**70), "c": 10**400}),
        "ok",
    ),
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
    "version_2_70": (
        lambda w: dumps({**w.base, "schema_version": 2**70}).encode(),
        "unsupported_version",
    ),
    "version_minus_2_70": (
        lambda w: dumps({**w.base, "schema_version": -(2**70)}).encode(),
        "unsupported_version",
    ),
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
    "producer_trailing_newline": (
        lambda w: dumps({**w.base, "producer": "lab.sim\n"}).encode(),
        "schema",
    ),
    "sha256_trailing_newline": (lambda w: with_art(w, sha256="0" * 64 + "\n"), "schema"),
    "status_201": (lambda w: with_run(w, status="s" * 201), "schema"),
    "status_unicode_ok": (lambda w: with_run(w, status="ü𝔘\u202e\ufeff'\";--%\\"), "ok"),
    "status_empty_ok": (lambda w: with_run(w, status=""), "ok"),
    # times
    "time_year_10000_utc_ok": (lambda w: with_run(w, started_at="9999-12-31T23:59:59-23:59"), "ok"),
    "time_feb_30": (lambda w: with_run(w, started_at="2026-02-30T00:00:00Z"), "schema"),
    "time_number": (lambda w: with_run(w, started_at=1e10), "schema"),
    # duplicate keys: msgspec keeps the last occurrence, after validating each one
    "dup_version_last_wins_ok": (lambda w: dup_keys(w, "top", 2, 1, "schema_version"), "ok"),
    "dup_version_last_wins": (
        lambda w: dup_keys(w, "top", 1, 2, "schema_version"),
        "unsupported_version",
    ),
    "dup_run_id_first_invalid": (
        lambda w: dup_keys(w, "run", "bad id", "sim-1", "run_id"),
        "schema",
    ),
    "dup_path_last_outside": (
        lambda w: dup_keys(w, "art", "runs/r1/fills.parquet", "../outside/secret.parquet", "path"),
        "path_outside_roots",
    ),
    "dup_producer_last_wrong": (
        lambda w: dup_keys(w, "top", "lab.sim", "other", "producer"),
        "producer_mismatch",
    ),
}
