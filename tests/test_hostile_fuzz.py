"""Hostile input, fuzzed: whatever arrives, busd ends with a valid event or a closed-set
rejection — never an unexpected exception, a hang, or facts recorded about a file outside the
artifact roots. Hypothesis fuzzing of ``events.decode`` → ``resolve_identity`` →
``validate.check_event`` (and of Parquet bytes through ``check_artifact``); the named cases are
in ``test_hostile_cases.py``, the real daemon in ``test_hostile_daemon.py``.
"""

from __future__ import annotations

import collections
import copy
import hashlib
import json
import random
from typing import Any

import pytest
from hostile import (
    COUNTS,
    FIELDS,
    HOSTILE_SCALARS,
    RAW_NUMBERS,
    REASONS,
    Pairs,
    Raw,
    World,
    assert_closed,
    byte_edits,
    dumps,
    outcome,
    run,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from busd import events, validate
from busd.errors import InvalidEvent, Reason
from busd.model import Artifact

pytestmark = pytest.mark.usefixtures("hostile_counts")

# scale of the fuzz runs: the default run, and `--long` (marker `slow`)
SCALES = [pytest.param(1, id="default"), pytest.param(10, id="long", marks=pytest.mark.slow)]


def fuzz_settings(n: int) -> settings:
    return settings(
        max_examples=n,
        deadline=None,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.filter_too_much,
        ],
    )


# ---- payload strategies ----------------------------------------------------------------------
IDENT_CHARS = "ABCXYZabcxyz0189._:/-"
HOSTILE_IDENTS = [
    "a" * 200,
    "a" * 201,
    "",
    "a b",
    "r\n",
    "\nr",
    "r\r",
    "ü",
    "a/b:c.d-e_f",
    ".",
    "..",
    "/",
    "-" * 200,
    "lab.sim",
    "lab.sim\n",
    "LAB.SIM",
    "a\x00",
    "a'b",
    "0",
]
TIMES = [
    "2026-11-28T10:00:00Z",
    "2026-11-28T10:00:00",
    "2026-11-28T10:00:00.123456789+05:30",
    "0001-01-01T00:00:00+23:59",
    "9999-12-31T23:59:59-23:59",
    "2026-02-30T00:00:00Z",
    "2026-11-28T25:00:00Z",
    "2026-11-28T10:00:60Z",
    "",
    "now",
    "2026-11-28",
    0,
    1e10,
    "2026-11-28T10:00:00+24:00",
    "+12026-01-01T00:00:00Z",
]

json_leaves = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(2**80), max_value=2**80)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)


