"""Connecting to NATS: credentials, TLS, the connection's name, busd's private inbox prefix,
and the JetStream domain or API prefix every JetStream request of the connection goes to.

The connection carries its JetStream settings: ``nc.jetstream()`` on a connection made here
(and :func:`jetstream`) talks to the configured domain or API prefix, never a hard-coded one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import socket
import ssl
import time
from collections.abc import Callable
from typing import Any

import nats
from nats.aio.client import Client as Client  # the type of a connection, for callers
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api
from nats.js import errors as js_errors
from nats.protocol.parser import AUTHORIZATION_VIOLATION

from busd.config import NatsSettings, is_nkey_seed
from busd.errors import BusdError, ConfigError, TransientError


def _tls_context(n: NatsSettings) -> ssl.SSLContext | None:
    """Verify the server against ``tls_ca`` (else the system's CAs), present ``tls_cert``."""
    if not (n.tls_ca or n.tls_cert):
        return None
    try:
        ctx = ssl.create_default_context(cafile=n.tls_ca or None)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"bad value for nats.tls_ca: {n.tls_ca}: {_why(exc)}") from None
    if n.tls_cert:
        try:
            ctx.load_cert_chain(n.tls_cert, n.tls_key or None, password=_no_password)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"bad value for nats.tls_cert/nats.tls_key: {n.tls_cert}: {_why(exc)}"
            ) from None
    return ctx


def _no_password() -> str:
    raise ssl.SSLError("the key is encrypted: busd needs an unencrypted nats.tls_key")


def _why(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None)  # set by OpenSSL, not on an SSLError made here
    if isinstance(exc, ssl.SSLError) and reason:
        return str(reason).lower().replace("_", " ")
    if isinstance(exc, ssl.SSLError) and exc.args:
        return str(exc.args[-1])
    return str(exc.strerror if isinstance(exc, OSError) and exc.strerror else exc)


def _refusal(n: NatsSettings, exc: BaseException) -> str | None:
    """Why the server turned busd away for good (credentials, certificates), or None when
    trying again may help (no server yet, a timeout)."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return (
            f"the server's TLS certificate is not trusted ({exc.verify_message}): "
            "check nats.tls_ca and the host name in nats.url"
        )
    if isinstance(exc, ssl.SSLError):
        return f"TLS refused ({_why(exc)}): check nats.tls_ca, nats.tls_cert and nats.tls_key"
    if _auth_refused(exc):
        text = str(exc)
        keys = [k for k in ("creds", "nkey_seed", "user", "token") if getattr(n, k)]
        used = ", ".join(f"nats.{k}" for k in keys) if keys else "no credentials configured"
        return f"credentials refused ({text.removeprefix('nats: ').strip()}; {used})"
    return None


def api_prefix(n: NatsSettings) -> str:
    """The JetStream API prefix of the configured domain or account import (``nats.js_domain``,
    ``nats.js_api_prefix``), else the server's own API."""
    if n.js_domain:
        return f"$JS.{n.js_domain}.API"
    return n.js_api_prefix or api.DEFAULT_PREFIX


# -ERR lines of a refusal: 'Authorization Violation', 'User Authentication Expired',
# 'User Authentication Revoked', 'Authentication Timeout'
_AUTH_ERR_MARKS = (AUTHORIZATION_VIOLATION.lower(), "authentication")


def _auth_refused(exc: BaseException) -> bool:
    """The server refused the credentials. nats-py types this once connected, but a refusal
    during the handshake is a plain Error carrying the server's ``-ERR`` line, whose text
    is the protocol's only mark of its kind."""
    if isinstance(exc, nats.errors.AuthorizationError | nats.errors.InvalidUserCredentialsError):
        return True
    if type(exc) is not nats.errors.Error:
        return False
    line = str(exc).lower()
    return any(mark in line for mark in _AUTH_ERR_MARKS)


DENIAL_SAID_EVERY_S = 30.0  # a permissions violation repeats; it is logged this often
DENIAL_RECENT_S = 120.0  # and named as the likely cause of what fails this long after


