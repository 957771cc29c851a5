"""Publish one busd artifact event from Python with busd's own producer API.

    python examples/python/producer.py --run-id sim-42 --kind simulation \\
        [--producer lab.python] [--param seed=7] [--wait] fills=runs/sim-42/fills.parquet ...

``build_event`` reads each file's size, Parquet row count and SHA-256 and checks the event as
busd would; ``submit_sync`` publishes it with ``Nats-Msg-Id`` = the event id and waits for the
PubAck (stored). With ``--wait`` it also waits until busd has committed the event and refreshed
the exports, and exits 3 if busd rejected it.

Where NATS is: ``--server`` or ``$NATS_URL``, else busd's own configuration (``--config``,
``$BUSD_CONFIG``, ``./busd.toml``, ``$BUSD_NATS_URL``). Relative paths are taken from the
current directory and sent as absolute paths; they must lie inside one of busd's artifact roots.

Exit codes (as ``busd submit``): 0 stored/committed, 1 failed, 2 bad usage, 3 rejected,
4 timed out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from busd import build_event, config, submit_sync
from busd.errors import BusdError


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="+", metavar="NAME=PATH", help="a Parquet file the job wrote")
    p.add_argument("--run-id", required=True)
    p.add_argument("--kind", required=True)
    p.add_argument("--producer", default="examples.python",
                   help="published to artifacts.<producer> (default: %(default)s)")
    p.add_argument("--status", default="succeeded")
    p.add_argument("--event-id", help="default: stable for the same files, so retries dedupe")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="a run parameter; VALUE is parsed as JSON when it can be")
    p.add_argument("--server", default=os.environ.get("NATS_URL", ""),
                   help="NATS URL (default: $NATS_URL, else busd's configuration)")
    p.add_argument("--config", help="busd.toml to read nats settings from")
    p.add_argument("--wait", action="store_true", help="block until busd committed the event")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds (default: %(default)s)")
    return p.parse_args(argv)


def usage(message: str) -> None:
    print(f"producer: {message}", file=sys.stderr)
    raise SystemExit(2)


def pairs(items: list[str], what: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            usage(f"{what} {item!r}: expected KEY=VALUE")
        if key in out:
            usage(f"{what} {key!r} given twice")
        out[key] = value
    return out


def json_or_text(value: str) -> Any:
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    files = pairs(args.files, "artifact")
    params = {k: json_or_text(v) for k, v in pairs(args.param, "--param").items()}
    try:
        overrides = {"nats": {"url": args.server}} if args.server else None
        settings = config.load(args.config, overrides=overrides)
        event = build_event(args.run_id, args.kind, files, producer=args.producer,
                            status=args.status, params=params or None,
                            event_id=args.event_id)
        result = submit_sync(settings, event, wait=args.wait, timeout_s=args.timeout,
                             producer=args.producer)
    except BusdError as exc:  # one line and busd's exit code, never a traceback
        print(f"producer: {exc}", file=sys.stderr)
        return int(exc.exit_code)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
