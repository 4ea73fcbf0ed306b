"""The gateway's HAProxy configuration (gpunode/haproxy.py), run in the real HAProxy.

Each gateway here is the real ``haproxy`` binary (Debian's 2.6 package) on 127.0.0.1, with
the configuration and map files gpunode renders, a self-signed certificate made with
``cryptography``, and small threaded Python backends that echo what they received (the
method, the path, the model, whether an Authorization header reached them) and sleep when a
request asks them to. Clients are real TLS clients: ``http.client`` over ``ssl``, raw TLS
sockets for requests ``http.client`` will not send, and ``openssl s_client`` for protocol and
cipher checks.

What is checked: ``haproxy -c`` accepts every rendered variant; /health follows the
backends; keys, revocation, the route allow-list, methods, body limits, models and the
per-client limits (burst, sustained rate, requests in flight) answer as documented, with
JSON bodies and the Retry-After / WWW-Authenticate headers; old TLS versions and weak
ciphers are refused; the log names the client, route and status and never a key, a prompt
or a query string; a master-worker HAProxy reloads three times (with changed maps) under a
load loop without failing one request. Client certificates (mTLS), with a CA and client
certificates made with ``cryptography``: a client with ``mtls`` passes with its key and a
certificate of the client CA whose CN is its name (also on a resumed TLS session), and gets
a JSON 403 (the handshake completes) without one, with another client's, an expired one,
one of another CA, one for servers only or one with two CNs; a client without ``mtls`` passes
whatever it presents; a certificate is requested (naming the client CA, checked with
``openssl s_client``) only when an active client has ``mtls``. The renderers' refusals
are tested without HAProxy.

Without haproxy the HAProxy tests skip, except under CI (CI=true), where they fail.
"""

from __future__ import annotations

import datetime
import http.client
import ipaddress
import json
import os
import re
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gpunode.gateway import key_digest
from gpunode.haproxy import (
    CLIENT_MODELS_MAP,
    KEYS_MAP,
    MAPS,
    MODELS_MAP,
    MTLS_MAP,
    NODE,
    RATE_MAP,
    Paths,
    map_files,
    render_config,
)
from gpunode.schema.gateway import RemoteServer
from gpunode.schema.node import NodeConfig
from gpunode.schema.types import ConfigError

HAPROXY = shutil.which("haproxy") or (
    "/usr/sbin/haproxy" if Path("/usr/sbin/haproxy").exists() else None
)
OPENSSL = shutil.which("openssl")
MAX_BODY = 262_144
CANARY = "canary-prompt-7f3a9c"


def need(tool: str, path: str | None) -> str:
    """The tool's path; without it, skip on a workstation but fail in CI, which must have it."""
    if path:
        return path
    if os.environ.get("CI") == "true":
        pytest.fail(f"`{tool}` not found, and CI=true: CI must install it", pytrace=False)
    pytest.skip(f"`{tool}` not found (in CI, with CI=true, this is a failure)")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- a self-signed certificate ------------------------------------------------------------


@dataclass(frozen=True)
class Cert:
    pem: str  # leaf certificate + private key, what HAProxy's crt reads
    ca: str  # the certificate alone, the clients' trust anchor


@dataclass(frozen=True)
class ClientCert:
    cert: str  # the client certificate (PEM)
    key: str  # its private key (PEM)


def make_cert(directory: Path) -> Cert:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "gateway.test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("gateway.test"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    (directory / "ca.pem").write_bytes(cert_pem)
    (directory / "gateway.pem").write_bytes(cert_pem + key_pem)
    (directory / "gateway.pem").chmod(0o600)
    return Cert(pem=str(directory / "gateway.pem"), ca=str(directory / "ca.pem"))


# --- echo backends ------------------------------------------------------------------------


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # HAProxy's health checks close their connections with a reset


class Backend:
    """A threaded HTTP server on 127.0.0.1 that answers /health with 200 and anything else
    with what it received, as JSON; a body with ``"sleep": <seconds>`` is answered that
    much later (a slow generation)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.in_flight = 0
        self.seen: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        backend = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

            def _answer(self) -> None:
                if self.path == "/health":
                    return self._send(200, {"status": "ok"})
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                try:
                    body = json.loads(raw) if raw else {}
                except ValueError:
                    body = {}
                request = {
                    "backend": backend.name,
                    "method": self.command,
                    "path": self.path,
                    "model": body.get("model") if isinstance(body, dict) else None,
                    "authorization": "Authorization" in self.headers,
                    "body_bytes": len(raw),
                }
                with backend.lock:
                    backend.seen.append(request)
                    backend.in_flight += 1
                try:
                    if isinstance(body, dict) and body.get("sleep"):
                        time.sleep(float(body["sleep"]))
                    self._send(200, request)
                finally:
                    with backend.lock:
                        backend.in_flight -= 1

            def _send(self, status: int, payload: dict[str, Any]) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_DELETE = _answer  # noqa: N815

        self.server = _QuietServer(("127.0.0.1", 0), Handler)
        self.port = int(self.server.server_address[1])
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# --- configs ------------------------------------------------------------------------------


def node_config(
    backends: dict[str, tuple[str, int]],
    clients: dict[str, dict[str, Any]],
    **gateway: Any,
) -> NodeConfig:
    """A node whose gateway fronts one llama.cpp service per entry of ``backends``
    (name -> (served name, port))."""
    services = {
        name: {
            "runtime": "llamacpp",
            "port": port,
            "model": {"uri": "file:///models/m.gguf", "sha256": "a" * 64, "served_name": served},
        }
        for name, (served, port) in backends.items()
    }
    raw_clients = {
        name: {"key": {"path": f"gpunode/clients/{name}"}, **limits}
        for name, limits in clients.items()
    }
    return NodeConfig.model_validate(
        {
            "distro": "debian12",
            "inference": {
                "runtimes": {"llamacpp": {"method": "package", "package": "llama", "version": "1"}},
                "services": services,
            },
            "gateway": {"enabled": True, "clients": raw_clients, **gateway},
        }
    )


def digests_for(config: NodeConfig, keys: dict[str, str]) -> dict[str, str]:
    """What the role passes: the digests of the active clients' keys."""
    gw = config.gateway
    return {n: key_digest(keys[n]) for n, c in gw.clients.items() if not c.revoked}


def write_files(
    tmp: Path, config: NodeConfig, keys: dict[str, str], cert: Cert, **paths: Any
) -> tuple[Path, Paths]:
    """haproxy.cfg and the maps under ``tmp``; the client CA is ``client_ca`` (default: the
    gateway's own self-signed certificate, a CA too)."""
    maps = tmp / "maps"
    maps.mkdir(exist_ok=True)
    where = Paths(
        config_dir=str(maps),
        cert_file=cert.pem,
        user=None,
        chroot=None,
        stats_socket=paths.get("stats_socket"),
        client_ca_file=paths.get("client_ca") or cert.ca,
    )
    cfg = tmp / "haproxy.cfg"
    cfg.write_text(render_config(config, where))
    for path, text in map_files(config, digests_for(config, keys), where).items():
        Path(path).write_text(text)
    return cfg, where


def haproxy_check(cfg: Path) -> subprocess.CompletedProcess[str]:
    haproxy = need("haproxy", HAPROXY)
    return subprocess.run(
        [haproxy, "-c", "-f", str(cfg)], capture_output=True, text=True, timeout=30
    )


# --- a running gateway --------------------------------------------------------------------