class _Client(Client):
    """A connection that knows busd's JetStream API prefix, and survives odd subjects.

    nats-py decodes a message's subject strictly, but the server relays subjects that are
    not UTF-8: one such publish would end nats-py's read loop and busd with it. Decode with
    replacement instead; the event is then rejected like any other bad input."""

    api_prefix: str = api.DEFAULT_PREFIX
    refused: str | None = None  # the last permissions violation the server reported
    refused_at = -DENIAL_SAID_EVERY_S  # when (monotonic), and when it was last logged
    refused_said_at = -DENIAL_SAID_EVERY_S
    refused_since_said = 0
    turned_away: str | None = None  # why the last reconnect was refused (credentials...)

    def refusal(self) -> str | None:
        """The server's last word that busd may not publish or subscribe somewhere, if
        recent: the likelier cause of a request never answered, or of acks that stay out."""
        recent = time.monotonic() - self.refused_at < DENIAL_RECENT_S
        return self.refused if recent else None

    def denied(self, exc: BaseException) -> tuple[str, int] | None:
        """A permissions violation, reported by nats-py only to the error callback (the
        publish itself succeeds): recorded, and returned with how many there were since it
        was last returned, at most once a period (each ack has a subject of its own)."""
        text = str(exc).removeprefix("nats: ").strip()
        self.refused, self.refused_at = text, time.monotonic()
        return self._say(text)

    def turned(self, why: str) -> tuple[str, int] | None:
        """A reconnect refused (credentials, certificates): kept until a reconnect or a
        failure of another kind, and returned as :meth:`denied` returns its violations."""
        self.turned_away = why
        return self._say(why)

    def _say(self, text: str) -> tuple[str, int] | None:
        now = time.monotonic()
        self.refused_since_said += 1
        if now - self.refused_said_at < DENIAL_SAID_EVERY_S:
            return None
        said = (text, self.refused_since_said)
        self.refused_said_at, self.refused_since_said = now, 0
        return said

    async def _process_pong(self) -> None:
        # nats-py 2.16 leaves the future of a flush that timed out or was cancelled in its
        # list of pings; the PONG that answers that ping set its result, the read loop
        # ended on InvalidStateError ('nats: encountered error'), and the client, still
        # connected, received nothing more: every request and pull unanswered, for good
        # (nats-io/nats.py#624). The same pairing, a done future skipped.
        if self._pongs:
            future = self._pongs.pop(0)
            if not future.done():
                future.set_result(True)
            self._pongs_received += 1
            self._pings_outstanding = 0

    def jetstream(self, **opts: Any) -> JetStreamContext:
        if "prefix" not in opts and "domain" not in opts:
            opts["prefix"] = self.api_prefix
        return super().jetstream(**opts)

    def _build_message(
        self, sid: int, subject: bytes, reply: bytes, data: bytes, headers: dict[str, str] | None
    ) -> Msg:
        return self.msg_class(
            subject=subject.decode(errors="replace"),
            reply=reply.decode(errors="replace"),
            data=data,
            headers=headers,
            _client=self,
            _sid=sid,
        )


def jetstream(nc: Client) -> JetStreamContext:
    """The JetStream context of the configured domain or API prefix (the one way busd gets
    one)."""
    if isinstance(nc, _Client):
        return nc.jetstream()
    return nc.jetstream(prefix=api.DEFAULT_PREFIX)


def js_api_prefix(nc: Client) -> str:
    """The JetStream API prefix this connection's requests go to."""
    return nc.api_prefix if isinstance(nc, _Client) else api.DEFAULT_PREFIX


def connection_name(n: NatsSettings, role: str | None, *, reconnect: bool) -> str:
    """``nats.name`` for ``busd serve``; else ``<role>@<host>``: ``busd@<host>`` for the
    daemon, ``busd-cli@<host>`` for the one-shot commands, ``busd-submit@<host>``..."""
    if role is None and reconnect and n.name:
        return n.name
    role = role or ("busd" if reconnect else "busd-cli")
    return f"{role}@{socket.gethostname()}"


async def _close_quietly(nc: Client) -> None:
    """Release a connection that failed to open; nats-py can hang closing one whose TLS
    handshake failed, so this is bounded."""
    with contextlib.suppress(Exception):
        await asyncio.wait_for(nc.close(), 2.0)


WAITING_SAID_EVERY_S = 30.0  # busd serve repeats "waiting for NATS" at least this often
WAITING_RETRY_S = 0.5  # between two connection attempts while NATS is down


class NatsUnreachable(TransientError):
    """No NATS server answered within ``nats.connect_timeout_s``."""

    def __init__(self, url: str, timeout_s: float, cause: BaseException) -> None:
        super().__init__(
            f"cannot reach NATS at {url} within {float(timeout_s)}s ({_unreachable_why(cause)})"
        )
        self.url = url


# NATS did not answer a request (the connection down or reconnecting, a timeout, JetStream
# restarting); a closed connection is not among them: it does not come back
_UNANSWERED: tuple[type[BaseException], ...] = (
    nats.errors.TimeoutError,
    nats.errors.NoRespondersError,
    nats.errors.StaleConnectionError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.OutboundBufferLimitError,
    js_errors.ServiceUnavailableError,
    js_errors.NoStreamResponseError,  # a JetStream publish nobody answered (the lease's)
    asyncio.TimeoutError,
)


