"""``gpunode rotate INV gateway.clients.<client>`` (gpunode/commands/rotate.py): a gateway
client's key rolled out host by host, health-gated, rolled back on failure, never shown.

What is real: OpenBao (harness.start_bao) with KV v2, an AppRole with the rotation's policy
and a PKI mount; the gateway role, planned and executed through gpunode.commands.run with
deploys/rotate_gateway.py; Debian's HAProxy serving the map files and the certificate the
deploy uploaded; ``curl`` and ``openssl s_client`` for ``/health``; ``grep`` for the digest;
the controller's TLS request, verified against the PKI's CA.

What is not: the node. Its connector is pyinfra's ``@fake`` one (harness's
RecordingFakeConnector, which records every command and upload), and :class:`Node` plays the
node: an uploaded file lands in its "disk" directory, ``systemctl start|reload
haproxy.service`` puts the disk's files in front of the real HAProxy (a *stuck* node does
not: it keeps serving the old files), and the health commands run for real with ``sh``, the
node path of the keys map replaced by the disk's.
"""

from __future__ import annotations

import http.client
import ipaddress
import os
import re
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import certifi
import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from harness import (
    Bao,
    Handler,
    RecordingFakeConnector,
    Replay,
    Response,
    Server,
    _ca,
    _free_port,
    _leaf,
    _serve,
    fail_op,
    fake_clock,
    run_sh,
    start_bao,
    stop_bao,
)
from pyinfra.api.exceptions import ConnectError
from test_haproxy import HAPROXY, Backend, make_cert, need  # the real HAProxy tests' helpers

from gpunode.clients.pki import Issuer, controller_policy, setup_pki
from gpunode.clients.vault import Session, VaultError, close_all
from gpunode.commands import rotate as rot
from gpunode.commands import run
from gpunode.commands.cli import build_parser
from gpunode.config import load
from gpunode.gateway import KEYS_MAP, key_digest
from gpunode.haproxy import NODE, map_files, render_config
from gpunode.paths import REPO_ROOT
from gpunode.schema.node import Host, NodeConfig, host_data
from gpunode.schema.vault import Vault

ROLE = "gpunode-rotate"
POLICY = (
    'path "secret/data/gpunode/*" { capabilities = ["create", "read", "update"] }\n'
    'path "secret/metadata/gpunode/*" { capabilities = ["read"] }\n'
    'path "secret/destroy/gpunode/*" { capabilities = ["update"] }\n' + controller_policy()
)
UNREACHABLE_VAULT = {"addr": "http://127.0.0.1:1", "role_id": "r", "retries": 0}


@pytest.fixture(scope="module")
def bao(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bao]:
    server = start_bao(tmp_path_factory.mktemp("bao"))
    server.add_approle(ROLE, POLICY)
    setup_pki(server.client())
    yield server
    stop_bao(server)