@dataclass
class Gateway:
    tmp: Path
    config: NodeConfig
    keys: dict[str, str]
    cert: Cert
    master_worker: bool = False
    stats_socket: str | None = None
    client_ca: str | None = None
    proc: subprocess.Popen[bytes] | None = None
    cfg: Path = field(default_factory=Path)

    @property
    def port(self) -> int:
        return self.config.gateway.port

    @property
    def log_file(self) -> Path:
        return self.tmp / "haproxy.log"

    def write(self) -> None:
        self.cfg, _ = write_files(
            self.tmp,
            self.config,
            self.keys,
            self.cert,
            stats_socket=self.stats_socket,
            client_ca=self.client_ca,
        )

    def start(self) -> Gateway:
        haproxy = need("haproxy", HAPROXY)
        self.write()
        check = haproxy_check(self.cfg)
        assert check.returncode == 0, check.stdout + check.stderr
        if self.master_worker:  # as Debian's haproxy.service runs it
            argv = [haproxy, "-Ws", "-f", str(self.cfg), "-p", str(self.tmp / "haproxy.pid")]
            argv += ["-S", str(self.tmp / "master.sock")]
        else:
            argv = [haproxy, "-db", "-f", str(self.cfg)]
        with self.log_file.open("wb") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log_file.read_text()
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self
            except OSError:
                time.sleep(0.05)
        raise AssertionError(f"haproxy did not listen on {self.port}: {self.log_file.read_text()}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)

    def log(self) -> str:
        return self.log_file.read_text(errors="replace")

    def context(self, client_cert: ClientCert | None = None) -> ssl.SSLContext:
        """A client's TLS context: trusts the gateway's certificate; presents
        ``client_cert`` when given."""
        context = ssl.create_default_context(cafile=self.cert.ca)
        if client_cert:
            context.load_cert_chain(client_cert.cert, client_cert.key)
        return context

    def request(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | bytes | None = None,
        key: str | None = None,
        headers: dict[str, str] | None = None,
        conn: http.client.HTTPSConnection | None = None,
        client_cert: ClientCert | None = None,
    ) -> tuple[int, dict[str, str], Any]:
        """One request on a new (or the given) TLS connection, presenting ``client_cert``
        (on a new one) when given: status, headers, JSON body."""
        own = conn is None
        conn = conn or http.client.HTTPSConnection(
            "127.0.0.1", self.port, context=self.context(client_cert), timeout=20
        )
        all_headers = dict(headers or {})
        if key is not None:
            all_headers["Authorization"] = f"Bearer {key}"
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        if data is not None:
            all_headers.setdefault("Content-Type", "application/json")
        try:
            conn.request(method, path, body=data, headers=all_headers)
            resp = conn.getresponse()
            raw = resp.read()
        finally:
            if own:
                conn.close()
        payload = json.loads(raw) if raw else None
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, payload

    def raw(self, data: bytes, wait: float = 0.0) -> bytes:
        """Send bytes as they are on a TLS connection (after ``wait`` s: a slow client) and
        read the answer until the gateway closes or 5 s pass."""
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=20)
        with self.context().wrap_socket(sock, server_hostname="127.0.0.1") as tls:
            tls.sendall(data)
            if wait:
                time.sleep(wait)
            tls.settimeout(5)
            chunks = []
            try:
                while chunk := tls.recv(65536):
                    chunks.append(chunk)
                    if b"\r\n\r\n" in b"".join(chunks) and b"}" in chunk:
                        break
            except (TimeoutError, ssl.SSLError, ConnectionResetError):
                pass
        return b"".join(chunks)


def status_of(response: bytes) -> int:
    match = re.match(rb"HTTP/1\.[01] (\d{3}) ", response)
    assert match, response[:200]
    return int(match.group(1))


def chat(model: str = "chat", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}


# The main gateway: two services, clients for each behaviour (each limit test has its own
# client, so the tests do not spend each other's budget).
CLIENTS: dict[str, dict[str, Any]] = {
    "alice": {"rate": 50, "burst": 100, "concurrent": 8, "models": ["chat"]},
    "bob": {"rate": 50, "burst": 100, "concurrent": 8},
    "carol": {"revoked": True},
    "dave": {"rate": 1, "burst": 3},  # the burst test
    "erin": {"rate": 50, "burst": 100, "concurrent": 2},  # the in-flight test
    "frank": {"rate": 1, "burst": 100},  # the sustained-rate test
}
ROUTES = ["/v1/chat/completions", "/v1/embeddings", "/v1/models"]  # no /v1/completions


@dataclass
class Main:
    gw: Gateway
    chat: Backend
    embed: Backend


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> Cert:
    return make_cert(tmp_path_factory.mktemp("cert"))


@pytest.fixture(scope="module")
def main(tmp_path_factory: pytest.TempPathFactory, cert: Cert) -> Iterator[Main]:
    need("haproxy", HAPROXY)
    chat_be, embed_be = Backend("chat"), Backend("embed")
    config = node_config(
        {"chat": ("chat", chat_be.port), "embed": ("embedder", embed_be.port)},
        CLIENTS,
        listen="127.0.0.1",
        port=free_port(),
        metrics_port=free_port(),
        routes=ROUTES,
        request_timeout=2,
        max_body=MAX_BODY,
    )
    keys = {name: secrets.token_urlsafe(32) for name in CLIENTS}
    gw = Gateway(tmp_path_factory.mktemp("gateway"), config, keys, cert).start()
    yield Main(gw, chat_be, embed_be)
    gw.stop()
    chat_be.stop()
    embed_be.stop()


# --- haproxy -c ---------------------------------------------------------------------------

CHECKED = {
    "one service, one client": ({"chat": ("chat", 18101)}, {"alice": {}}, {}),
    "two services, clients with and without models": (
        {"chat": ("chat", 18101), "embed": ("org/embed:v1", 18102)},
        {"alice": {"models": ["chat"]}, "bob": {}, "eve": {"models": ["chat", "org/embed:v1"]}},
        {},
    ),
    "a revoked client": ({"chat": ("chat", 18101)}, {"alice": {}, "bob": {"revoked": True}}, {}),
    "every client revoked": ({"chat": ("chat", 18101)}, {"bob": {"revoked": True}}, {}),
    "no client": ({"chat": ("chat", 18101)}, {}, {}),
    "TLS 1.3 only, IPv6, /v1/models only": (
        {"chat": ("chat", 18101)},
        {"alice": {}},
        {"tls": {"min_version": "TLSv1.3"}, "listen": "::", "routes": ["/v1/models"]},
    ),
    "no /v1/models, largest body": (
        {"chat": ("chat", 18101)},
        {"alice": {}},
        {"routes": ["/v1/embeddings"], "max_body": 16 * 1024 * 1024},
    ),
    "a client with mtls, one without": (
        {"chat": ("chat", 18101)},
        {"alice": {"mtls": True}, "bob": {}},
        {},
    ),
    "mtls with models, IPv6, TLS 1.3 only": (
        {"chat": ("chat", 18101)},
        {"alice": {"mtls": True, "models": ["chat"]}},
        {"listen": "::", "tls": {"min_version": "TLSv1.3"}},
    ),
    "the only client with mtls revoked": (
        {"chat": ("chat", 18101)},
        {"alice": {"mtls": True, "revoked": True}, "bob": {}},
        {},
    ),
}


def gateway_bind(text: str) -> str:
    """The TLS bind line of a rendered haproxy.cfg."""
    binds = [line for line in text.splitlines() if line.startswith("    bind ") and " ssl " in line]
    assert len(binds) == 1, binds
    return binds[0]


