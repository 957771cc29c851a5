"""What every command shares: the --config and --json options, one-line errors with the
named exit codes, settings, and the ways to reach NATS or the catalog. Imports nothing of
the CLI, so every command module can import it."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any, TypeVar

import typer

from busd import config, log, model
from busd.errors import BusdError, CatalogLocked, ExitCode, TransientError

# The heavy modules (DuckDB, nats-py, the embedded server) are imported by the functions that
# use them: `busd submit` or `busd --version` should not pay for `busd serve`'s imports.

F = TypeVar("F", bound=Callable[..., Any])

ConfigOpt = Annotated[str | None, typer.Option("--config", "-c", help="Path to busd.toml.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON.")]


def fail(message: str, code: ExitCode) -> None:
    typer.echo(f"busd: {message}", err=True)
    raise typer.Exit(int(code))


def guarded(fn: F) -> F:
    """Turn busd errors into one line on stderr and the contract's exit code."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except CatalogLocked as exc:
            fail(str(exc), ExitCode.RUNTIME)
        except BusdError as exc:
            fail(str(exc), exc.exit_code)
        except KeyboardInterrupt:
            fail("interrupted", ExitCode.RUNTIME)
        except (typer.Exit, typer.Abort, typer.TyperException):
            raise
        except Exception as exc:  # noqa: BLE001 - one line, never a traceback
            log.crashed(exc)  # ... but the journal keeps it, in a JSON line
            fail(f"unexpected error: {type(exc).__name__}: {exc}", ExitCode.RUNTIME)
        return None

    return wrapper  # type: ignore[return-value]


def settings(path: str | None, **overrides: Any) -> config.Settings:
    chosen = context_flag()
    if chosen:  # `busd --context NAME ...`: a flag, above every other choice of context
        overrides = {**overrides, "nats": {**overrides.get("nats", {}), "context": chosen}}
    s = config.load(path, overrides=overrides or None)
    log.configure(s.log_format)
    return s


_CONTEXT_FLAG: dict[str, str] = {}  # one command per process: the root's --context


def choose_context(name: str | None) -> None:
    """``busd --context NAME <command>``: the nats CLI context to use (docs/nats-clients.md)."""
    _CONTEXT_FLAG.clear()
    if name:
        _CONTEXT_FLAG["name"] = name


def context_flag() -> str | None:
    return _CONTEXT_FLAG.get("name")


@contextlib.asynccontextmanager
async def nats_for(s: config.Settings, *, may_embed: bool = True) -> AsyncIterator[Any]:
    """A connection to the configured NATS; with no ``nats.url`` and no busd serve running,
    the embedded server is started on its store for the duration."""
    from busd import source
    from busd.embedded import EmbeddedServer
    from busd.producer import nats_url

    embedded = None
    try:
        nc = await source.connect(s.nats, nats_url(s), reconnect=False)
    except TransientError:
        if s.nats.url or not may_embed:
            raise
        host, port = config.parse_hostport(s.nats.embedded_listen, "nats.embedded_listen")
        embedded = EmbeddedServer(host, port, s.data_path / "nats")
        nc = await source.connect(s.nats, embedded.start(), reconnect=False)
    try:
        yield nc
    finally:
        await nc.close()
        if embedded is not None:
            embedded.stop()


async def ask_daemon(
    s: config.Settings, verb: str, args: dict[str, Any], timeout_s: float = 30.0
) -> Any:
    """One request to a running ``busd serve``; None when no daemon answers.

    A configured NATS that does not answer is an error (exit 1 naming the URL); without
    ``nats.url`` the embedded server only runs with ``busd serve``, so no answer means none
    runs."""
    from busd import source
    from busd.producer import nats_url

    try:
        nc = await source.connect(s.nats, nats_url(s), reconnect=False)
    except TransientError:
        if s.nats.url:
            raise
        return None
    try:
        reply = await nc.request(
            model.subject(s.nats.consumer, verb), model.encode(args), timeout=timeout_s
        )
    except Exception:  # noqa: BLE001 - no responders or a timeout: no daemon runs
        return None
    finally:
        await nc.close()
    answer = model.decode(reply.data)
    if isinstance(answer, dict) and "error" in answer:
        raise BusdError(f"busd serve answered: {answer['error']}")
    return answer


def from_catalog(s: config.Settings, fn: Any, *args: Any, **kwargs: Any) -> Any:
    from busd.catalog import Catalog

    try:
        catalog = Catalog(s.catalog_path, read_only=True)
    except CatalogLocked:
        raise BusdError("busd serve holds the catalog but did not answer; try again") from None
    try:
        return fn(catalog, *args, **kwargs)
    finally:
        catalog.close()
