"""Hostile input through the real daemon: SQL metacharacters as data, a mix of ~200 hostile
and a few good messages each ending in the outcome the library predicts, and what a hostile
client can send that nats-py can't (non-UTF-8 headers and subjects).
"""

from __future__ import annotations

import json
import random
import socket
from hashlib import sha256

import pytest
from hostile import (
    COUNTS,
    DECODE_CASES,
    FIELDS,
    HOSTILE_SCALARS,
    REASONS,
    SUBJECT,
    World,
    build_world,
    byte_edits,
    dumps,
    facts_of,
    outcome,
)
from support import Bus

pytestmark = pytest.mark.usefixtures("hostile_counts")


SQL_TEXT = "'; DROP TABLE catalog.runs_d; --\"\\%_ü𝔘\u202e"


def test_sql_metacharacters_are_data(bus: Bus) -> None:
    """Quotes, comment markers, backslashes, LIKE wildcards and unicode in every free text
    field (and in a directory name and the subject) reach the catalog and exports as is."""
    path = bus.parquet("o'hara \";--%_\\ ü𝔘/fills.parquet")
    params = {
        "'": '";--',
        "%": "\\",
        "ü𝔘": ["'", {"k'ey": 'v"al'}],
        "nul": "\x00",
        "big": 2**70,
        SQL_TEXT: SQL_TEXT,
    }
    meta = {"q": "' OR '1'='1", "like": "%_", "bs": "\\\\", "": SQL_TEXT}
    event = bus.event("r.1:a/b-c_d", [{"name": "f.i-l:e/s_", "path": str(path), "meta": meta}])
    event["run"].update(
        kind="k'", status=SQL_TEXT, code_version="a\x00b\\'", params=params, parent_run_id="p/../q"
    )
    event["run"]["kind"] = "k.-_:/"
    subject = "artifacts.o'hara;--%\\ü"
    bus.publish([event], subject=subject)
    assert bus.drain().outcomes == {"committed": 1}
    ((run_id, kind, producer, status, got_params, code_version, parent),) = bus.sql(
        "SELECT run_id, kind, producer, status, params, code_version, parent_run_id "
        "FROM catalog.runs_d"
    )
    assert (run_id, kind, producer, status, code_version, parent) == (
        "r.1:a/b-c_d",
        "k.-_:/",
        "o'hara;--%\\ü",
        SQL_TEXT,
        "a\x00b\\'",
        "p/../q",
    )
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
        base = {
            **world.base,
            "event_id": f"h-{i}",
            "run": {**world.base["run"], "run_id": f"h-{i}"},
        }
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
        msg_ids[i] = rng.choice(["m'{}", 'm";--{}', "m\\%{}", "m ü{}", "{}" + "x" * 300]).format(i)
    subjects = [rng.choice([SUBJECT] * 9 + ["artifacts.o'hara;--"]) for _ in payloads]
    seqs: list[int] = []
    for i, payload in enumerate(payloads):  # one publish per message: subjects, headers
        hdr = {"Nats-Msg-Id": msg_ids[i]} if msg_ids[i] else None
        seqs += bus.publish([payload], subject=subjects[i], headers=[hdr] if hdr else None)
    assert len(set(seqs)) == len(payloads)
    stats = bus.drain()
    assert sum(stats.outcomes.values()) == len(payloads)
    rows = {
        seq: (outcome_, reason)
        for seq, outcome_, reason in bus.sql("SELECT seq, outcome, reason FROM catalog.events_f")
    }
    assert sorted(rows) == sorted(seqs)  # exactly one row per message
    rejected = dict(bus.sql("SELECT seq, payload FROM catalog.rejections_f"))
    for i, (seq, payload) in enumerate(zip(seqs, payloads, strict=True)):
        got, reason = rows[seq]
        expected = outcome(world, payload, msg_ids[i], subjects[i])
        if got == "rejected":
            assert reason in REASONS and rejected[seq] == payload
        if expected == "ok":  # or the same event_id as an earlier message
            assert (got, reason) in (
                ("committed", None),
                ("duplicate", None),
                ("rejected", "event_id_conflict"),
            ), (i, payload)
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
    raw_publish(
        bus,
        [b"HPUB artifacts.lab.sim %d %d\r\n%s%s\r\n" % (len(hdr), len(hdr) + len(body), hdr, body)],
    )
    assert bus.drain().outcomes == {"committed": 1}
    # not a valid identifier: the event id falls back to the payload's hash
    assert bus.sql("SELECT event_id FROM catalog.events_f") == [(sha256(body).hexdigest(),)]


def test_non_utf8_subject_does_not_kill_busd(bus: Bus) -> None:
    good = json.dumps(bus.event("after")).encode()
    raw_publish(
        bus,
        [
            b"PUB artifacts.\xff 2\r\n{}\r\n",
            b"PUB artifacts.lab.sim %d\r\n%s\r\n" % (len(good), good),
        ],
    )
    stats = bus.drain()
    assert sum(stats.outcomes.values()) == 2
    assert bus.sql("SELECT outcome FROM catalog.events_f ORDER BY seq") == [
        ("rejected",),
        ("committed",),
    ]


@pytest.mark.parametrize(
    "headers",
    [{"Status": "100"}, {"Status": "409", "Description": "Consumer Deleted"}, {"Status": "503"}],
    ids=["100", "409-deleted", "503"],
)
def test_an_event_dressed_as_a_status_reply_is_rejected(bus: Bus, headers: dict[str, str]) -> None:
    """An empty message whose headers read like a status reply of the server (Status: 100,
    409 'Consumer Deleted', 503) is a stored message like any other: rejected `malformed`,
    and the next event commits. Before: taken for the server speaking, it was never settled
    (or the consumer was declared gone, again and again), and busd exited on the stall at
    every start (a reviewer helper's finding, 2 of 2 runs each)."""
    seqs = bus.publish([b""], headers=[headers])
    seqs += bus.publish([bus.event("after")])
    stats = bus.drain()
    assert stats.outcomes == {"rejected": 1, "committed": 1}
    rows = dict(bus.sql("SELECT seq, reason FROM catalog.rejections_f"))
    assert rows == {seqs[0]: "malformed"}