@pytest.mark.parametrize("variant", CHECKED)
def test_haproxy_check_accepts_each_variant(variant: str, tmp_path: Path, cert: Cert) -> None:
    backends, clients, gateway = CHECKED[variant]
    config = node_config(backends, clients, **gateway)
    keys = {name: secrets.token_urlsafe(16) for name in clients}
    mtls = any(c.get("mtls") and not c.get("revoked") for c in clients.values())
    # Without an active client with mtls the client CA is never read: here it is absent.
    client_ca = cert.ca if mtls else str(tmp_path / "absent-client-ca.pem")
    cfg, paths = write_files(
        tmp_path, config, keys, cert, stats_socket=str(tmp_path / "s.sock"), client_ca=client_ca
    )
    check = haproxy_check(cfg)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "WARNING" not in check.stdout + check.stderr, check.stdout + check.stderr
    bind = gateway_bind(cfg.read_text())
    assert (f"ca-file {client_ca} verify optional" in bind) == mtls, bind
    assert ("verify" in bind) == mtls, bind
    # Every map the config names exists and nothing else is written.
    named = set(re.findall(r"map(?:_str_int)?\(([^)]+)\)", cfg.read_text()))
    assert named == {f"{paths.config_dir}/{m}" for m in MAPS}


def test_a_missing_client_ca_fails_the_check(tmp_path: Path, cert: Cert) -> None:
    # With a client with mtls the CA file is read: the role must write it before the check.
    config = node_config({"chat": ("chat", 18101)}, {"alice": {"mtls": True}})
    absent = str(tmp_path / "absent-client-ca.pem")
    cfg, _ = write_files(tmp_path, config, {"alice": "k"}, cert, client_ca=absent)
    check = haproxy_check(cfg)
    assert check.returncode != 0
    assert "absent-client-ca.pem" in check.stdout + check.stderr


def test_node_paths_render_user_chroot_and_socket() -> None:
    config = node_config({"chat": ("chat", 18101)}, {"alice": {}})
    text = render_config(config)
    assert "    user haproxy\n    group haproxy\n" in text
    assert "    chroot /var/lib/haproxy\n" in text
    assert "stats socket /run/haproxy/admin.sock mode 660 level admin expose-fd listeners" in text
    assert f"crt {NODE.cert_file} " in text
    assert set(map_files(config, {"alice": "0" * 64})) == {f"{NODE.config_dir}/{m}" for m in MAPS}
    assert NODE.client_ca_file == "/etc/haproxy/gpunode/tls/client-ca.pem"
    assert gateway_bind(text) == (f"    bind 0.0.0.0:8443 ssl crt {NODE.cert_file} alpn http/1.1")
    assert NODE.client_ca_file not in text
    mtls = node_config({"chat": ("chat", 18101)}, {"alice": {"mtls": True}})
    assert gateway_bind(render_config(mtls)) == (
        f"    bind 0.0.0.0:8443 ssl crt {NODE.cert_file} alpn http/1.1 ca-file "
        f"{NODE.client_ca_file} verify optional ca-ignore-err all crt-ignore-err all"
    )


# --- behaviour ----------------------------------------------------------------------------


def test_health_is_answered_without_a_key(main: Main) -> None:
    status, headers, body = main.gw.request("GET", "/health")
    assert (status, body) == (200, {"status": "ok"})
    assert headers["content-type"] == "application/json"
    assert main.gw.request("POST", "/health", body=b"{}")[0] == 405


def test_health_is_503_when_the_backend_is_down(tmp_path: Path, cert: Cert) -> None:
    backend = Backend("chat")
    config = node_config(
        {"chat": ("chat", backend.port)},
        {"alice": {}},
        listen="127.0.0.1",
        port=free_port(),
        metrics_port=free_port(),
    )
    keys = {"alice": secrets.token_urlsafe(32)}
    gw = Gateway(tmp_path, config, keys, cert).start()
    try:
        assert gw.request("GET", "/health")[0] == 200
        assert gw.request("POST", "/v1/chat/completions", chat(), key=keys["alice"])[0] == 200
        backend.stop()
        deadline = time.monotonic() + 15
        while gw.request("GET", "/health")[0] != 503:
            assert time.monotonic() < deadline, "/health stayed 200 with the backend down"
            time.sleep(0.25)
        status, _, body = gw.request("POST", "/v1/chat/completions", chat(), key=keys["alice"])
        assert status == 503
        assert body["error"]["code"] == 503  # HAProxy's own error, as JSON
    finally:
        gw.stop()


def test_a_key_passes_and_the_backend_never_sees_it(main: Main) -> None:
    key = main.gw.keys["alice"]
    status, _, body = main.gw.request("POST", "/v1/chat/completions", chat(), key=key)
    assert status == 200
    assert body == {
        "backend": "chat",
        "method": "POST",
        "path": "/v1/chat/completions",
        "model": "chat",
        "authorization": False,
        "body_bytes": len(json.dumps(chat())),
    }
    # The scheme is case-insensitive (RFC 9110).
    status, _, body = main.gw.request(
        "POST", "/v1/chat/completions", chat(), headers={"Authorization": f"bearer {key}"}
    )
    assert (status, body["authorization"]) == (200, False)


def test_the_model_picks_the_backend(main: Main) -> None:
    key = main.gw.keys["bob"]
    status, _, body = main.gw.request("POST", "/v1/embeddings", {"model": "embedder"}, key=key)
    assert (status, body["backend"], body["path"]) == (200, "embed", "/v1/embeddings")
    status, _, body = main.gw.request("GET", "/v1/models", key=key)
    assert (status, body["backend"], body["method"]) == (200, "chat", "GET")  # the first service
    assert body["authorization"] is False


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong-key"},
        {"Authorization": "Bearer "},
        {"Authorization": "Basic YWxpY2U6cGFzcw=="},
        {"Authorization": "Token {alice}"},
        {"Authorization": "Bearer {carol}"},  # revoked
        {"Authorization": "{alice}"},  # no scheme
        {"Authorization": "Bearer\t{alice}"},  # not "Bearer <key>"
    ],
    ids=["none", "wrong", "empty", "basic", "other-scheme", "revoked", "no-scheme", "tab"],
)
def test_no_valid_key_is_401(main: Main, headers: dict[str, str]) -> None:
    sent = {k: v.format(**main.gw.keys) for k, v in headers.items()}
    seen = len(main.chat.seen)
    status, got, body = main.gw.request("POST", "/v1/chat/completions", chat(), headers=sent)
    assert status == 401
    assert got["www-authenticate"] == "Bearer"
    assert body["error"]["type"] == "authentication_error"
    assert len(main.chat.seen) == seen  # nothing reached the backend


def test_two_authorization_headers_are_401(main: Main) -> None:
    bob, alice = main.gw.keys["bob"], main.gw.keys["alice"]
    request = (
        "POST /v1/chat/completions HTTP/1.1\r\nHost: gateway\r\n"
        f"Authorization: Bearer wrong\r\nAuthorization: Bearer {bob}\r\n"
        f"Authorization: Bearer {alice}, Bearer {bob}\r\n"
        "Content-Type: application/json\r\nContent-Length: 17\r\nConnection: close\r\n\r\n"
        '{"model": "chat"}'
    )
    assert status_of(main.gw.raw(request.encode())) == 401


def test_a_revoked_client_does_not_stop_another(main: Main) -> None:
    assert main.gw.request("GET", "/v1/models", key=main.gw.keys["carol"])[0] == 401
    assert main.gw.request("GET", "/v1/models", key=main.gw.keys["bob"])[0] == 200


@pytest.mark.parametrize(
    "method, path",
    [
        ("POST", "/tokenize"),
        ("POST", "/invocations"),
        ("POST", "/v1/completions"),  # a route, but not in this gateway's list
        ("GET", "/metrics"),
        ("GET", "/"),
        ("GET", "/v1/models/"),
        ("GET", "/V1/models"),
        ("GET", "/v1//models"),
        ("GET", "/v1/models/../../tokenize"),
        ("GET", "/v1/%6dodels"),
        ("GET", "/health/x"),
        ("POST", "/v1/chat/completions;x"),
        ("POST", "/pause"),
    ],
)
def test_a_route_outside_the_list_is_404_before_the_key(main: Main, method: str, path: str) -> None:
    for key in (None, main.gw.keys["bob"]):
        status, _, body = main.gw.request(method, path, chat(), key=key)
        assert status == 404, (path, key is None)
        assert body["error"]["type"] == "not_found_error"