def _json_containers(kids: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.lists(kids, max_size=5) | st.dictionaries(st.text(max_size=8), kids, max_size=5)


json_values = st.recursive(json_leaves, _json_containers, max_leaves=25)
idents = (
    st.sampled_from(HOSTILE_IDENTS)
    | st.text(alphabet=IDENT_CHARS, min_size=1, max_size=202)
    | st.text(max_size=10)
)
# deep copies: a mutation must never edit the shared `{}` or `[[[]]]` of HOSTILE_SCALARS
hostile = st.sampled_from(HOSTILE_SCALARS).map(copy.deepcopy) | json_values | idents


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
        op = data.draw(
            st.sampled_from(
                ["del", "set", "add", "path", "ident", "count", "time", "version", "dup", "type"]
            ),
            label="op",
        )
        where = {"path": "art", "count": "art", "time": "run", "version": "top", "dup": "top"}.get(
            op
        ) or data.draw(st.sampled_from(sorted(FIELDS)))
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
            key = data.draw(
                st.sampled_from(
                    {
                        "top": ["event_id", "producer"],
                        "run": ["run_id", "kind", "parent_run_id"],
                        "art": ["name", "sha256"],
                    }.get(where, ["k"])
                )
            )
            obj[key] = data.draw(idents)
        elif op == "count":
            key = data.draw(st.sampled_from(["rows", "bytes"]))
            right = obj.get(key) if isinstance(obj.get(key), int) else 3
            obj[key] = data.draw(
                st.sampled_from(
                    [
                        right,
                        right + 1,
                        right - 1,
                        -1,
                        0,
                        2**62,
                        2**62 + 1,
                        2**63,
                        2**70,
                        -(2**70),
                        "3",
                        True,
                        None,
                        *RAW_NUMBERS[:8],
                    ]
                )
            )
        elif op == "time":
            obj[data.draw(st.sampled_from(["started_at", "finished_at"]))] = data.draw(
                st.sampled_from(TIMES) | st.text(max_size=30)
            )
        elif op == "version":
            obj["schema_version"] = data.draw(
                st.sampled_from(
                    [
                        1,
                        0,
                        2,
                        -1,
                        2**70,
                        -(2**70),
                        1.0,
                        "1",
                        True,
                        None,
                        Raw("1e999"),
                        Raw("1.0e0"),
                        Raw("1E0"),
                        [1],
                    ]
                )
            )
        elif op == "dup" and isinstance(obj.get("artifacts"), list) and obj["artifacts"]:
            arts = obj["artifacts"]
            copies = data.draw(
                st.sampled_from(
                    [1] * 8 + [2] * 8 + [max(1, 1000 - len(arts)), max(1, 1001 - len(arts))]
                )
            )
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
            obj[key] = data.draw(
                st.sampled_from([[obj.get(key)], {"v": obj.get(key)}, None, str(obj.get(key)), 1])
            )
    where = data.draw(st.sampled_from([None, None, "top", "run", "art"]), label="dupkey")
    if where is not None:
        obj = container(event, where, data)
        if obj is not None:
            key = data.draw(st.sampled_from(FIELDS[where]))
            pairs = Pairs((*obj.items(), (key, data.draw(hostile))))
            obj.clear()
            obj["__pairs__"] = pairs
    return dumps(event, data.draw(st.booleans(), label="ascii")).encode()


token_soup = st.lists(
    st.sampled_from(
        [
            b"{",
            b"}",
            b"[",
            b"]",
            b'"',
            b":",
            b",",
            b"\\",
            b"1",
            b"-1",
            b"e9",
            b"null",
            b"true",
            b'"schema_version"',
            b'"run"',
            b'"artifacts"',
            b'"name"',
            b'"path"',
            b"\xff",
            b"\x00",
            b" ",
            b"\\u",
            b"d800",
            b"\xc0\xaf",
            b"\xed\xa0\x80",
            b"1e999",
            b"\n",
        ]
    ),
    max_size=120,
).map(b"".join)


def event_shaped() -> st.SearchStrategy[dict[str, Any]]:
    """Objects with the event's field names and hostile values, nested like an event."""
    art = st.fixed_dictionaries({}, optional={k: hostile for k in FIELDS["art"]})
    run_ = st.fixed_dictionaries({}, optional={k: hostile for k in FIELDS["run"]})
    return st.fixed_dictionaries(
        {},
        optional={
            "schema_version": st.sampled_from([1, 1, 2]) | hostile,
            "run": run_ | hostile,
            "artifacts": st.lists(art, max_size=3) | hostile,
            "event_id": idents,
            "producer": idents,
        },
    )


# ---- the fuzz runs ----------------------------------------------------------------------------
# halved from the first rounds' counts, which found nothing new in their last runs: the
# default run guards what they proved, and --long (x 10) keeps searching
N_BYTES, N_SOUP, N_JSON, N_SHAPED, N_MUTATED, N_DEPTH, N_PARQUET = (
    2500,
    2000,
    1500,
    1000,
    2000,
    1000,
    400,
)


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
    return [
        ("typed", {**base, "run": value}),
        ("typed", {**base, "artifacts": value}),
        ("typed", {**base, "artifacts": [value, *base["artifacts"][1:]]}),
        ("free", {**base, "run": {**run_, "params": value}}),
        ("free", {**base, "artifacts": [{**art, "meta": value}]}),
    ]


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
                assert result == ("ok" if isinstance(value, dict) or value is None else "schema")

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
    @given(
        st.data(),
        st.sampled_from([None, None, "m-1", "x y'\";--", "ü" * 300, ""]),
        st.randoms(use_true_random=False),
    )
    def mutated(data: st.DataObject, msg_id: str | None, rng: random.Random) -> None:
        payload = mutate(world, data)
        seen[run(world, "mutated event", payload, msg_id)] += 1
        for _ in range(3):
            seen[run(world, "mutated event + byte edits", byte_edits(payload, rng))] += 1

    mutated()
    print("\nmutated events:", dict(seen.most_common()))
    # the mutations reach every layer: decode, identity and the files
    assert {
        "ok",
        "schema",
        "malformed",
        "too_large",
        "unsupported_version",
        "producer_mismatch",
        "path_outside_roots",
        "not_parquet",
        "file_missing",
    } <= set(seen)


def depth(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max((depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((depth(v) for v in value), default=0)
    return 0


@pytest.mark.parametrize("scale", SCALES)
def test_fuzz_depth_scan_matches_json(scale: int) -> None:
    """The pre-decode depth bound is exact on JSON, whatever its strings hold."""
    tricky = st.text(alphabet="[]{}\"\\'ab \n", max_size=12)

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
            pos = data.draw(
                st.integers(max(0, len(blob) - 200), max(0, len(blob) - 1))
                | st.integers(0, max(0, len(blob) - 1))
            )
            if how == "flip" and blob:
                blob[pos] = data.draw(st.integers(0, 255))
            elif how == "cut":
                del blob[pos : pos + data.draw(st.integers(1, 64))]
            elif how == "junk":
                blob[pos:pos] = data.draw(st.binary(min_size=1, max_size=32))
            elif how == "len" and len(blob) >= 8:  # the footer length, just before PAR1
                blob[-8:-4] = data.draw(st.integers(0, 2**32 - 1)).to_bytes(4, "little")
        target.write_bytes(bytes(blob))
        art = Artifact(name="f", path="fuzz/f.parquet", rows=data.draw(st.sampled_from([None, 3])))
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
