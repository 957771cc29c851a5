"""busd with each way of authenticating to NATS (docs/reference/configuration.md), against a
real nats-server.

Each test starts a nats-server that admits clients one way only — user and password, a token,
an nkey, a credentials file (an operator, an account and a user, JWTs made here, a memory
resolver), TLS with a private CA and client certificates — from keys and certificates made in
the test and thrown away with it. The real busd then runs against it: `busd init`,
`busd submit` and `busd serve --drain` commit one event. A wrong or missing credential is
refused within seconds, with one line on stderr and exit 1 (never a traceback, never a hang);
a credential file that is missing or malformed fails the configuration check, exit 2, naming
the key.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import secrets
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nkeys
from opsfiles import find_tool
from support import BUSD, Bus

from busd.embedded import EmbeddedServer

REFUSED_WITHIN_S = 15.0  # nats.connect_timeout_s is 5: a refusal must not wait out retries
USER, PASSWORD = "busd", "busd-test-password"


# ---- the world: a nats-server that admits one way, and busd run as a real process ----------


@contextlib.contextmanager
def auth_bus(tmp_path: Path, extra_config: str, *, scheme: str = "nats") -> Iterator[Bus]:
    """A JetStream nats-server on a free loopback port with ``extra_config`` (its
    authorization, accounts or tls block), and a Bus world pointed at it."""
    server = EmbeddedServer("127.0.0.1", 0, tmp_path / "nats-store", extra_config=extra_config)
    server.start()
    try:
        bus = Bus(tmp_path, server)
        bus.cluster_url = f"{scheme}://127.0.0.1:{server.port}"
        bus.artifacts.mkdir(parents=True, exist_ok=True)
        yield bus
    finally:
        server.stop()


def busd(bus: Bus, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """The real busd on the world's busd.toml, nothing from the environment."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BUSD_")}
    return subprocess.run(
        [*BUSD, *args, "--config", str(bus.root / "busd.toml")],
        cwd=bus.root,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def commits_one_event(bus: Bus, nats: dict[str, Any], run_id: str) -> None:
    """`busd init`, `busd submit`, `busd serve --drain` with these [nats] keys: one commit."""
    bus.write_config(nats=nats)
    init = busd(bus, "init")
    assert init.returncode == 0, init.stderr
    fills = bus.parquet(f"{run_id}/fills.parquet")
    submit = busd(bus, "submit", "--run-id", run_id, "--kind", "simulation", f"fills={fills}")
    assert submit.returncode == 0, submit.stderr
    assert json.loads(submit.stdout.splitlines()[-1])["seq"] >= 1, submit.stdout
    serve = busd(bus, "serve", "--drain", timeout=90)
    assert serve.returncode == 0, serve.stderr
    assert bus.sql("SELECT run_id, outcome FROM catalog.events_f") == [(run_id, "committed")]
    assert bus.sql("SELECT run_id, status FROM catalog.runs_d") == [(run_id, "succeeded")]


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("busd: ")]
    assert len(lines) == 1, result.stderr
    return lines[0]


def refused(bus: Bus, nats: dict[str, Any], *, expect: str, command: str = "serve") -> str:
    """busd is turned away: exit 1 within seconds, one line naming why."""
    bus.write_config(nats=nats)
    args = ("serve", "--drain") if command == "serve" else (command,)
    started = time.monotonic()
    result = busd(bus, *args, timeout=REFUSED_WITHIN_S + 30)
    took = time.monotonic() - started
    assert result.returncode == 1, result.stderr
    line = one_line_error(result)
    assert line.startswith(f"busd: NATS at {bus.url} refused busd: "), line
    assert expect in line, line
    assert took < REFUSED_WITHIN_S, f"refused after {took:.1f}s"
    return line


def bad_config(bus: Bus, nats: dict[str, Any], *, key: str) -> str:
    """A credential the configuration check catches: exit 2, one line naming the key."""
    bus.write_config(nats=nats)
    result = busd(bus, "serve", "--drain", timeout=30)
    assert result.returncode == 2, result.stderr
    line = one_line_error(result)
    assert f"bad value for {key}:" in line, line
    return line


# ---- 1. user and password ------------------------------------------------------------------