@pytest.mark.parametrize(
    "method, path, allow",
    [
        ("GET", "/v1/chat/completions", "POST"),
        ("PUT", "/v1/chat/completions", "POST"),
        ("DELETE", "/v1/embeddings", "POST"),
        ("POST", "/v1/models", "GET"),
        ("HEAD", "/v1/models", "GET"),
    ],
)
def test_a_wrong_method_is_405(main: Main, method: str, path: str, allow: str) -> None:
    conn = http.client.HTTPSConnection("127.0.0.1", main.gw.port, context=main.gw.context())
    try:
        conn.request(method, path, body=None if method in ("GET", "HEAD") else b"{}")
        resp = conn.getresponse()
        resp.read()
    finally:
        conn.close()
    assert resp.status == 405
    assert resp.getheader("Allow") == allow


def test_a_query_string_does_not_change_the_route(main: Main) -> None:
    key = main.gw.keys["bob"]
    status, _, body = main.gw.request("POST", f"/v1/chat/completions?q={CANARY}", chat(), key=key)
    assert (status, body["path"]) == (200, f"/v1/chat/completions?q={CANARY}")


def test_a_post_without_content_length_is_411(main: Main) -> None:
    key = main.gw.keys["bob"]
    head = f"POST /v1/chat/completions HTTP/1.1\r\nHost: gateway\r\nAuthorization: Bearer {key}\r\n"
    no_body = head + "Connection: close\r\n\r\n"
    assert status_of(main.gw.raw(no_body.encode())) == 411
    body = json.dumps(chat()).encode()
    chunked = (
        head.encode()
        + b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        + f"{len(body):x}\r\n".encode()
        + body
        + b"\r\n0\r\n\r\n"
    )
    assert status_of(main.gw.raw(chunked)) == 411


def test_a_body_over_max_body_is_413_and_at_it_passes(main: Main) -> None:
    key = main.gw.keys["bob"]
    filler = json.dumps(chat(pad=""))
    at_limit = json.dumps(chat(pad="x" * (MAX_BODY - len(filler)))).encode()
    assert len(at_limit) == MAX_BODY
    status, _, body = main.gw.request("POST", "/v1/chat/completions", at_limit, key=key)
    assert (status, body["model"], body["body_bytes"]) == (200, "chat", MAX_BODY)
    over = at_limit[:-1] + b" }"
    status, _, body = main.gw.request("POST", "/v1/chat/completions", over, key=key)
    assert status == 413
    assert body["error"]["code"] == 413


def test_models(main: Main) -> None:
    alice, bob = main.gw.keys["alice"], main.gw.keys["bob"]
    # alice may use chat only
    status, _, body = main.gw.request("POST", "/v1/embeddings", {"model": "embedder"}, key=alice)
    assert (status, body["error"]["type"]) == (403, "permission_error")
    # a model nobody serves
    for key in (alice, bob):
        status, _, body = main.gw.request("POST", "/v1/chat/completions", chat("nope"), key=key)
        assert (status, body["error"]["message"]) == (404, "no such model")
    # no model, or no JSON
    for payload in ({"messages": []}, b"not json", b"[1, 2]"):
        status, _, body = main.gw.request("POST", "/v1/chat/completions", payload, key=bob)
        assert status == 400, payload
    # a model name that is a map key of another kind is no model
    status, _, _ = main.gw.request("POST", "/v1/chat/completions", chat("be_chat"), key=bob)
    assert status == 404


def until_429(gw: Gateway, key: str, most: int) -> tuple[int, dict[str, str], Any]:
    """Requests in a quick loop until the first 429: (how many passed, its headers and
    body)."""
    for passed in range(most):
        status, headers, body = gw.request("GET", "/v1/models", key=key)
        if status == 429:
            return passed, headers, body
        assert status == 200, status
    raise AssertionError(f"no 429 after {most} requests")


def test_over_the_burst_is_429_then_200_again(main: Main) -> None:
    key = main.gw.keys["dave"]  # burst 3 in any second
    passed, headers, body = until_429(main.gw, key, 10)
    # HAProxy's rate counter weighs the previous period by the time left in it: if the loop
    # straddles a period boundary, one more may pass.
    assert passed in (3, 4)
    assert headers["retry-after"] == "1"
    assert body["error"]["type"] == "rate_limit_error"
    time.sleep(2.2)
    assert main.gw.request("GET", "/v1/models", key=key)[0] == 200
    # another client was never limited
    assert main.gw.request("GET", "/v1/models", key=main.gw.keys["bob"])[0] == 200


def test_over_the_sustained_rate_is_429(main: Main) -> None:
    key = main.gw.keys["frank"]  # rate 1/s over 10 s: 10 requests, then 429
    passed, headers, body = until_429(main.gw, key, 20)
    assert passed in (10, 11)
    assert headers["retry-after"] == "10"
    assert body["error"]["type"] == "rate_limit_error"
    assert main.gw.request("GET", "/v1/models", key=key)[0] == 429


def test_over_the_requests_in_flight_is_429(main: Main) -> None:
    key = main.gw.keys["erin"]  # 2 in flight
    conns = [
        http.client.HTTPSConnection("127.0.0.1", main.gw.port, context=main.gw.context())
        for _ in range(2)
    ]
    results: list[int] = []

    def slow(conn: http.client.HTTPSConnection) -> None:
        results.append(
            main.gw.request("POST", "/v1/chat/completions", chat(sleep=2), key=key, conn=conn)[0]
        )

    threads = [threading.Thread(target=slow, args=(c,)) for c in conns]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 5
    while main.chat.in_flight < 2:
        assert time.monotonic() < deadline, "the slow requests did not reach the backend"
        time.sleep(0.02)
    status, headers, body = main.gw.request("POST", "/v1/chat/completions", chat(), key=key)
    assert (status, headers["retry-after"]) == (429, "1")
    # another client is not counted with erin
    assert (
        main.gw.request("POST", "/v1/chat/completions", chat(), key=main.gw.keys["bob"])[0] == 200
    )
    for t in threads:
        t.join(timeout=10)
    assert results == [200, 200]
    # Done requests are no longer in flight, though their keep-alive connections stay open.
    assert main.gw.request("POST", "/v1/chat/completions", chat(), key=key)[0] == 200
    for conn in conns:
        conn.close()


def test_a_slow_client_is_408(main: Main) -> None:
    key = main.gw.keys["bob"]
    partial = (
        "POST /v1/chat/completions HTTP/1.1\r\nHost: gateway\r\n"
        f"Authorization: Bearer {key}\r\nContent-Length: 100\r\n\r\n" + '{"model": '
    )
    # request_timeout is 2 s here
    assert status_of(main.gw.raw(partial.encode(), wait=3)) == 408
    assert status_of(main.gw.raw(b"GET /v1/models HTTP/1.1\r\nHost: g", wait=3)) == 408


def test_metrics_port(main: Main) -> None:
    port = main.gw.config.gateway.metrics_port
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/metrics")
    resp = conn.getresponse()
    text = resp.read().decode()
    assert resp.status == 200
    assert 'haproxy_frontend_http_requests_total{proxy="gateway"}' in text
    assert 'haproxy_server_status{proxy="be_chat",server="chat"' in text
    for key in main.gw.keys.values():
        assert key not in text
    conn.request("GET", "/stats")
    resp = conn.getresponse()
    resp.read()
    conn.close()
    assert resp.status == 404