def _refused_to_logging(violation: str, times: int) -> None:
    """Where a refusal goes when the caller names no place (the producer API, one-shot
    commands): the standard library's logging, which a library may write to."""
    logging.getLogger("busd.nats").error(
        "NATS refused busd; check its credentials and permissions: %s (%d times)",
        violation,
        times,
    )


def turned_away(nc: Client) -> str | None:
    """Why the server refuses ``nc``'s reconnects (its credentials or certificates), or
    None: nats-py retries a refused reconnect forever, and closes the connection for good
    when the server refuses the credentials on a live one (a reload of its config)."""
    if not isinstance(nc, _Client) or nc.is_connected:
        return None
    if nc.is_closed and isinstance(nc.last_error, nats.errors.AuthorizationError):
        return f"credentials refused ({nc.last_error}); the server closed the connection"
    return nc.turned_away


def refusal(nc: Client) -> str | None:
    """The server's recent permissions violation on this connection, if any."""
    return nc.refusal() if isinstance(nc, _Client) else None


# JetStream's 500 "consumer is offline": assigned to a server that is down (a cluster that
# lost its quorum); an outage, though the server answered
_CONSUMER_OFFLINE = 10119


def unanswered(exc: BaseException) -> bool:
    """True when ``exc`` says NATS did not answer, as opposed to answering no."""
    if isinstance(exc, js_errors.APIError) and exc.err_code == _CONSUMER_OFFLINE:
        return True
    return isinstance(exc, _UNANSWERED)


# JetStream's own word that it is not there: "JetStream not enabled" (for the account); a 503
# with another code (10008, "JetStream system temporarily unavailable": a cluster without a
# leader yet) is an outage
_JETSTREAM_OFF = frozenset({10039, 10076})


def jetstream_silent(exc: BaseException) -> bool:
    """NATS answered and JetStream is not there (no responders on its API, or it says it is
    not enabled): a mistake of the setup that waiting does not mend, unless the API is
    reached through a domain or an import whose far side may be down (the caller's call)."""
    # (a JetStream publish nobody answered, NoStreamResponseError, is not among them: a
    # stream without a leader, the lease's in a cluster that lost its quorum, says the same)
    if isinstance(exc, nats.errors.NoRespondersError):
        return True
    # nats-py's JetStream API turns no responders into a 503 with no error code
    return isinstance(exc, js_errors.ServiceUnavailableError) and (
        exc.err_code is None or exc.err_code in _JETSTREAM_OFF
    )