def test_user_and_password(tmp_path: Path) -> None:
    conf = f'authorization {{ users = [ {{ user: "{USER}", password: "{PASSWORD}" }} ] }}\n'
    with auth_bus(tmp_path, conf) as bus:
        commits_one_event(bus, {"user": USER, "password": PASSWORD}, "userpass-1")
        line = refused(
            bus, {"user": USER, "password": "not-the-password"}, expect="Authorization Violation"
        )
        assert "not-the-password" not in line
        refused(
            bus,
            {"user": USER, "password": "not-the-password"},
            expect="Authorization Violation",
            command="init",
        )
        refused(bus, {}, expect="no credentials configured")
        bad_config(bus, {"password": PASSWORD}, key="nats.password")


# ---- 2. token ------------------------------------------------------------------------------


def test_token(tmp_path: Path) -> None:
    token = secrets.token_urlsafe(24)
    with auth_bus(tmp_path, f'authorization {{ token: "{token}" }}\n') as bus:
        commits_one_event(bus, {"token": token}, "token-1")
        line = refused(bus, {"token": "not-the-token"}, expect="nats.token")
        assert "not-the-token" not in line
        refused(bus, {}, expect="Authorization Violation")
        bad_config(bus, {"user": USER, "token": token}, key="nats.token")


# ---- 3. nkey seed --------------------------------------------------------------------------


def new_key(prefix: int) -> Any:
    return nkeys.from_seed(nkeys.encode_seed(os.urandom(32), prefix))


def test_nkey_seed_as_text_and_as_file(tmp_path: Path) -> None:
    user = new_key(nkeys.PREFIX_BYTE_USER)
    seed = user.seed.decode()
    public = user.public_key.decode()
    conf = f'authorization {{ users = [ {{ nkey: "{public}" }} ] }}\n'
    seed_file = tmp_path / "busd.nk"
    seed_file.write_text(seed + "\n")
    seed_file.chmod(0o600)
    with auth_bus(tmp_path, conf) as bus:
        commits_one_event(bus, {"nkey_seed": seed}, "nkey-1")
        bus.write_config(nats={"nkey_seed": str(seed_file)})
        fills = bus.parquet("nkey-2/fills.parquet")
        submit = busd(bus, "submit", "--run-id", "nkey-2", "--kind", "simulation", f"fills={fills}")
        assert submit.returncode == 0, submit.stderr
        serve = busd(bus, "serve", "--drain", timeout=90)
        assert serve.returncode == 0, serve.stderr
        assert bus.sql("SELECT run_id FROM catalog.runs_d ORDER BY run_id") == [
            ("nkey-1",),
            ("nkey-2",),
        ]

        stranger = new_key(nkeys.PREFIX_BYTE_USER).seed.decode()
        line = refused(bus, {"nkey_seed": stranger}, expect="nats.nkey_seed")
        assert stranger not in line
        refused(bus, {"user": USER, "password": PASSWORD}, expect="Authorization Violation")

        account_seed = new_key(nkeys.PREFIX_BYTE_ACCOUNT).seed.decode()
        line = bad_config(bus, {"nkey_seed": account_seed}, key="nats.nkey_seed")
        assert account_seed not in line
        bad_config(bus, {"nkey_seed": str(tmp_path / "missing.nk")}, key="nats.nkey_seed")
        not_a_seed = tmp_path / "not-a-seed.nk"
        not_a_seed.write_text("hello\n")
        bad_config(bus, {"nkey_seed": str(not_a_seed)}, key="nats.nkey_seed")
        truncated = seed[:-1]  # a mistyped seed is not taken for a path, nor echoed
        line = bad_config(bus, {"nkey_seed": truncated}, key="nats.nkey_seed")
        assert truncated not in line


# ---- 4. credentials file: operator → account → user JWTs, memory resolver -----------------


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def signed_jwt(
    issuer: Any, subject: str, name: str, claims: dict[str, Any], expires: int | None = None
) -> str:
    """A NATS JWT (v2): base64url header.claims, ed25519-signed by the issuer's nkey."""
    body: dict[str, Any] = {
        "jti": "",
        "iat": int(time.time()),
        "iss": issuer.public_key.decode(),
        "name": name,
        "sub": subject,
        "nats": {**claims, "version": 2},
    }
    if expires is not None:
        body["exp"] = expires
    digest = hashlib.new("sha512_256", json.dumps(body).encode()).digest()
    body["jti"] = base64.b32encode(digest).decode().rstrip("=")
    header = {"typ": "JWT", "alg": "ed25519-nkey"}
    signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(body).encode())}"
    return f"{signing_input}.{b64url(issuer.sign(signing_input.encode()))}"