def test_logs_name_client_route_and_status_never_a_key_or_prompt(main: Main) -> None:
    key = main.gw.keys["bob"]
    canary_body = chat(messages=[{"role": "user", "content": CANARY}])
    path = f"/v1/chat/completions?prompt={CANARY}"
    assert main.gw.request("POST", path, canary_body, key=key)[0] == 200
    assert main.gw.request("POST", f"/tokenize?{CANARY}", canary_body, key=key)[0] == 404
    assert main.gw.request("POST", path, canary_body, key="wrong-" + CANARY)[0] == 401
    main.gw.request("POST", path, canary_body, key=main.gw.keys["carol"])
    deadline = time.monotonic() + 5
    while main.gw.log().count("route=/v1/chat/completions status=401") < 2:
        assert time.monotonic() < deadline, main.gw.log()
        time.sleep(0.1)
    log = main.gw.log()
    assert CANARY not in log
    for secret in main.gw.keys.values():
        assert secret not in log
        assert key_digest(secret) not in log
    assert re.search(
        r"client=bob route=/v1/chat/completions status=200 time_ms=\d+ backend=be_chat ", log
    )
    # the allow-list answers before the key is looked at
    assert re.search(r"client=- route=- status=404 time_ms=\d+ backend=gateway ", log)
    assert re.search(r"client=- route=/v1/chat/completions status=401 ", log)
    assert "/tokenize" not in log


# --- TLS ----------------------------------------------------------------------------------


def s_client(port: int, *args: str) -> subprocess.CompletedProcess[str]:
    openssl = need("openssl", OPENSSL)
    return subprocess.run(
        [
            openssl,
            "s_client",
            "-connect",
            f"127.0.0.1:{port}",
            "-servername",
            "gateway.test",
            *args,
        ],
        input="",
        capture_output=True,
        text=True,
        timeout=20,
    )


def negotiated(proc: subprocess.CompletedProcess[str]) -> tuple[str, str] | None:
    """(protocol, cipher) of a completed handshake ("New, TLSv1.2, Cipher is ..."), else
    None ("New, (NONE), Cipher is (NONE)", or no such line)."""
    match = re.search(r"^New, (TLSv[0-9.]+), Cipher is (\S+)$", proc.stdout, re.M)
    if proc.returncode != 0 or not match:
        return None
    return match.group(1), match.group(2)


def test_tls_versions(main: Main) -> None:
    port = main.gw.port
    # SECLEVEL=0: the client offers TLS 1.0/1.1, so a refusal is the server's.
    for old in ("-tls1", "-tls1_1"):
        proc = s_client(port, old, "-cipher", "DEFAULT@SECLEVEL=0")
        assert negotiated(proc) is None, proc.stdout
        assert "alert protocol version" in proc.stderr, proc.stderr  # sent by the server
    ok = negotiated(s_client(port, "-tls1_2", "-CAfile", main.gw.cert.ca))
    assert ok and ok[0] == "TLSv1.2" and ok[1].startswith("ECDHE-RSA-")
    ok = negotiated(s_client(port, "-tls1_3"))
    assert ok and ok[0] == "TLSv1.3"


@pytest.mark.parametrize(
    "cipher",
    [
        "AES128-SHA",  # RSA key exchange, CBC
        "AES256-GCM-SHA384",  # RSA key exchange: no forward secrecy
        "ECDHE-RSA-AES128-SHA",  # CBC with SHA-1
        "ECDHE-RSA-AES256-SHA384",  # CBC
        "ECDHE-RSA-AES128-SHA256",  # CBC
        "DHE-RSA-AES128-SHA",  # CBC with SHA-1
        "AES128-GCM-SHA256",  # RSA key exchange
    ],
)
def test_weak_ciphers_are_refused(main: Main, cipher: str) -> None:
    # The client offers only this cipher (and TLS 1.2): the server's handshake failure alert
    # says it refused it (a cipher the client cannot offer would prove nothing).
    proc = s_client(main.gw.port, "-tls1_2", "-cipher", f"{cipher}@SECLEVEL=0")
    assert negotiated(proc) is None, proc.stdout
    assert "alert handshake failure" in proc.stderr, proc.stderr


def test_a_strong_tls12_cipher_passes(main: Main) -> None:
    ok = negotiated(s_client(main.gw.port, "-tls1_2", "-cipher", "ECDHE-RSA-CHACHA20-POLY1305"))
    assert ok == ("TLSv1.2", "ECDHE-RSA-CHACHA20-POLY1305")


def test_tls13_only(tmp_path: Path, cert: Cert) -> None:
    backend = Backend("chat")
    config = node_config(
        {"chat": ("chat", backend.port)},
        {"alice": {}},
        listen="127.0.0.1",
        port=free_port(),
        metrics_port=free_port(),
        tls={"min_version": "TLSv1.3"},
    )
    gw = Gateway(tmp_path, config, {"alice": "k"}, cert).start()
    try:
        proc = s_client(gw.port, "-tls1_2")
        assert negotiated(proc) is None, proc.stdout
        assert "alert protocol version" in proc.stderr, proc.stderr
        ok = negotiated(s_client(gw.port, "-tls1_3"))
        assert ok and ok[0] == "TLSv1.3"
    finally:
        gw.stop()
        backend.stop()


# --- client certificates (mTLS) -----------------------------------------------------------


@dataclass(frozen=True)
class Ca:
    name: x509.Name
    key: rsa.RSAPrivateKey
    pem: str  # the CA certificate, what the gateway's client-ca.pem holds