def _unreachable_why(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "no answer"
    if isinstance(exc, OSError) and exc.errno:
        return os.strerror(exc.errno).lower()
    return str(exc).removeprefix("nats: ").strip() or type(exc).__name__


async def connect(  # noqa: C901 - the options nats-py takes, one by one
    n: NatsSettings,
    url: str,
    *,
    name: str | None = None,
    on_state: Callable[[bool], None] | None = None,
    on_refused: Callable[[str, int], None] | None = None,
    reconnect: bool = True,
) -> Client:
    """Connect with the configured credentials; reconnect forever when ``reconnect``.

    ``name`` is the role of the tool (``busd-submit``), shown as ``<name>@<host>`` in the
    server's monitoring; without it the connection is named by :func:`connection_name`.
    ``on_refused(violation, times)``: the server denied busd a subject, at most every 30 s
    (default: the standard library's logging, logger ``busd.nats``).
    Inboxes (JetStream deliveries, request replies, PubAcks) use ``nats.inbox_prefix``, so
    a server's permissions can keep them from every other user.

    The first connection fails at once when the server refuses the credentials or the TLS
    certificates (a :class:`BusdError`, exit 1): retrying cannot fix them. Any other failure
    of the first connection is retried for at most ``nats.connect_timeout_s`` in all, then
    :class:`NatsUnreachable`: a caller that must wait for NATS (``busd serve``) calls again.
    """
    connecting = True
    last_error: list[BaseException] = []

    async def disconnected() -> None:
        if on_state and not connecting:
            on_state(False)

    async def reconnected() -> None:
        nc.turned_away = None
        if on_state:
            on_state(True)

    async def error(exc: Exception) -> None:
        # nats-py reports each failed attempt here; raising ends its first-connect loop.
        if connecting:
            last_error[:] = [exc]
            if _refusal(n, exc) is not None:
                raise exc
        else:
            # a reconnect refused for its credentials: no retry will mend it (any other
            # failure, such as no server there, is an outage again)
            why = _refusal(n, exc)
            nc.turned_away = None
            said = None
            if why is not None:
                said = nc.turned(why)
            elif "permissions violation" in str(exc).lower():
                said = nc.denied(exc)
            if said is not None:
                (on_refused or _refused_to_logging)(*said)

    servers = [u.strip() for u in url.split(",") if u.strip()]
    options: dict[str, Any] = {
        "servers": servers,
        "name": connection_name(n, name, reconnect=reconnect),
        "inbox_prefix": n.inbox_prefix,
        # each server gets its share of the deadline: one that drops packets must not use it
        # all before a live one of the same cluster is tried
        "connect_timeout": n.connect_timeout_s / max(1, len(servers)),
        # For the first connect: every server of the list, one retry each, and the deadline
        # below bounds it all (without allow_reconnect nats-py gives up after the first
        # server; max_reconnect_attempts=0 would retry a refusing server forever). Once
        # connected, the caller's choice applies (set below).
        "allow_reconnect": True,
        "max_reconnect_attempts": 1,
        "reconnect_time_wait": 0.5,
        "disconnected_cb": disconnected,
        "reconnected_cb": reconnected,
        "error_cb": error,
        "pending_size": 64 * 1024 * 1024,
    }
    if n.creds:
        options["user_credentials"] = n.creds
    if n.nkey_seed:
        if is_nkey_seed(n.nkey_seed):
            options["nkeys_seed_str"] = n.nkey_seed.strip()
        else:
            options["nkeys_seed"] = n.nkey_seed
    if n.user:
        options["user"] = n.user
        options["password"] = n.password
    if n.token:
        options["token"] = n.token
    tls = _tls_context(n)
    if tls is not None:
        options["tls"] = tls
    nc = _Client()
    nc.api_prefix = api_prefix(n)
    try:
        # nats-py bounds each attempt, not the loop over attempts and servers around them.
        async with asyncio.timeout(n.connect_timeout_s):
            await nc.connect(**options)
    except (OSError, TimeoutError, nats.errors.Error) as exc:
        await _close_quietly(nc)
        refused = _refusal(n, exc)
        if refused is not None:
            raise BusdError(f"NATS at {url} refused busd: {refused}") from None
        raise NatsUnreachable(
            url, n.connect_timeout_s, last_error[0] if last_error else exc
        ) from None
    except Exception as exc:
        await _close_quietly(nc)
        if type(exc).__module__.split(".")[0] == "nkeys":  # a seed nkeys cannot decode
            key = "nats.creds" if n.creds else "nats.nkey_seed"
            raise ConfigError(
                f"bad value for {key}: not a valid nkey seed ({type(exc).__name__})"
            ) from None
        raise
    connecting = False
    # nats-py reads both at each disconnection
    nc.options["allow_reconnect"] = reconnect
    nc.options["max_reconnect_attempts"] = -1 if reconnect else 0
    if on_state:
        on_state(True)
    return nc


async def request(nc: Client, subject: str, data: bytes, *, timeout_s: float) -> bytes:
    """A core NATS request; its answer's payload."""
    reply = await nc.request(subject, data, timeout=timeout_s)
    return bytes(reply.data or b"")


# JetStream silent while NATS answers, for this many connect timeouts: a mistake of the setup
JETSTREAM_PATIENCE = 10


def jetstream_patience_s(n: NatsSettings) -> float:
    """How long a JetStream that is not there is waited for: through a domain or an account
    import, no responders may be a hub or a far account that is down (an outage), so for as
    long as it lasts."""
    if n.js_domain or n.js_api_prefix:
        return math.inf
    return JETSTREAM_PATIENCE * n.connect_timeout_s


class Waiting:
    """Tries of one request that NATS did not answer, in a row, for whoever retries it: when
    to say so (at most every ``WAITING_SAID_EVERY_S``), for how long it has lasted, and a
    JetStream silent past its patience, which waiting does not mend (:class:`BusdError`)."""

    def __init__(self, patience_s: float) -> None:
        self.patience_s = patience_s
        self.since: float | None = None  # the first try of the row NATS did not answer
        self._silent_since: float | None = None
        self._said_at = -math.inf

    def unanswered(self, exc: BaseException, what: str) -> bool:
        """Count a try that ``exc`` (one :func:`unanswered` accepts) ended; True when it is
        time to say that NATS does not answer."""
        now = time.monotonic()
        self.since = now if self.since is None else self.since
        if not jetstream_silent(exc):
            self._silent_since = None
        elif self._silent_since is None:
            self._silent_since = now
        elif now - self._silent_since > self.patience_s:
            raise BusdError(
                f"JetStream does not answer (waiting to {what}, {self.patience_s:g}s): is it "
                "enabled on the server, for this account, in the configured domain?"
            ) from None
        if now - self._said_at < WAITING_SAID_EVERY_S:
            return False
        self._said_at = now
        return True

    def answered(self) -> None:
        self.since = self._silent_since = None
        self._said_at = -math.inf

    def lasted_s(self) -> float:
        return 0.0 if self.since is None else time.monotonic() - self.since