@pytest.fixture
def login(bao: Bao, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A fresh secret_id in $VAULT_SECRET_ID (the rotation's and the role's login)."""
    monkeypatch.setenv("VAULT_SECRET_ID", bao.secret_id(ROLE))
    close_all()
    yield
    close_all()


@pytest.fixture(autouse=True)
def _short_health_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    """A healthy gateway here passes its checks at once: a failing one gives up after 10 s,
    not the minute a real node gets."""
    monkeypatch.setattr(rot, "GATEWAY_HEALTH_TIMEOUT", 10.0)


@pytest.fixture(scope="module")
def backend() -> Iterator[Backend]:
    be = Backend("chat")
    yield be
    be.stop()


def tag_of(tmp_path: Path) -> str:
    """A Vault-path-safe tag unique to a test (its temporary directory's name)."""
    return tmp_path.name[-20:].replace("_", "-").strip("-").lower()


def put_keys(bao: Bao, tag: str) -> dict[str, str]:
    """Fresh keys for alice and bob under gpunode/clients/<tag>-<client> (each test its own);
    alice's secret holds another key, which a rotation keeps."""
    keys = {name: f"{name}-{tag}-" + os.urandom(12).hex() for name in ("alice", "bob")}
    kv = bao.client().secrets.kv.v2
    kv.create_or_update_secret(
        f"gpunode/clients/{tag}-alice", {"api_key": keys["alice"], "note": "kept"}
    )
    kv.create_or_update_secret(f"gpunode/clients/{tag}-bob", {"api_key": keys["bob"]})
    return keys


def inventory(
    vault: dict[str, Any],
    tag: str = "t",
    gateway_port: int = 18443,
    service_port: int = 18080,
    hosts: dict[str, dict[str, Any]] | None = None,
) -> list[Host]:
    """Hosts whose gateway (on 127.0.0.1) fronts one llama.cpp service and has the clients
    alice and bob; ``hosts``: name -> {"ssh_port": ..., "address": ..., "user": ..., "data":
    {...}}."""
    clients = {
        name: {"key": {"path": f"gpunode/clients/{tag}-{name}"}, "rate": 1000}
        for name in ("alice", "bob")
    }
    hosts = hosts or {"gpu-01": {}}
    doc = {
        "defaults": {
            "distro": "debian12",
            "firewall": {"enabled": False},
            "vault": vault,
            "inference": {
                "runtimes": {"llamacpp": {"method": "package", "package": "llama", "version": "1"}},
                "services": {
                    "chat": {
                        "runtime": "llamacpp",
                        "port": service_port,
                        "model": {"uri": "file:///models/m.gguf", "sha256": "a" * 64},
                    }
                },
            },
            "gateway": {
                "enabled": True,
                "listen": "127.0.0.1",
                "port": gateway_port,
                "clients": clients,
            },
        },
        "hosts": {
            name: {
                "connection": {
                    "address": h.get("address", "127.0.0.1"),
                    "port": h.get("ssh_port", 22 + i),
                    "user": h.get("user", "root"),
                },
                "data": h.get("data", {}),
            }
            for i, (name, h) in enumerate(hosts.items())
        },
    }
    return list(load(doc, "inv.yml").hosts.values())


def client(name: str, tag: str = "t", **settings: Any) -> dict[str, Any]:
    """A client entry for a host's own data (each layer must be whole: its key too)."""
    return {"key": {"path": f"gpunode/clients/{tag}-{name}"}, **settings}


def vault_of(bao: Bao) -> dict[str, Any]:
    return {"addr": bao.addr, "role_id": bao.role_id, "retries": 0}


# --- the CLI -------------------------------------------------------------------------------------


def test_the_cli_takes_a_client_key_name() -> None:
    args = build_parser().parse_args(
        ["rotate", "inv.py", "gateway.clients.alice", "--generate", "--batch", "2"]
        + ["--no-rollback", "--destroy-old"]
    )
    assert (args.secret, args.generate, args.batch, args.rollback, args.destroy_old) == (
        "gateway.clients.alice",
        True,
        2,
        False,
        True,
    )
    assert (
        build_parser().parse_args(["rotate", "i", "gateway.clients.a", "--generate"]).rollback
        is None
    )


def test_the_cli_refuses_an_unknown_client_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "fleet.yml").write_text(
        "defaults:\n  distro: debian12\n  firewall: {enabled: false}\n"
        "  vault: {addr: 'http://127.0.0.1:1', role_id: r}\n"
        "hosts:\n  gpu-01:\n    connection: {address: 192.0.2.1}\n"
    )
    (tmp_path / "fleet.py").write_text(
        "from gpunode.inventory import from_yaml\n_gpunode = from_yaml(__file__)\n"
        "globals().update(_gpunode.pyinfra_groups())\n"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "gpunode.commands.cli", "rotate", "fleet.py"]
        + ["gateway.clients.alice", "--generate"],
        cwd=tmp_path,
        env={"PATH": os.environ["PATH"], "PYTHONPATH": str(REPO_ROOT), "HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 1
    assert proc.stdout == (
        "gpunode rotate: gateway.clients.alice: no host's gateway has this client "
        "(allowed: none: no gateway has a client)\n"
    ), proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr


# --- which hosts, and what is refused before Vault or a host is touched -------------------------


def test_the_hosts_are_those_whose_gateway_has_the_client_not_revoked() -> None:
    hosts = inventory(
        UNREACHABLE_VAULT,
        hosts={
            "gpu-01": {},
            "gpu-02": {"data": {"gateway": {"clients": {"bob": client("bob", revoked=True)}}}},
            "gpu-03": {"data": {"gateway": {"enabled": False}}},
        },
    )
    using, key = rot.client_hosts(hosts, "alice")
    assert [h.name for h in using] == ["gpu-01", "gpu-02"]
    assert key.where() == "secret/gpunode/clients/t-alice#api_key"
    assert [h.name for h in rot.client_hosts(hosts, "bob")[0]] == ["gpu-01"]


@pytest.mark.parametrize(
    ("name", "data", "message"),
    [
        (
            "gateway.clients.zed",
            {},
            "gateway.clients.zed: no host's gateway has this client (allowed: "
            "gateway.clients.alice, gateway.clients.bob)",
        ),
        (
            "gateway.clients.bob",
            {"gateway": {"clients": {"bob": client("bob", revoked=True)}}},
            "gateway.clients.bob: revoked on every host that has it (gpu-01, gpu-02): a revoked "
            "key is not rolled out (allowed: a client that is not revoked)",
        ),
        (
            "gateway.clients.alice",
            {"gateway": {"enabled": False}},
            "gateway.clients.alice: no host's gateway has this client (allowed: none: no "
            "gateway has a client)",
        ),
        (
            "gateway.clients.alice",
            {"gpu-02": {"gateway": {"clients": {"alice": {"key": {"path": "gpunode/other"}}}}}},
            "gateway.clients.alice: host gpu-02 reads secret/gpunode/other#api_key, host gpu-01 "
            "reads secret/gpunode/clients/t-alice#api_key (allowed: one Vault source per client "
            "to rotate)",
        ),
        (
            "gateway.clients.alice",
            {
                "gpu-02": {
                    "gateway": {
                        "clients": {
                            "alice": {"key": {"path": "gpunode/clients/t-alice", "key": "other"}}
                        }
                    }
                }
            },
            "host gpu-02 reads secret/gpunode/clients/t-alice#other, host gpu-01 reads "
            "secret/gpunode/clients/t-alice#api_key",
        ),
        (
            "gateway.clients.alice",
            {"gpu-02": {"vault": {"timeout": 3}}},
            "gateway.clients.alice: host gpu-02 has other vault settings than gpu-01",
        ),
        ("nope", {}, "secret nope: no host declares it (allowed: none)"),  # secrets: as before
    ],
)
def test_refused_before_anything_is_touched(name: str, data: dict[str, Any], message: str) -> None:
    per_host = data if "gpu-02" in data else {"gpu-01": data, "gpu-02": data}
    hosts = inventory(
        UNREACHABLE_VAULT, hosts={n: {"data": per_host.get(n, {})} for n in ("gpu-01", "gpu-02")}
    )
    said: list[str] = []
    with pytest.raises(rot.RotateError) as err:
        rot.rotate(hosts, name, "a-good-new-key-" + "k" * 30, say=said.append)
    assert message in str(err.value)
    assert said == []  # nothing was written (Vault is unreachable: it was never asked)


@pytest.mark.parametrize(
    "value", ["", "two words", "one\nline", "tab\there", "caf\u00e9-key", "\x00"]
)
def test_a_key_that_is_not_one_printable_word_is_refused_unseen(value: str) -> None:
    with pytest.raises(rot.RotateError) as err:
        rot.rotate(inventory(UNREACHABLE_VAULT), "gateway.clients.alice", value, say=print)
    message = str(err.value)
    assert message == (
        "gateway.clients.alice: the new key must be one word of printable ASCII, without "
        "spaces or control characters (allowed: e.g. what --generate makes)"
    )
    assert not value or (value not in message and repr(value)[1:-1] not in message)


def test_the_deploy_file_refuses_an_unknown_client_or_a_bad_version(
    bao: Bao, login: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    put_keys(bao, "deploy")
    hosts = inventory(vault_of(bao), "deploy")
    fake_connectors(monkeypatch, None)
    for data, says in (
        (
            {"gpunode_gateway_client": "zed", "gpunode_gateway_client_version": 1},
            "host gpu-01: gpunode_gateway_client: 'zed' is not an active client of this gateway "
            "(allowed: alice, bob)",
        ),
        (
            {"gpunode_gateway_client_version": 1},
            "gpunode_gateway_client_version: set without gpunode_gateway_client",
        ),
        (
            {"gpunode_gateway_client": "alice", "gpunode_gateway_client_version": "1; x"},
            "gpunode_gateway_client_version: not a version number",
        ),
    ):
        inv = run.inventory_from((h.name, host_data(h)) for h in hosts)
        with run.prepare(inv, rot.GATEWAY_DEPLOY, data=data, detect_changes=False) as planned:
            error = planned.results()["gpu-01"].error or ""
        assert error.startswith("planning failed: ") and says in error, error


# --- the node: a fake connector in front of a real HAProxy ---------------------------------------


class Node:
    """What the fake hosts' commands reach: see the module docstring. One HAProxy for every
    host of the inventory (they share 127.0.0.1 and the gateway port)."""

    def __init__(self, tmp: Path, config: NodeConfig) -> None:
        self.disk = tmp / "disk"
        self.served = tmp / "served"
        for d in (self.disk, self.served):
            d.mkdir()
        self.config = config
        self.paths = replace(
            NODE,
            config_dir=str(self.served),
            cert_file=str(self.served / "gateway.pem"),
            user=None,
            chroot=None,
            stats_socket=None,
            **(
                {"client_ca_file": str(self.served / "client-ca.pem")}
                if "client_ca_file" in {f.name for f in fields(NODE)}
                else {}
            ),
        )
        self.cfg = tmp / "haproxy.cfg"
        self.cfg.write_text(render_config(config, self.paths))
        self.log = tmp / "haproxy.log"
        self.stuck = False  # a reload that keeps serving the old files
        self.proc: subprocess.Popen[bytes] | None = None

    # the node's own files, before the rotation
    def start(self, keys: dict[str, str], bundle: bytes) -> None:
        digests = {name: key_digest(key) for name, key in keys.items()}
        for path, text in map_files(self.config, digests, self.paths).items():
            (self.disk / Path(path).name).write_text(text)
        (self.disk / "gateway.pem").write_bytes(bundle)
        self.reload()

    def reload(self) -> None:
        for f in self.disk.iterdir():
            shutil.copy(f, self.served / f.name)
        self.stop()
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [need("haproxy", HAPROXY), "-db", "-f", str(self.cfg)],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 10
        while True:
            assert self.proc.poll() is None, self.log.read_text()
            try:
                socket.create_connection(("127.0.0.1", self.config.gateway.port), 1).close()
                return
            except OSError:
                assert time.monotonic() < deadline, self.log.read_text()
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)

    def land(self, uploads: list[tuple[str, str]]) -> None:
        """The deploy's uploads on the node's disk: the map files and the certificate."""
        for _, text in uploads:
            m = re.match(r"# (\S+\.map): written by gpunode", text)
            if m:
                (self.disk / m[1]).write_text(text)
            elif "BEGIN CERTIFICATE" in text and "PRIVATE KEY-----" in text:
                (self.disk / "gateway.pem").write_text(text)

    def handler(self, connector: RecordingFakeConnector) -> Handler:
        def handle(command: str) -> Response | None:
            if re.fullmatch(r"systemctl (start|reload|restart) haproxy\.service", command):
                self.land(connector.uploads)
                if not self.stuck:
                    self.reload()
                return ""
            if command == "systemctl is-active --quiet haproxy.service":
                return {"success": self.proc is not None and self.proc.poll() is None}
            if command.startswith("if command -v curl "):  # /health
                return run_sh(command)
            if command.startswith("grep -qxF -- "):
                self.land(connector.uploads)
                return run_sh(command.replace(KEYS_MAP, str(self.disk / "keys.map")))
            return None

        return handle


def fake_connectors(
    monkeypatch: pytest.MonkeyPatch, node: Node | None
) -> list[RecordingFakeConnector]:
    """Every host the rotation connects to is a fake one answered by ``node``; the list fills
    with their connectors (one per host per deploy)."""
    made: list[RecordingFakeConnector] = []

    class Connector(RecordingFakeConnector):
        def __init__(self, state: Any, host: Any) -> None:
            super().__init__(state, host)
            self.handlers = [fail_op, *([node.handler(self)] if node else [])]
            self.sudo: list[tuple[str, bool]] = []  # (command, whether it ran with sudo)
            made.append(self)

        def run_shell_command(self, command: Any, *args: Any, **arguments: Any) -> Any:
            self.sudo.append((str(command), bool(arguments.get("_sudo"))))
            return super().run_shell_command(command, *args, **arguments)

    real = run.inventory_from

    def inventory_from(hosts: Any) -> Any:
        inv = real((n, {**d, "fake_delay": 0, "fake_delay_jitter": 0}) for n, d in hosts)
        for h in inv:
            h.connector_cls = Connector
        return inv

    monkeypatch.setattr(run, "inventory_from", inventory_from)
    return made


def issue(bao: Bao, names: tuple[str, ...] = ("gpu-01",)) -> bytes:
    session = Session(
        Vault(addr=bao.addr, role_id=bao.role_id), {"VAULT_SECRET_ID": bao.secret_id(ROLE)}
    )
    try:
        return (
            Issuer(session, "pki", "gpunode-gateway")
            .issue(list(names), ["127.0.0.1"], 3600)
            .bundle()
        )
    finally:
        session.close()


def ask(port: int, ca: str, key: str) -> int:
    """GET /v1/models from here with ``key``, TLS verified against ``ca``."""
    conn = http.client.HTTPSConnection(
        "127.0.0.1", port, context=ssl.create_default_context(cadata=ca), timeout=10
    )
    try:
        conn.request("GET", "/v1/models", headers={"Authorization": f"Bearer {key}"})
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


def pki_ca(bao: Bao) -> str:
    return str(bao.client().read("pki/cert/ca")["data"]["certificate"])


@pytest.fixture
def gateway(
    bao: Bao, login: None, backend: Backend, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[Node, list[Host], dict[str, str], list[RecordingFakeConnector]]]:
    """Two hosts (gpu-01, gpu-02) behind one real HAProxy that serves their current keys."""
    need("haproxy", HAPROXY)
    tag = tag_of(tmp_path)
    keys = put_keys(bao, tag)
    hosts = inventory(
        vault_of(bao),
        tag,
        gateway_port=_free_port(),
        service_port=backend.port,
        hosts={"gpu-01": {"ssh_port": 22}, "gpu-02": {"ssh_port": 2222, "user": "deploy"}},
    )
    node = Node(tmp_path, hosts[0].config)
    node.start(keys, issue(bao))
    made = fake_connectors(monkeypatch, node)
    yield node, hosts, keys, made
    node.stop()


def everything_seen(
    made: list[RecordingFakeConnector], said: list[str], capsys: Any, caplog: Any
) -> str:
    out = capsys.readouterr()
    parts = [out.out, out.err, caplog.text, *said]
    for c in made:
        parts += [str(x) for x in c.executed_commands]
        parts += [text for _, text in c.uploads]
    return "\n".join(parts)


# --- rotations ------------------------------------------------------------------------------------


def test_a_client_key_is_rolled_out_host_by_host_and_never_shown(
    bao: Bao, gateway: Any, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    node, hosts, keys, made = gateway
    port, ca = node.config.gateway.port, pki_ca(bao)
    assert ask(port, ca, keys["alice"]) == 200  # the old key works before
    path = hosts[0].config.gateway.clients["alice"].key.path
    kv = bao.client().secrets.kv.v2
    old = kv.read_secret_metadata(path)["data"]["current_version"]
    new_key = rot.generate_value()
    said: list[str] = []
    rotation = rot.rotate(
        hosts, "gateway.clients.alice", new_key, destroy_old=True, say=said.append
    )

    assert rotation.ok, said
    assert (rotation.old_version, rotation.new_version) == (old, old + 1)
    data = kv.read_secret_version(path, raise_on_deleted_version=True)["data"]["data"]
    assert data == {"api_key": new_key, "note": "kept"}  # check-and-set write, other key kept
    assert kv.read_secret_metadata(path)["data"]["versions"][str(old)]["destroyed"] is True
    assert said[0] == (
        f"gateway.clients.alice: wrote version {old + 1} of secret/{path}#api_key "
        f"(check-and-set on {old})"
    )
    assert [line.split(":")[0] for line in said[1:3]] == ["gpu-01", "gpu-02"]  # host by host
    for line in said[1:3]:
        assert (
            f": version {old + 1}: healthy: haproxy.service active, /health 200 over TLS on the "
            "node, the key's SHA-256 in /etc/haproxy/gpunode/keys.map; GET /v1/models"
        ) in line
        assert f"GET /v1/models with key version {old + 1} from the controller: 200 (TLS " in line
    assert said[3:] == [
        f"gateway.clients.alice: destroyed version {old}",
        f"gateway.clients.alice: version {old + 1} is on 2 host(s), all healthy",
    ]
    # what a client sees: the new key passes, the old one is refused, bob is untouched
    assert ask(port, ca, new_key) == 200
    assert ask(port, ca, keys["alice"]) == 401
    assert ask(port, ca, keys["bob"]) == 200
    # one deploy per host, each checked on the node by digest: the node never saw a key
    assert len(made) == 2
    digest_check = f"grep -qxF -- '{key_digest(new_key)} alice' /etc/haproxy/gpunode/keys.map"
    for connector in made:
        assert digest_check in [str(c) for c in connector.executed_commands]
    # the keys map is 0640 root:haproxy: read with sudo when the SSH user is not root
    for connector, sudo in zip(made, (False, True), strict=True):
        checks = [s for c, s in connector.sudo if c == digest_check]
        assert checks and set(checks) == {sudo}, connector.host.name
    seen = everything_seen(made, said, capsys, caplog) + repr(rotation)
    assert key_digest(new_key) in seen  # the search below looks where the digest is
    assert new_key not in seen and keys["alice"] not in seen and keys["bob"] not in seen


@pytest.mark.parametrize("rollback", [True, False])
def test_a_host_that_keeps_the_old_key_fails_and_is_put_back(
    bao: Bao,
    gateway: Any,
    rollback: bool,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """gpu-01 writes the new map but HAProxy keeps serving the old one: the digest is on
    disk, the controller's request with the new key gets 401. The host fails, goes back to
    the old version (unless --no-rollback), and gpu-02 is never touched."""
    node, hosts, keys, made = gateway
    node.stuck = True
    monkeypatch.setattr(rot, "GATEWAY_HEALTH_TIMEOUT", 1.0)
    path = hosts[0].config.gateway.clients["alice"].key.path
    old = bao.client().secrets.kv.v2.read_secret_metadata(path)["data"]["current_version"]
    new_key = rot.generate_value()
    said: list[str] = []
    rotation = rot.rotate(
        hosts,
        "gateway.clients.alice",
        new_key,
        rollback=rollback,
        destroy_old=True,
        say=said.append,
    )

    assert not rotation.ok
    assert [(r.host, r.ok) for r in rotation.results] == [("gpu-01", False)]
    assert said[1] == (
        f"gpu-01: version {old + 1}: FAILED: health check GET /v1/models with key version "
        f"{old + 1} from the controller: 401 failing after 1 s"
    )
    if rollback:
        assert said[2].startswith(f"gpu-01: rolled back to version {old}: healthy: ")
        assert rotation.results[0].rolled_back_to == old
        assert len(made) == 2  # the rotation's deploy and the rollback's, both on gpu-01
    else:
        assert not any("rolled back" in line for line in said)
        assert len(made) == 1
    assert said[-1] == (
        f"gateway.clients.alice: rotation stopped at gpu-01; not touched: gpu-02; Vault's latest "
        f"version is {old + 1} (the next deploy rolls it out: fix the gateway, or write the old "
        "value back)"
    )
    assert all(c.host.name == "gpu-01" for c in made)
    meta = bao.client().secrets.kv.v2.read_secret_metadata(path)["data"]
    assert meta["current_version"] == old + 1 and not meta["versions"][str(old)]["destroyed"]
    assert ask(node.config.gateway.port, pki_ca(bao), keys["alice"]) == 200  # still served
    seen = everything_seen(made, said, capsys, caplog) + repr(rotation)
    assert new_key not in seen and keys["alice"] not in seen


def test_a_key_another_client_has_is_refused_before_anything_is_written(
    bao: Bao, login: None
) -> None:
    keys = put_keys(bao, "shared")
    hosts = inventory(vault_of(bao), "shared")
    path = "gpunode/clients/shared-alice"
    old = bao.client().secrets.kv.v2.read_secret_metadata(path)["data"]["current_version"]
    with pytest.raises(rot.RotateError) as err:
        rot.rotate(hosts, "gateway.clients.alice", keys["bob"], say=print)
    assert str(err.value) == (
        "gateway.clients.alice: the new key is the key of client bob on host gpu-01 (allowed: "
        "a key no other client has; --generate makes one)"
    )
    assert bao.client().secrets.kv.v2.read_secret_metadata(path)["data"]["current_version"] == old


def test_a_gateway_that_is_down_fails_its_first_check(
    bao: Bao, gateway: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """HAProxy is not running (and a reload does not start it): the check that fails is
    named, the first one, and the host is not healthy."""
    node, hosts, _, _ = gateway
    node.stuck = True
    node.stop()
    monkeypatch.setattr(rot, "GATEWAY_HEALTH_TIMEOUT", 1.0)
    said: list[str] = []
    rotation = rot.rotate(
        hosts, "gateway.clients.alice", rot.generate_value(), rollback=False, say=said.append
    )
    assert not rotation.ok
    new = rotation.new_version
    assert (
        said[1]
        == f"gpu-01: version {new}: FAILED: health check haproxy.service active failing after 1 s"
    )


def test_a_key_any_other_client_has_is_refused(bao: Bao, login: None) -> None:
    """Each other client's key is compared, not only the first one's."""
    keys = put_keys(bao, "shared3")
    carol = "carol-" + os.urandom(12).hex()
    bao.client().secrets.kv.v2.create_or_update_secret(
        "gpunode/clients/shared3-carol", {"api_key": carol}
    )
    carols = {"gateway": {"clients": {"carol": client("carol", "shared3")}}}
    hosts = inventory(vault_of(bao), "shared3", hosts={"gpu-01": {"data": carols}})
    with pytest.raises(rot.RotateError) as err:
        rot.rotate(hosts, "gateway.clients.alice", carol, say=print)
    assert str(err.value).startswith(
        "gateway.clients.alice: the new key is the key of client carol on host gpu-01 "
    )
    assert keys["bob"] != carol


def test_a_vault_error_names_the_clients_key(bao: Bao, login: None) -> None:
    """A key outside the rotation's policy: Vault's refusal names the key as the gateway role
    does (gateway.clients.<client>.key) and its source; nothing is written."""
    put_keys(bao, "denied")
    outside = {"key": {"path": "elsewhere/denied-alice"}}
    hosts = inventory(
        vault_of(bao),
        "denied",
        hosts={"gpu-01": {"data": {"gateway": {"clients": {"alice": outside}}}}},
    )
    with pytest.raises(VaultError) as err:
        rot.rotate(hosts, "gateway.clients.alice", rot.generate_value(), say=print)
    assert str(err.value).startswith(
        "secret gateway.clients.alice.key (secret/elsewhere/denied-alice) metadata: permission "
        "denied by Vault"
    )


# --- the checks, one by one, against a real HAProxy -------------------------------------------


def test_the_health_command_with_curl_and_with_openssl_alone(
    bao: Bao, gateway: Any, tmp_path: Path
) -> None:
    """200 while a backend is up: both forms pass; a gateway whose backend is down answers
    503: both fail. The openssl form runs with a PATH that has no curl."""
    node, hosts, keys, _ = gateway
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for tool in ("sh", "openssl", "timeout", "head", "grep"):
        found = shutil.which(tool)
        assert found, tool
        (bindir / tool).symlink_to(found)
    no_curl = {"PATH": str(bindir)}
    command = str(rot.health_command(hosts[0].config))
    port = hosts[0].config.gateway.port
    assert f"curl -fsS -k -o /dev/null --max-time 5 https://127.0.0.1:{port}/health" in command
    assert run_sh(command)["success"]
    assert run_sh(command, env=no_curl)["success"]

    node.stop()  # nothing listens: both fail
    assert not run_sh(command)["success"]
    assert not run_sh(command, env=no_curl)["success"]

    (tmp_path / "down").mkdir()
    down = Node(tmp_path / "down", replace_backend(hosts[0].config, _free_port()))
    down.start(keys, issue(bao))
    try:
        deadline = time.monotonic() + 30
        while run_sh(command)["success"]:  # until HAProxy's first health check marks it down
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert not run_sh(command, env=no_curl)["success"]
    finally:
        down.stop()


def replace_backend(config: NodeConfig, port: int) -> NodeConfig:
    services = {
        name: svc.model_copy(update={"port": port})
        for name, svc in config.inference.services.items()
    }
    inference = config.inference.model_copy(update={"services": services})
    return config.model_copy(update={"inference": inference})


def test_the_controllers_request_verifies_the_pki_ca(bao: Bao, gateway: Any) -> None:
    node, hosts, keys, _ = gateway
    ca = pki_ca(bao)
    assert rot._ask_models(hosts[0], keys["alice"], ca) == 200
    assert rot._ask_models(hosts[0], "not-" + keys["alice"], ca) == 401
    stranger = make_cert(node.disk.parent)  # a self-signed CA that signed nothing here
    result = rot._ask_models(hosts[0], keys["alice"], Path(stranger.ca).read_text())
    assert isinstance(result, str) and result.startswith("TLS verification failed ("), result
    assert keys["alice"] not in result


def test_the_controller_verifies_the_name_it_reaches_the_host_by(bao: Bao, gateway: Any) -> None:
    """A host reached by a DNS name: the controller's request checks the certificate for that
    name (which the gateway role puts in the certificate), not for the host's name."""
    node, _, keys, _ = gateway
    (by_name,) = inventory(
        vault_of(bao),
        gateway_port=node.config.gateway.port,
        hosts={"gpu-01": {"address": "localhost"}},
    )
    failed = rot._ask_models(by_name, keys["alice"], pki_ca(bao))  # a certificate for gpu-01
    assert isinstance(failed, str), failed
    assert failed.startswith("TLS verification failed (") and "server name localhost" in failed
    node.start(keys, issue(bao, names=("localhost",)))  # now one for localhost alone
    assert rot._ask_models(by_name, keys["alice"], pki_ca(bao)) == 200


def test_the_controller_says_why_it_does_not_ask() -> None:
    port = _free_port()  # nothing listens there
    hosts = inventory(
        UNREACHABLE_VAULT,
        gateway_port=port,
        hosts={
            "gpu-01": {},
            "gpu-02": {"data": {"gateway": {"routes": ["/v1/chat/completions"]}}},
            "gpu-03": {"data": {"gateway": {"clients": {"alice": client("alice", mtls=True)}}}},
        },
    )
    assert rot._why_not_asked(hosts[0], "alice") == (
        f"the controller cannot reach 127.0.0.1:{port} within 2 s"
    )
    assert rot._why_not_asked(hosts[1], "alice") == "/v1/models is not in gateway.routes"
    (v6,) = inventory(UNREACHABLE_VAULT, gateway_port=port, hosts={"gpu-04": {"address": "::1"}})
    assert rot._why_not_asked(v6, "alice") == (
        f"the controller cannot reach [::1]:{port} within 2 s"
    )
    assert rot._why_not_asked(hosts[2], "alice") == (
        "client alice needs a client certificate (mtls), the controller has none"
    )
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", port))
        listener.listen()
        assert rot._why_not_asked(hosts[0], "alice") == ""


@pytest.mark.parametrize(
    ("listen", "host", "hostport"),
    [
        ("0.0.0.0", "127.0.0.1", "127.0.0.1:18443"),  # noqa: S104 - a wildcard listener
        ("::", "127.0.0.1", "127.0.0.1:18443"),  # v4v6: IPv4 too
        ("10.1.2.3", "10.1.2.3", "10.1.2.3:18443"),
        ("fd00::7", "fd00::7", "[fd00::7]:18443"),
    ],
)
def test_the_health_command_asks_the_gateways_own_listener(
    listen: str, host: str, hostport: str
) -> None:
    """On the node, /health goes to the address the gateway listens on (loopback for a
    wildcard), with that address as the Host header; the openssl form connects there too."""
    (node,) = inventory(
        UNREACHABLE_VAULT, hosts={"gpu-01": {"data": {"gateway": {"listen": listen}}}}
    )
    command = str(rot.health_command(node.config))
    url = shlex.quote(f"https://{hostport}/health")
    assert f"curl -fsS -k -o /dev/null --max-time 5 {url};" in command
    assert f"GET /health HTTP/1.1\\r\\nHost: {host}\\r\\nConnection: close" in command
    assert f"openssl s_client -quiet -connect {shlex.quote(hostport)} 2>/dev/null" in command


def test_the_controller_gives_up_on_a_gateway_that_never_answers() -> None:
    """A port that drops the connection attempt (here: a listener whose queue is full, so
    the kernel ignores the SYN, as a firewall that drops would): the controller waits 2 s,
    not the minutes a TCP connect can take, and says so."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        held = [socket.create_connection(("127.0.0.1", port), timeout=1)]  # fills the queue
        try:
            (node,) = inventory(UNREACHABLE_VAULT, gateway_port=port)
            started = time.monotonic()
            said = rot._why_not_asked(node, "alice")
            took = time.monotonic() - started
        finally:
            for s in held:
                s.close()
    assert said == f"the controller cannot reach 127.0.0.1:{port} within 2 s"
    assert 1.5 < took < 10


def test_a_gateway_without_the_models_route_is_checked_on_the_node_alone(
    bao: Bao, login: None, backend: Backend, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """gateway.routes without /v1/models: the controller cannot ask it with the key (the
    gateway would refuse the route), so the host is judged by the checks on the node, and
    the report says why."""
    need("haproxy", HAPROXY)
    keys = put_keys(bao, "noroute")
    routes = {"gateway": {"routes": ["/v1/chat/completions"]}}
    hosts = inventory(
        vault_of(bao),
        "noroute",
        gateway_port=_free_port(),
        service_port=backend.port,
        hosts={"gpu-01": {"data": routes}},
    )
    node = Node(tmp_path, hosts[0].config)
    node.start(keys, issue(bao))
    try:
        fake_connectors(monkeypatch, node)
        said: list[str] = []
        rotation = rot.rotate(hosts, "gateway.clients.alice", rot.generate_value(), say=said.append)
    finally:
        node.stop()
    assert rotation.ok, said
    assert said[1].startswith(f"gpu-01: version {rotation.new_version}: healthy: haproxy.service")
    assert (
        "; /v1/models is not in gateway.routes: relying on the checks on the node (after "
        in (said[1])
    )


# --- the controller's request, against a TLS server made here -----------------------------


@dataclass
class Gateway:
    """A TLS server answering GET /v1/models with 200; its certificate is signed by an
    intermediate CA (``ca``: that CA alone, as Vault's PKI mount gives an issuing CA)."""

    server: Server
    ca: str


@pytest.fixture
def tls_gateway(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Gateway]:
    sans = request.param
    _, root, root_key = _ca(tmp_path, "root")
    ca_path, issuing, issuing_key = _ca(tmp_path, "issuing", issuer=(root, root_key))
    cert, key = _leaf(
        tmp_path, "gw", issuing, issuing_key, ExtendedKeyUsageOID.SERVER_AUTH, sans=sans
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    for served in _serve(Replay(), context):
        served.replay.add("GET", "/v1/models", (200, {"data": []}))
        yield Gateway(served, ca_path.read_text())


def gateway_host(port: int, address: str = "127.0.0.1", **gateway: Any) -> Host:
    (node,) = inventory(
        UNREACHABLE_VAULT,
        gateway_port=port,
        hosts={"gpu-01": {"address": address, "data": {"gateway": gateway}}},
    )
    return node


NAMES = [x509.DNSName("gw.example")]
IP = [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]


@pytest.mark.parametrize("tls_gateway", [NAMES], indirect=True)
def test_the_controller_checks_the_first_name_when_the_address_is_not_in_the_certificate(
    tls_gateway: Gateway,
) -> None:
    """Reached by 127.0.0.1 with names and IP SANs that do not hold it: the certificate is
    checked for its first name (its CN), the only one a certificate issued for it has."""
    port = int(tls_gateway.server.address.rsplit(":", 1)[1])
    tls = {"names": ["gw.example", "other.example"], "ip_sans": ["10.9.9.9"]}
    node = gateway_host(port, tls=tls)
    assert rot._ask_models(node, "k-1", tls_gateway.ca) == 200
    (asked,) = tls_gateway.server.replay.calls("GET", "/v1/models")
    assert asked.headers["authorization"] == "Bearer k-1"


@pytest.mark.parametrize("tls_gateway", [IP], indirect=True)
def test_the_controller_checks_the_address_a_wildcard_gateway_is_reached_by(
    tls_gateway: Gateway,
) -> None:
    """A gateway listening on 0.0.0.0, reached by 127.0.0.1: the certificate's IP SAN is the
    address (gpunode/gateway.py's certificate_ips), and that is what is checked."""
    port = int(tls_gateway.server.address.rsplit(":", 1)[1])
    node = gateway_host(port, listen="0.0.0.0")  # noqa: S104 - a wildcard listener
    assert rot._ask_models(node, "k-2", tls_gateway.ca) == 200


@pytest.mark.parametrize("tls_gateway", [IP], indirect=True)
def test_the_controller_trusts_an_issuing_ca_that_is_not_a_root(tls_gateway: Gateway) -> None:
    port = int(tls_gateway.server.address.rsplit(":", 1)[1])
    assert rot._ask_models(gateway_host(port), "k-3", tls_gateway.ca) == 200


def test_a_gateway_that_accepts_and_never_answers_times_out(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """TCP accepted (the kernel's queue), no TLS handshake ever: the request gives up after
    REQUEST_TIMEOUT and says so; without a timeout it would wait forever (an alarm at 20 s
    fails the test instead)."""
    monkeypatch.setattr(rot, "REQUEST_TIMEOUT", 0.5)

    def hung(signum: int, frame: Any) -> None:
        raise AssertionError("the controller's request had no timeout")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(20)
    try:
        with socket.socket() as listener:
            listener.bind(("127.0.0.1", 0))
            listener.listen(8)
            node = gateway_host(listener.getsockname()[1])
            assert rot._ask_models(node, "k-4", pki_ca_stranger()) == "no answer (TimeoutError)"
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def pki_ca_stranger() -> str:
    """A CA certificate (any: the handshake never starts)."""
    return Path(certifi.where()).read_text()


class _NodeChecks:
    """A host for _gateway_healthy: its checks on the node fail until ``passes_at`` on the
    fake clock."""

    def __init__(self, clock: list[float], passes_at: float) -> None:
        self.clock, self.passes_at = clock, passes_at
        self.ran: list[float] = []

    def run_shell_command(self, command: Any, **arguments: Any) -> tuple[bool, None]:
        self.ran.append(self.clock[0])
        return self.clock[0] >= self.passes_at, None


@pytest.mark.parametrize(("passes_at", "ok"), [(1001.5, True), (float("inf"), False)])
def test_the_gateway_checks_repeat_until_they_pass_or_time_runs_out(
    monkeypatch: pytest.MonkeyPatch, passes_at: float, ok: bool
) -> None:
    clock = fake_clock(monkeypatch, rot, start=1000.0)  # and GATEWAY_HEALTH_TIMEOUT is 10 s
    (node,) = inventory(
        UNREACHABLE_VAULT,
        hosts={"gpu-01": {"data": {"gateway": {"routes": ["/v1/chat/completions"]}}}},
    )
    host = _NodeChecks(clock, passes_at)
    result = rot._gateway_healthy(host, node, "alice", "k", 3, "")
    checks = (
        f"haproxy.service active, /health 200 over TLS on the node, the key's SHA-256 in {KEYS_MAP}"
    )
    if ok:
        assert result == rot.HostResult(
            "gpu-01",
            3,
            True,
            f"{checks}; /v1/models is not in gateway.routes: relying on the checks on the node "
            "(after 1.5 s)",
        )
        assert host.ran == [1000.0, 1000.5, 1001.0, 1001.5, 1001.5, 1001.5]
    else:
        assert result == rot.HostResult(
            "gpu-01", 3, False, "health check haproxy.service active failing after 10 s"
        )
        assert host.ran == [1000.0 + i / 2 for i in range(22)]  # until 10.5 s > 10 s


# --- client keys on a KV mount of their own ---------------------------------------------------

KVC = "kv-clients"


def on_kvc(
    bao: Bao, tag: str, names: tuple[str, ...] = ("gpu-01",), vault: dict[str, Any] | None = None
) -> tuple[list[Host], dict[str, str]]:
    """Hosts whose clients' keys are on the KV v2 mount ``kv-clients`` (the rotation's role may
    use it), and the keys written there."""
    c = bao.client()
    if f"{KVC}/" not in c.sys.list_mounted_secrets_engines()["data"]:
        c.sys.enable_secrets_engine("kv", path=KVC, options={"version": "2"})
    c.sys.create_or_update_policy(ROLE, POLICY + POLICY.replace("secret/", f"{KVC}/"))
    keys = {name: f"{name}-{tag}-" + os.urandom(12).hex() for name in ("alice", "bob")}
    for name, value in keys.items():
        c.secrets.kv.v2.create_or_update_secret(
            f"gpunode/clients/{tag}-{name}", {"api_key": value}, mount_point=KVC
        )
    clients = {
        name: {"key": {"mount": KVC, "path": f"gpunode/clients/{tag}-{name}"}}
        for name in ("alice", "bob")
    }
    hosts = inventory(
        vault or vault_of(bao),
        tag,
        hosts={name: {"data": {"gateway": {"clients": clients}}} for name in names},
    )
    return hosts, keys


def test_a_key_on_another_mount_is_written_there(
    bao: Bao, login: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The whole rotation against the key's own mount: written there with check-and-set,
    then read back from there for the node (a fake one whose checks all pass)."""
    tag = tag_of(tmp_path)
    hosts, _ = on_kvc(bao, tag)
    fake_connectors(monkeypatch, None)
    said: list[str] = []
    rotation = rot.rotate(
        hosts, "gateway.clients.alice", "new-key-0001", rollback=False, say=said.append
    )
    assert said[0] == (
        f"gateway.clients.alice: wrote version 2 of {KVC}/gpunode/clients/{tag}-alice#api_key "
        "(check-and-set on 1)"
    )
    assert rotation.ok and rotation.new_version == 2, said
    latest = bao.client().secrets.kv.v2.read_secret_version(
        f"gpunode/clients/{tag}-alice", mount_point=KVC, raise_on_deleted_version=True
    )
    assert latest["data"]["data"] == {"api_key": "new-key-0001"}


def test_the_other_clients_keys_are_read_once_each_from_their_mount(
    bao: Bao, login: None, tmp_path: Path
) -> None:
    tag = tag_of(tmp_path)
    hosts, keys = on_kvc(bao, tag, names=("gpu-01", "gpu-02"))
    session = Session(hosts[0].config.vault)
    reads: list[str] = []
    real_read = session.read

    def read(name: str, secret: Any, version: int | None = None) -> Any:
        reads.append(f"{name} {secret.where()}")
        return real_read(name, secret, version)

    session.read = read  # type: ignore[method-assign]
    try:
        with pytest.raises(rot.RotateError) as err:
            rot._refuse_a_shared_key(hosts, "alice", keys["bob"], session)
        assert str(err.value) == (
            "gateway.clients.alice: the new key is the key of client bob on host gpu-01 "
            "(allowed: a key no other client has; --generate makes one)"
        )
        rot._refuse_a_shared_key(hosts, "alice", "a-key-no-one-has", session)
        # bob's key, once per rotation check although both hosts have bob
        assert reads == [f"gateway.clients.bob.key {KVC}/gpunode/clients/{tag}-bob#api_key"] * 2
        bao.client().secrets.kv.v2.delete_metadata_and_all_versions(
            f"gpunode/clients/{tag}-bob", mount_point=KVC
        )
        with pytest.raises(VaultError) as gone:
            rot._refuse_a_shared_key(hosts, "alice", "a-key-no-one-has", session)
        assert str(gone.value) == (
            f"secret gateway.clients.bob.key ({KVC}/gpunode/clients/{tag}-bob#api_key): not "
            "found in Vault"
        )
    finally:
        session.close()


def test_a_gateway_host_that_cannot_be_reached_fails_on_the_new_version(
    bao: Bao, login: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tag = tag_of(tmp_path)
    hosts, _ = on_kvc(bao, tag)
    fake_connectors(monkeypatch, None)

    def refused(self: Any) -> None:
        raise ConnectError("Connection refused")

    monkeypatch.setattr(RecordingFakeConnector, "connect", refused)
    said: list[str] = []
    rotation = rot.rotate(hosts, "gateway.clients.alice", "new-key-0002", say=said.append)
    assert said[1:3] == [
        "gpu-01: version 2: FAILED: cannot connect: Connection refused",
        "gpu-01: rolled back to version 1: STILL FAILING: cannot connect: Connection refused",
    ]
    assert [(r.host, r.version, r.ok) for r in rotation.results] == [("gpu-01", 2, False)]


def test_a_key_version_gone_before_the_deploy_is_named_by_its_client(
    bao: Bao, login: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tag = tag_of(tmp_path)
    hosts, _ = on_kvc(bao, tag)
    fake_connectors(monkeypatch, None)
    path = f"gpunode/clients/{tag}-alice"

    def roll_out(group, deploy_file, data, version, check):  # noqa: ANN001,ANN202
        raise AssertionError("no deploy of a version Vault no longer has")

    kv = bao.client().secrets.kv.v2
    real_write = Session.write

    def write(self: Session, *args: Any, **kwargs: Any) -> int:
        version = real_write(self, *args, **kwargs)
        kv.destroy_secret_versions(path, versions=[version], mount_point=KVC)
        return version

    monkeypatch.setattr(Session, "write", write)
    monkeypatch.setattr(rot, "_roll_out", roll_out)
    said: list[str] = []
    rotation = rot.rotate(hosts, "gateway.clients.alice", "new-key-0003", say=said.append)
    assert not rotation.ok
    assert said[-1].startswith(
        f"gateway.clients.alice: rotation stopped: secret gateway.clients.alice.key ({KVC}/"
        f"{path}#api_key version 2): not found in Vault"
    ), said


def test_a_client_rotation_uses_the_session_it_is_given(
    bao: Bao, login: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``rotate(..., session=...)``: the key is written through that session, not one made
    from the hosts' vault settings (here: a Vault that cannot be reached)."""
    tag = tag_of(tmp_path)
    hosts, _ = on_kvc(bao, tag, vault=UNREACHABLE_VAULT)
    fake_connectors(monkeypatch, None)
    given = Session(Vault(addr=bao.addr, role_id=bao.role_id, retries=0))
    said: list[str] = []
    try:
        rot.rotate(hosts, "gateway.clients.alice", "new-key-0004", say=said.append, session=given)
    finally:
        given.close()
    assert said[0] == (
        f"gateway.clients.alice: wrote version 2 of {KVC}/gpunode/clients/{tag}-alice#api_key "
        "(check-and-set on 1)"
    )