def make_ca(directory: Path, common_name: str, parent: Ca | None = None) -> Ca:
    """A root CA, or an intermediate one signed by ``parent``."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(parent.name if parent else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(parent.key if parent else key, hashes.SHA256())
    )
    path = directory / f"{common_name.replace(' ', '-')}.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return Ca(name=name, key=key, pem=str(path))


def issue(
    directory: Path,
    ca: Ca,
    file: str,
    common_names: list[str],
    expired: bool = False,
    usage: x509.ObjectIdentifier = ExtendedKeyUsageOID.CLIENT_AUTH,
) -> ClientCert:
    """A client certificate signed by ``ca`` (as Vault's PKI issues one: clientAuth), with a
    CN per entry of ``common_names``."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    now = datetime.datetime.now(datetime.UTC)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(hours=1)
    if expired:
        start, end = now - datetime.timedelta(hours=2), now - datetime.timedelta(hours=1)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn) for cn in common_names])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca.name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .sign(ca.key, hashes.SHA256())
    )
    (directory / f"{file}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    (directory / f"{file}.key").write_bytes(key_pem)
    (directory / f"{file}.key").chmod(0o600)
    return ClientCert(cert=str(directory / f"{file}.crt"), key=str(directory / f"{file}.key"))


@dataclass
class Mtls:
    gw: Gateway
    backend: Backend
    ca: Ca
    certs: dict[str, ClientCert]


CLIENT_CA_CN = "gpunode test client CA"
MTLS_CLIENTS: dict[str, dict[str, Any]] = {
    "alice": {"mtls": True},
    "bob": {},  # no mtls
    "carol": {"mtls": True, "revoked": True},
}


@pytest.fixture(scope="module")
def mtls(tmp_path_factory: pytest.TempPathFactory, cert: Cert) -> Iterator[Mtls]:
    need("haproxy", HAPROXY)
    pki = tmp_path_factory.mktemp("pki")
    ca, other = make_ca(pki, CLIENT_CA_CN), make_ca(pki, "another CA")
    certs = {
        "alice": issue(pki, ca, "alice", ["alice"]),
        "bob": issue(pki, ca, "bob", ["bob"]),  # bob's certificate, for alice's key
        "carol": issue(pki, ca, "carol", ["carol"]),
        "expired": issue(pki, ca, "expired", ["alice"], expired=True),
        "other-ca": issue(pki, other, "other-ca", ["alice"]),
        "server-only": issue(pki, ca, "server", ["alice"], usage=ExtendedKeyUsageOID.SERVER_AUTH),
        "alice-and-bob": issue(pki, ca, "alice-and-bob", ["alice", "bob"]),
        "bob-and-alice": issue(pki, ca, "bob-and-alice", ["bob", "alice"]),
        "alice-prefix": issue(pki, ca, "alice-prefix", ["alice2"]),
    }
    backend = Backend("chat")
    config = node_config(
        {"chat": ("chat", backend.port)},
        MTLS_CLIENTS,
        listen="127.0.0.1",
        port=free_port(),
        metrics_port=free_port(),
    )
    keys = {name: secrets.token_urlsafe(32) for name in MTLS_CLIENTS}
    gw = Gateway(tmp_path_factory.mktemp("mtls"), config, keys, cert, client_ca=ca.pem).start()
    yield Mtls(gw, backend, ca, certs)
    gw.stop()
    backend.stop()


def test_mtls_key_and_its_certificate_pass(mtls: Mtls) -> None:
    seen = len(mtls.backend.seen)
    key, alice = mtls.gw.keys["alice"], mtls.certs["alice"]
    status, _, body = mtls.gw.request(
        "POST", "/v1/chat/completions", chat(), key=key, client_cert=alice
    )
    assert (status, body["authorization"]) == (200, False)
    assert mtls.gw.request("GET", "/v1/models", key=key, client_cert=alice)[0] == 200
    assert len(mtls.backend.seen) == seen + 2


def test_mtls_key_without_a_certificate_is_403(mtls: Mtls) -> None:
    seen = len(mtls.backend.seen)
    status, headers, body = mtls.gw.request(
        "POST", "/v1/chat/completions", chat(), key=mtls.gw.keys["alice"]
    )
    assert (status, headers["content-type"]) == (403, "application/json")
    assert body["error"]["type"] == "permission_error"
    assert "client certificate" in body["error"]["message"]
    assert len(mtls.backend.seen) == seen


@pytest.mark.parametrize(
    "presented",
    [
        "bob",  # a valid certificate of the CA, another client's CN
        "alice-prefix",  # CN alice2
        "alice-and-bob",  # two CNs: it names no one client
        "bob-and-alice",
        "expired",
        "other-ca",
        "server-only",  # the CA's, CN alice, but not for client authentication
    ],
)
def test_mtls_key_with_a_wrong_certificate_is_403(mtls: Mtls, presented: str) -> None:
    # The handshake completes (ca-ignore-err / crt-ignore-err): the answer is a JSON 403,
    # never a pass and never a refused handshake.
    seen = len(mtls.backend.seen)
    status, _, body = mtls.gw.request(
        "POST",
        "/v1/chat/completions",
        chat(),
        key=mtls.gw.keys["alice"],
        client_cert=mtls.certs[presented],
    )
    assert (status, body["error"]["type"]) == (403, "permission_error")
    assert len(mtls.backend.seen) == seen


def test_mtls_a_certificate_alone_is_no_key(mtls: Mtls) -> None:
    alice = mtls.certs["alice"]
    for key in (None, "wrong", mtls.gw.keys["carol"]):  # carol: revoked, with her certificate
        status, headers, _ = mtls.gw.request("GET", "/v1/models", key=key, client_cert=alice)
        assert (status, headers["www-authenticate"]) == (401, "Bearer")
    status = mtls.gw.request(
        "GET", "/v1/models", key=mtls.gw.keys["carol"], client_cert=mtls.certs["carol"]
    )[0]
    assert status == 401


@pytest.mark.parametrize("presented", [None, "alice", "bob", "expired", "other-ca"])
def test_a_client_without_mtls_needs_no_certificate(mtls: Mtls, presented: str | None) -> None:
    # Whatever bob's TLS library presents (nothing, anyone's, an invalid one), his key passes.
    client_cert = mtls.certs[presented] if presented else None
    status, _, body = mtls.gw.request(
        "POST", "/v1/chat/completions", chat(), key=mtls.gw.keys["bob"], client_cert=client_cert
    )
    assert (status, body["backend"]) == (200, "chat")


def test_mtls_keys_on_one_connection(mtls: Mtls) -> None:
    # The certificate belongs to the connection, the key to the request: on a connection
    # without a certificate alice is refused, bob passes; on alice's, both pass.
    alice, bob = mtls.gw.keys["alice"], mtls.gw.keys["bob"]
    for client_cert, expected in ((None, [403, 200, 403]), (mtls.certs["alice"], [200] * 3)):
        conn = http.client.HTTPSConnection(
            "127.0.0.1", mtls.gw.port, context=mtls.gw.context(client_cert), timeout=20
        )
        try:
            got = [mtls.gw.request("GET", "/v1/models", key=k, conn=conn)[0] for k in (alice, bob)]
            got.append(mtls.gw.request("GET", "/v1/models", key=alice, conn=conn)[0])
        finally:
            conn.close()
        assert got == expected, client_cert


def _resumed_status(gw: Gateway, client_cert: ClientCert, key: str) -> list[tuple[bool, int]]:
    """Two TLS 1.2 connections, the second resuming the first's session: (resumed, status)
    of a GET /v1/models on each."""
    context = gw.context(client_cert)
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    request = (
        f"GET /v1/models HTTP/1.1\r\nHost: gateway\r\nAuthorization: Bearer {key}\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    session, results = None, []
    for _ in range(2):
        sock = socket.create_connection(("127.0.0.1", gw.port), timeout=20)
        with context.wrap_socket(sock, server_hostname="127.0.0.1", session=session) as tls:
            tls.sendall(request)
            answer = b""
            while chunk := tls.recv(65536):
                answer += chunk
            results.append((tls.session_reused, status_of(answer)))
            session = tls.session
    return results


@pytest.mark.parametrize("presented, status", [("alice", 200), ("expired", 403), ("bob", 403)])
def test_mtls_on_a_resumed_session(mtls: Mtls, presented: str, status: int) -> None:
    # A resumed session carries the certificate and its verification result with it.
    got = _resumed_status(mtls.gw, mtls.certs[presented], mtls.gw.keys["alice"])
    assert got == [(False, status), (True, status)]


def test_mtls_log_names_the_client_never_the_certificate(mtls: Mtls) -> None:
    key = mtls.gw.keys["alice"]
    assert mtls.gw.request("GET", "/v1/models", key=key, client_cert=mtls.certs["bob"])[0] == 403
    deadline = time.monotonic() + 5
    while not re.search(r"client=alice route=/v1/models status=403 ", mtls.gw.log()):
        assert time.monotonic() < deadline, mtls.gw.log()
        time.sleep(0.1)
    log = mtls.gw.log()
    for text in ("CN=", CLIENT_CA_CN, "another CA", "alice2"):
        assert text not in log
    for secret in mtls.gw.keys.values():
        assert secret not in log


def test_a_certificate_is_requested_only_with_an_mtls_client(main: Main, mtls: Mtls) -> None:
    # With a client with mtls the handshake asks for a certificate of the client CA (and only
    # names that CA); without one (the main gateway) it never asks, in TLS 1.2 or 1.3.
    for version in ("-tls1_2", "-tls1_3"):
        asked = s_client(mtls.gw.port, version)
        assert negotiated(asked), asked.stdout
        names = asked.stdout.split("Acceptable client certificate CA names\n", 1)[1]
        assert names.splitlines()[0] == f"CN = {CLIENT_CA_CN}", asked.stdout
        assert "another CA" not in asked.stdout
        plain = s_client(main.gw.port, version)
        assert negotiated(plain), plain.stdout
        assert "Acceptable client certificate CA names" not in plain.stdout
        assert "No client certificate CA names sent" in plain.stdout
    assert "ca-file" not in gateway_bind(main.gw.cfg.read_text())


@pytest.mark.parametrize(
    "client_ca, status",
    [("intermediate and root", 200), ("intermediate only", 403)],
)
def test_mtls_with_an_intermediate_ca(
    tmp_path: Path, cert: Cert, client_ca: str, status: int
) -> None:
    # A PKI mount that is an intermediate CA: the client CA file must hold the chain up to
    # its self-signed root (Vault's <mount>/cert/ca_chain); the intermediate alone verifies
    # nothing (403, never a pass).
    root = make_ca(tmp_path, "test root CA")
    intermediate = make_ca(tmp_path, "test intermediate CA", parent=root)
    alice = issue(tmp_path, intermediate, "alice", ["alice"])
    ca_file = tmp_path / "client-ca.pem"
    chain = [intermediate.pem, root.pem] if client_ca == "intermediate and root" else []
    ca_file.write_text("".join(Path(p).read_text() for p in chain or [intermediate.pem]))
    backend = Backend("chat")
    config = node_config(
        {"chat": ("chat", backend.port)},
        {"alice": {"mtls": True}},
        listen="127.0.0.1",
        port=free_port(),
        metrics_port=free_port(),
    )
    keys = {"alice": secrets.token_urlsafe(32)}
    gw = Gateway(tmp_path, config, keys, cert, client_ca=str(ca_file)).start()
    try:
        assert gw.request("GET", "/v1/models", key=keys["alice"], client_cert=alice)[0] == status
    finally:
        gw.stop()
        backend.stop()


def test_mtls_openssl_client(mtls: Mtls) -> None:
    # openssl s_client, as a client with its certificate: the handshake verifies the
    # certificate and the request passes.
    alice = mtls.certs["alice"]
    request = (
        f"GET /v1/models HTTP/1.1\r\nHost: gateway\r\nAuthorization: Bearer "
        f"{mtls.gw.keys['alice']}\r\nConnection: close\r\n\r\n"
    )
    openssl = need("openssl", OPENSSL)
    proc = subprocess.run(
        [openssl, "s_client", "-connect", f"127.0.0.1:{mtls.gw.port}", "-quiet"]
        + ["-cert", alice.cert, "-key", alice.key, "-CAfile", mtls.gw.cert.ca],
        input=request,
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert proc.stdout.startswith("HTTP/1.1 200 "), proc.stdout + proc.stderr


# --- hitless reloads ----------------------------------------------------------------------


@pytest.mark.parametrize("stats_socket", [True, False], ids=["node-socket", "no-socket"])
def test_reloads_drop_no_request(tmp_path: Path, cert: Cert, stats_socket: bool) -> None:
    backend = Backend("chat")
    clients: dict[str, dict[str, Any]] = {
        "load": {"rate": 10_000, "burst": 10_000, "concurrent": 100}
    }
    keys = {"load": secrets.token_urlsafe(32)}

    def configure() -> NodeConfig:
        return node_config(
            {"chat": ("chat", backend.port)},
            clients,
            listen="127.0.0.1",
            port=port,
            metrics_port=metrics_port,
        )

    port, metrics_port = free_port(), free_port()
    gw = Gateway(
        tmp_path,
        configure(),
        keys,
        cert,
        master_worker=True,
        stats_socket=str(tmp_path / "admin.sock") if stats_socket else None,
    ).start()
    done, failures, count = threading.Event(), [], [0]
    lock = threading.Lock()

    def load() -> None:
        while not done.is_set():
            try:
                status = gw.request("POST", "/v1/chat/completions", chat(), key=keys["load"])[0]
                outcome = None if status == 200 else f"status {status}"
            except (OSError, http.client.HTTPException) as exc:
                outcome = type(exc).__name__
            with lock:
                count[0] += 1
                if outcome:
                    failures.append(outcome)

    threads = [threading.Thread(target=load) for _ in range(4)]
    try:
        for t in threads:
            t.start()
        assert gw.proc is not None
        for i in range(3):
            time.sleep(0.5)
            # A new client, in the maps only: the reload must pick it up.
            name = f"new{i}"
            clients[name] = {}
            keys[name] = secrets.token_urlsafe(32)
            gw.config = configure()
            gw.write()
            gw.proc.send_signal(signal.SIGUSR2)
            deadline = time.monotonic() + 10
            while gw.request("GET", "/v1/models", key=keys[name])[0] != 200:
                assert time.monotonic() < deadline, f"reload {i}: {gw.log()}"
                time.sleep(0.05)
        deadline = time.monotonic() + 30
        while count[0] < 300:
            assert time.monotonic() < deadline
            time.sleep(0.1)
    finally:
        done.set()
        for t in threads:
            t.join(timeout=30)
        gw.stop()
        backend.stop()
    assert count[0] >= 300
    assert failures == [], f"{len(failures)} of {count[0]} failed: {sorted(set(failures))}"
    assert gw.log().count("Loading success.") == 4, gw.log()  # the start and 3 reloads


# --- without haproxy ------------------------------------------------------------------------


def test_output_is_deterministic() -> None:
    backends = {"chat": ("chat", 18101), "embed": ("embedder", 18102)}
    a = {"alice": {"models": ["chat", "embedder"]}, "bob": {"mtls": True}, "carol": {"mtls": True}}
    b = {"carol": {"mtls": True}, "bob": {"mtls": True}, "alice": {"models": ["embedder", "chat"]}}
    one, two = node_config(backends, a), node_config(backends, b)
    digests = {"alice": "a" * 64, "bob": "b" * 64, "carol": "c" * 64}
    assert render_config(one) == render_config(two) == render_config(one)
    assert map_files(one, digests) == map_files(two, dict(reversed(digests.items())))


def test_maps() -> None:
    config = node_config(
        {"chat": ("chat", 18101), "embed": ("org/embed:v1", 18102)},
        {
            "alice": {"rate": 5, "models": ["org/embed:v1"]},
            "bob": {"rate": 2, "burst": 7, "concurrent": 3, "mtls": True},
            "carol": {"revoked": True, "mtls": True},
        },
    )
    paths = Paths("/m", "/c.pem", None, None, None, "/ca.pem")
    # carol's digest is passed, but she is revoked: her key must not pass
    files = map_files(config, {"alice": "a" * 64, "bob": "b" * 64, "carol": "c" * 64}, paths)
    lines = {
        Path(p).name: [x for x in t.splitlines() if not x.startswith("#")] for p, t in files.items()
    }
    assert lines[KEYS_MAP] == [f"{'a' * 64} alice", f"{'b' * 64} bob"]
    assert lines[RATE_MAP] == ["alice 50", "bob 20"]
    assert lines["burst.map"] == ["alice 10", "bob 7"]
    assert lines["concurrent.map"] == ["alice 4", "bob 3"]
    assert lines["restricted.map"] == ["alice 1"]
    assert lines[CLIENT_MODELS_MAP] == ["alice/org/embed:v1 1"]
    assert lines[MODELS_MAP] == ["chat be_chat", "org/embed:v1 be_embed"]
    assert lines[MTLS_MAP] == ["bob 1"]  # carol is revoked
    # Without a client with mtls the map is written, empty.
    plain = node_config({"chat": ("chat", 18101)}, {"alice": {}})
    files = map_files(plain, {"alice": "a" * 64}, paths)
    assert files["/m/mtls.map"] == "# mtls.map: written by gpunode (gpunode/haproxy.py)\n"


@pytest.mark.parametrize(
    "digests, message",
    [
        ({"alice": "a" * 64}, "gateway.clients.bob: no key digest"),
        ({"alice": "a" * 64, "bob": "A" * 64}, "not a SHA-256"),
        ({"alice": "a" * 64, "bob": "a" * 64 + "\nx y"}, "not a SHA-256"),
        ({"alice": "a" * 64, "bob": "a" * 64}, "the same key as client alice"),
    ],
)
def test_map_files_refuse_bad_digests(digests: dict[str, str], message: str) -> None:
    config = node_config({"chat": ("chat", 18101)}, {"alice": {}, "bob": {}})
    with pytest.raises(ConfigError, match=re.escape(message)) as exc:
        map_files(config, digests)
    assert "a" * 64 not in str(exc.value)


def _hostile_service(config: NodeConfig, **update: Any) -> NodeConfig:
    svc = config.inference.services["chat"]
    model = svc.model.model_copy(update=update.pop("model", {}))
    services = {"chat": svc.model_copy(update={"model": model, **update})}
    inference = config.inference.model_copy(update={"services": services})
    return config.model_copy(update={"inference": inference})


@pytest.mark.parametrize(
    "update",
    [
        {"model": {"served_name": "chat be_other"}},
        {"model": {"served_name": "chat\nevil be_x"}},
        {"model": {"served_name": "#chat"}},
        {"model": {"served_name": "-m"}},
    ],
)
def test_hostile_served_names_are_refused_in_maps(update: dict[str, Any]) -> None:
    config = _hostile_service(node_config({"chat": ("chat", 18101)}, {"alice": {}}), **update)
    render_config(config)  # the served name is in the maps only
    with pytest.raises(ConfigError, match="models.map"):
        map_files(config, {"alice": "a" * 64})


@pytest.mark.parametrize("listen", ["127.0.0.1 ssl crt /x", "localhost", "127.0.0.1:1"])
def test_hostile_listen_addresses_are_refused(listen: str) -> None:
    config = _hostile_service(node_config({"chat": ("chat", 18101)}, {"alice": {}}), listen=listen)
    with pytest.raises(ConfigError, match="inference.services.chat.listen"):
        render_config(config)


@pytest.mark.parametrize(
    "paths",
    [
        Paths("/etc/haproxy/my maps", "/c.pem", None, None, None, "/ca.pem"),
        Paths("/m", "/c.pem\n    stats socket /tmp/x level admin", None, None, None, "/ca.pem"),
        Paths("/m", "/c.pem", "haproxy#", None, None, "/ca.pem"),
        Paths("/m", "/c.pem", None, "relative/dir", None, "/ca.pem"),
        Paths("/m", "/c.pem", None, None, "unix@/tmp/x", "/ca.pem"),
        Paths("/m,x)", "/c.pem", None, None, None, "/ca.pem"),
        Paths("/m/../etc", "/c.pem", None, None, None, "/ca.pem"),
    ],
)
def test_hostile_paths_are_refused(paths: Paths) -> None:
    config = node_config({"chat": ("chat", 18101)}, {"alice": {}})
    with pytest.raises(ConfigError):
        render_config(config, paths)


@pytest.mark.parametrize(
    "client_ca", ["/ca.pem verify none", "relative.pem", "/tls/../ca.pem", "/ca.pem\n    bind :1"]
)
def test_a_hostile_client_ca_path_is_refused_when_used(client_ca: str) -> None:
    paths = Paths("/m", "/c.pem", None, None, None, client_ca)
    plain = node_config({"chat": ("chat", 18101)}, {"alice": {}})
    assert client_ca not in render_config(plain, paths)  # not named: never read
    mtls = node_config({"chat": ("chat", 18101)}, {"alice": {"mtls": True}})
    with pytest.raises(ConfigError, match="the client CA file"):
        render_config(mtls, paths)


def test_hostile_client_names_are_refused_in_maps() -> None:
    config = node_config({"chat": ("chat", 18101)}, {"alice": {}})
    gateway = config.gateway.model_copy(
        update={"clients": {"alice x": config.gateway.clients["alice"]}}
    )
    hostile = config.model_copy(update={"gateway": gateway})
    with pytest.raises(ConfigError, match="alice x"):
        map_files(hostile, {"alice x": "a" * 64})


def test_no_fronted_service_is_refused() -> None:
    config = NodeConfig.model_validate({"distro": "debian12", "gateway": {"enabled": True}})
    with pytest.raises(ConfigError, match="no inference service"):
        render_config(config)


# --- a gateway in front of other nodes (gateway.upstreams) ----------------------------------


def test_nodes_serving_one_model_share_its_requests_and_cover_for_each_other(
    tmp_path: Path, cert: Cert
) -> None:
    """One model served on this node and on an upstream (gpunode.gateway.link's result,
    given here as the upstream server on another loopback port): one HAProxy backend with
    both servers; requests reach both; with the local server down they all reach the
    upstream, and /health stays 200 while one of them is up."""
    local, remote = Backend("local"), Backend("remote")
    config = node_config(
        {"chat": ("chat", local.port)},
        {"alice": {"rate": 1000, "burst": 1000}},
        listen="127.0.0.1",
        port=free_port(),
        metrics_port=free_port(),
    ).linked((RemoteServer("gpu-02", "chat", "127.0.0.1", remote.port, "chat", "llamacpp"),), {})
    text = render_config(config, NODE)
    assert re.search(r"(?m)^backend be_chat\n(    .*\n)*    server chat 127\.0\.0\.1:", text)
    assert f"    server gpu-02-chat 127.0.0.1:{remote.port} check" in text
    assert text.count("\nbackend be_") == 1
    keys = {"alice": secrets.token_urlsafe(32)}
    gw = Gateway(tmp_path, config, keys, cert).start()
    try:
        deadline = time.monotonic() + 15
        while not (local.seen and remote.seen):
            assert time.monotonic() < deadline, "the requests did not reach both nodes"
            status = gw.request("POST", "/v1/chat/completions", chat(), key=keys["alice"])[0]
            assert status == 200
        local.stop()
        before = len(remote.seen)
        deadline = time.monotonic() + 15
        while True:  # until HAProxy's checks take the local server out
            status = gw.request("POST", "/v1/chat/completions", chat(), key=keys["alice"])[0]
            if status == 200 and len(remote.seen) > before:
                before = len(remote.seen)
                if all(
                    gw.request("POST", "/v1/chat/completions", chat(), key=keys["alice"])[0] == 200
                    for _ in range(10)
                ):
                    break
            assert time.monotonic() < deadline, "the upstream did not take over"
            time.sleep(0.25)
        assert len(remote.seen) == before + 10
        assert gw.request("GET", "/health")[0] == 200
    finally:
        gw.stop()
        remote.stop()


def test_two_upstreams_with_the_same_service_name_get_their_own_backends() -> None:
    """gpu-02 and gpu-03 both call their service ``chat`` but serve different models: two
    backends, the second named apart, and the model map sends each model to its own."""
    config = node_config({}, {"alice": {}}).linked(
        (
            RemoteServer("gpu-02", "chat", "192.0.2.12", 8000, "llama", "llamacpp"),
            RemoteServer("gpu-03", "chat", "192.0.2.13", 8000, "mistral", "llamacpp"),
        ),
        {},
    )
    text = render_config(config, NODE)
    assert "backend be_chat\n" in text and "backend be_chat_2\n" in text
    assert "server gpu-02-chat 192.0.2.12:8000" in text
    assert "server gpu-03-chat 192.0.2.13:8000" in text
    models = map_files(config, {"alice": "a" * 64}, NODE)[f"{NODE.config_dir}/models.map"]
    assert "llama be_chat\n" in models and "mistral be_chat_2\n" in models