UNLIMITED = {
    "subs": -1,
    "data": -1,
    "payload": -1,
    "imports": -1,
    "exports": -1,
    "wildcards": True,
    "conn": -1,
    "leaf": -1,
}
JETSTREAM = {"mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1}


def creds_text(user_jwt: str, user_seed: str) -> str:
    return (
        "-----BEGIN NATS USER JWT-----\n"
        f"{user_jwt}\n"
        "------END NATS USER JWT------\n\n"
        "************************* IMPORTANT *************************\n"
        "NKEY Seed printed below can be used to sign and prove identity.\n\n"
        "-----BEGIN USER NKEY SEED-----\n"
        f"{user_seed}\n"
        "------END USER NKEY SEED------\n"
    )


class Operator:
    """An operator with a system account and one JetStream account, as a server config."""

    def __init__(self) -> None:
        self.key = new_key(nkeys.PREFIX_BYTE_OPERATOR)
        self.account = new_key(nkeys.PREFIX_BYTE_ACCOUNT)
        self.system = new_key(nkeys.PREFIX_BYTE_ACCOUNT)

    def account_jwt(self, account: Any, name: str, limits: dict[str, Any]) -> str:
        return signed_jwt(
            self.key, account.public_key.decode(), name, {"type": "account", "limits": limits}
        )

    def server_config(self) -> str:
        operator_jwt = signed_jwt(
            self.key, self.key.public_key.decode(), "test-operator", {"type": "operator"}
        )
        preload = {
            self.account.public_key.decode(): self.account_jwt(
                self.account, "busd", {**UNLIMITED, **JETSTREAM}
            ),
            self.system.public_key.decode(): self.account_jwt(self.system, "SYS", UNLIMITED),
        }
        lines = "\n".join(f'  {pub}: "{jwt}"' for pub, jwt in preload.items())
        return (
            f'operator: "{operator_jwt}"\n'
            f'system_account: "{self.system.public_key.decode()}"\n'
            "resolver: MEMORY\n"
            f"resolver_preload: {{\n{lines}\n}}\n"
        )

    def user_creds(self, path: Path, *, signer: Any = None, expires: int | None = None) -> Path:
        """A credentials file for a new user of the account (signed by ``signer``)."""
        user = new_key(nkeys.PREFIX_BYTE_USER)
        claims: dict[str, Any] = {
            "type": "user",
            "pub": {},
            "sub": {},
            "subs": -1,
            "data": -1,
            "payload": -1,
        }
        jwt = signed_jwt(signer or self.account, user.public_key.decode(), "busd", claims, expires)
        path.write_text(creds_text(jwt, user.seed.decode()))
        path.chmod(0o600)
        return path


def test_credentials_file(tmp_path: Path) -> None:
    operator = Operator()
    good = operator.user_creds(tmp_path / "busd.creds")
    with auth_bus(tmp_path, operator.server_config()) as bus:
        commits_one_event(bus, {"creds": str(good)}, "creds-1")

        # a user signed by an account the operator never signed
        rogue = operator.user_creds(
            tmp_path / "rogue.creds", signer=new_key(nkeys.PREFIX_BYTE_ACCOUNT)
        )
        refused(bus, {"creds": str(rogue)}, expect="nats.creds")
        expired = operator.user_creds(tmp_path / "expired.creds", expires=int(time.time()) - 60)
        refused(bus, {"creds": str(expired)}, expect="nats.creds")
        refused(bus, {}, expect="Authorization Violation")

        bad_config(bus, {"creds": str(tmp_path / "missing.creds")}, key="nats.creds")
        # nats-py reads a file without the JWT markers forever: the check must catch it first
        garbage = tmp_path / "garbage.creds"
        garbage.write_text("not a credentials file\n")
        bad_config(bus, {"creds": str(garbage)}, key="nats.creds")
        bad_config(bus, {"creds": str(good), "nkey_seed": "SU" + "A" * 56}, key="nats.nkey_seed")


# ---- 5. TLS with a private CA and client certificates ---------------------------------------


def openssl(*args: str, cwd: Path) -> None:
    done = subprocess.run(
        [find_tool("openssl", "openssl"), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr


def openssl_config(folder: Path, name: str, extensions: str) -> str:
    (folder / f"{name}.cnf").write_text(
        f"[req]\ndistinguished_name = dn\nprompt = no\n[dn]\nCN = {name}\n[v3]\n{extensions}"
    )
    return f"{name}.cnf"


def make_ca(folder: Path, name: str) -> tuple[Path, Path]:
    cnf = openssl_config(
        folder,
        name,
        "basicConstraints = critical, CA:TRUE\n"
        "keyUsage = critical, keyCertSign, cRLSign\n"
        "subjectKeyIdentifier = hash\n",
    )
    openssl(
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-days",
        "2",
        "-config",
        cnf,
        "-extensions",
        "v3",
        "-keyout",
        f"{name}.key",
        "-out",
        f"{name}.pem",
        cwd=folder,
    )
    return folder / f"{name}.pem", folder / f"{name}.key"


def make_leaf(
    folder: Path, name: str, ca: tuple[Path, Path], usage: str, san: str = ""
) -> tuple[Path, Path]:
    """A key and a certificate signed by ``ca`` for ``usage`` (serverAuth, clientAuth)."""
    cnf = openssl_config(
        folder,
        name,
        "basicConstraints = critical, CA:FALSE\n"
        "keyUsage = critical, digitalSignature\n"
        f"extendedKeyUsage = {usage}\n"
        "subjectKeyIdentifier = hash\n"
        "authorityKeyIdentifier = keyid\n" + (f"subjectAltName = {san}\n" if san else ""),
    )
    openssl(
        "req",
        "-new",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-config",
        cnf,
        "-keyout",
        f"{name}.key",
        "-out",
        f"{name}.csr",
        cwd=folder,
    )
    openssl(
        "x509",
        "-req",
        "-in",
        f"{name}.csr",
        "-CA",
        str(ca[0]),
        "-CAkey",
        str(ca[1]),
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        cnf,
        "-extensions",
        "v3",
        "-out",
        f"{name}.pem",
        cwd=folder,
    )
    return folder / f"{name}.pem", folder / f"{name}.key"


def test_tls_with_a_ca_and_client_certificates(tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    pki.mkdir()
    ca = make_ca(pki, "test-ca")
    other_ca = make_ca(pki, "other-ca")
    server = make_leaf(pki, "server", ca, "serverAuth", "IP:127.0.0.1,DNS:localhost")
    client = make_leaf(pki, "busd", ca, "clientAuth")
    stranger = make_leaf(pki, "stranger", other_ca, "clientAuth")
    conf = (
        "tls {\n"
        f'  cert_file: "{server[0]}"\n  key_file: "{server[1]}"\n'
        f'  ca_file: "{ca[0]}"\n  verify: true\n  timeout: 2\n}}\n'
    )
    tls = {"tls_ca": str(ca[0]), "tls_cert": str(client[0]), "tls_key": str(client[1])}
    with auth_bus(tmp_path, conf, scheme="tls") as bus:
        commits_one_event(bus, tls, "tls-1")
        # nats:// works as well: the client upgrades when the server requires TLS
        bus.cluster_url = f"nats://127.0.0.1:{bus.server.port}"
        bus.write_config(nats=tls)
        init = busd(bus, "init")
        assert init.returncode == 0, init.stderr
        bus.cluster_url = f"tls://127.0.0.1:{bus.server.port}"

        refused(bus, {"tls_ca": str(ca[0])}, expect="TLS refused")  # no client certificate
        refused(
            bus,
            {**tls, "tls_cert": str(stranger[0]), "tls_key": str(stranger[1])},
            expect="TLS refused",
        )  # a certificate from a CA the server does not trust
        refused(bus, {**tls, "tls_ca": str(other_ca[0])}, expect="not trusted")
        refused(
            bus, {"tls_cert": str(client[0]), "tls_key": str(client[1])}, expect="not trusted"
        )  # the system's CAs do not know the test CA

        bad_config(bus, {**tls, "tls_ca": str(pki / "missing.pem")}, key="nats.tls_ca")
        bad_config(bus, {**tls, "tls_key": str(pki / "missing.key")}, key="nats.tls_key")
        bad_config(bus, {"tls_key": str(client[1])}, key="nats.tls_key")
        # a certificate with another's key: caught when loading, before any connection
        bad_config(bus, {**tls, "tls_key": str(stranger[1])}, key="nats.tls_cert/nats.tls_key")
        # an encrypted key is refused, not prompted for on a terminal
        openssl(
            "pkey",
            "-in",
            "busd.key",
            "-aes256",
            "-passout",
            "pass:secret",
            "-out",
            "busd-encrypted.key",
            cwd=pki,
        )
        line = bad_config(
            bus,
            {**tls, "tls_key": str(pki / "busd-encrypted.key")},
            key="nats.tls_cert/nats.tls_key",
        )
        assert "encrypted" in line, line
