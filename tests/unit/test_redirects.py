"""Credentials never follow a redirect to another origin, and reach Vault or Nomad over
plain http only on loopback or when the inventory says so (issue 13, finding 9).

Every server here is real: ``Recorder`` is an ``http.server`` on 127.0.0.1 (its own
port, so another origin) that keeps every request line, header and body byte it
receives and answers like Vault or Nomad would, with a planted value. ``Redirector`` is
an ``http.server`` on another port that answers chosen requests with a 301/302/303/307/308
pointing at the recorder (or at itself) and forwards the rest to a real OpenBao dev
server (harness.start_bao). A test passes only if the recorder received nothing at all
and the client raised an error naming the recorder's origin.
"""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from harness import Bao, fixture, start_bao, stop_bao
from pydantic import ValidationError

from gpunode import inventory as gpunode_inventory
from gpunode.clients.nomad import NomadClient, NomadError
from gpunode.clients.vault import Session, VaultError
from gpunode.config import load
from gpunode.paths import REPO_ROOT
from gpunode.schema.nomad import Nomad
from gpunode.schema.types import ConfigError
from gpunode.schema.vault import Secret, Vault

NOMAD_TOKEN = "0b6e2f4c-redirect-test-nomad-token"  # noqa: S105 - a test ACL token SecretID
DEMO = Secret(path="gpunode/demo", key="api_key")
KV_PATH = "/v1/secret/data/gpunode/demo"
LOGIN_PATH = "/v1/auth/approle/login"
UNWRAP_PATH = "/v1/sys/wrapping/unwrap"
PLANTED = "planted-by-the-other-origin"


# --- real servers -------------------------------------------------------------------------


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    def raw(self) -> str:
        head = "\n".join(f"{k}: {v}" for k, v in self.headers.items())
        return f"{self.method} {self.path}\n{head}\n\n{self.body.decode(errors='replace')}"


@dataclass
class Running:
    url: str
    seen: list[Seen] = field(default_factory=list)


def _serve(handle: Callable[[BaseHTTPRequestHandler, Seen], None]) -> Iterator[Running]:
    """An http.server on 127.0.0.1 (ephemeral port) that records each request, then
    lets ``handle`` answer it."""
    running = Running("")

    class Handler(BaseHTTPRequestHandler):
        def _any(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            seen = Seen(
                self.command,
                self.path,
                {k.lower(): v for k, v in self.headers.items()},
                self.rfile.read(length) if length else b"",
            )
            running.seen.append(seen)
            handle(self, seen)

        do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _any  # noqa: N815

        def log_message(self, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    running.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield running
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


def _answer(handler: BaseHTTPRequestHandler, status: int, body: Any, **headers: str) -> None:
    data = json.dumps(body).encode() if body is not None else b""
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(data)))
    for name, value in headers.items():
        handler.send_header(name, value)
    handler.end_headers()
    handler.wfile.write(data)


def _planted(path: str) -> dict[str, Any]:
    """What a hostile host would answer: a login, an unwrapped secret_id, a KV value, a
    Nomad plan or deployment. The client must never take any of it."""
    if path.startswith(LOGIN_PATH):
        return {"auth": {"client_token": "hvs.planted", "policies": ["default"]}}
    if path.startswith(UNWRAP_PATH):
        return {"data": {"secret_id": "planted-secret-id"}}
    if path.startswith("/v1/secret/"):
        return {"data": {"data": {"api_key": PLANTED}, "metadata": {"version": 9}}}
    if path.startswith("/v1/job/") and "/plan" in path:
        return dict(fixture("plan-none.json"))
    return dict(fixture("deployment-successful.json"))


@pytest.fixture
def recorder() -> Iterator[Running]:
    """The other origin: records everything, answers with planted values."""
    yield from _serve(lambda h, seen: _answer(h, 200, _planted(urlsplit(seen.path).path)))


@dataclass
class Rule:
    """Redirect requests whose path starts with ``prefix`` with ``code`` to ``target``
    (+ the same path); ``target`` None: to this same server under /hop."""

    prefix: str
    code: int
    target: str | None


def _forward(handler: BaseHTTPRequestHandler, seen: Seen, upstream: str) -> None:
    """Pass one request to the real OpenBao and its answer back (a reverse proxy)."""
    parts = urlsplit(upstream)
    conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=10)
    headers = {k: v for k, v in seen.headers.items() if k not in ("host", "connection")}
    conn.request(seen.method, seen.path.removeprefix("/hop"), body=seen.body, headers=headers)
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    handler.send_response(resp.status)
    for name, value in resp.getheaders():
        if name.lower() not in ("transfer-encoding", "connection", "content-length"):
            handler.send_header(name, value)
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    handler.wfile.write(data)


def redirector(rules: list[Rule], upstream: str | None = None) -> Iterator[Running]:
    """A server that redirects by ``rules`` and forwards everything else to ``upstream``
    (or answers like Nomad, for the Nomad client, when there is no upstream)."""

    def handle(handler: BaseHTTPRequestHandler, seen: Seen) -> None:
        for rule in rules:
            if seen.path.startswith(rule.prefix):
                location = f"{rule.target}{seen.path}" if rule.target else f"/hop{seen.path}"
                _answer(handler, rule.code, {"redirect": True}, Location=location)
                return
        if upstream:
            _forward(handler, seen, upstream)
        else:
            _answer(handler, 200, _planted(urlsplit(seen.path.removeprefix("/hop")).path))

    return _serve(handle)


@pytest.fixture(scope="module")
def bao(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bao]:
    server = start_bao(tmp_path_factory.mktemp("bao"))
    c = server.client()
    c.sys.enable_auth_method("approle", path="approle")
    c.sys.create_or_update_policy(
        "gpunode-read", 'path "secret/data/gpunode/*" { capabilities = ["read"] }\n'
    )
    c.auth.approle.create_or_update_approle("gpunode", token_policies=["gpunode-read"])
    server.role_id = c.auth.approle.read_role_id("gpunode")["data"]["role_id"]
    c.secrets.kv.v2.create_or_update_secret("gpunode/demo", {"api_key": "the-real-value"})
    yield server
    stop_bao(server)


def _refused(seen: list[Seen], *credentials: str) -> None:
    """The other origin received nothing: no request, so no credential."""
    leaked = [c for c in credentials for s in seen if c and c in s.raw()]
    assert not leaked, f"credentials sent to the other origin: {len(leaked)}"
    assert seen == [], f"the other origin received: {[f'{s.method} {s.path}' for s in seen]}"


# --- Vault ----------------------------------------------------------------------------------


@pytest.mark.parametrize("code", [302, 307, 308])
@pytest.mark.parametrize("path", [LOGIN_PATH, KV_PATH])
def test_vault_redirect_to_another_origin_sends_no_credential(
    bao: Bao, recorder: Running, path: str, code: int
) -> None:
    """AppRole login (role_id, secret_id in the body) or the KV read (X-Vault-Token)
    redirected elsewhere: an error naming that origin, nothing sent there, nothing taken."""
    secret_id = bao.secret_id()
    for proxy in redirector([Rule(path, code, recorder.url)], upstream=bao.addr):
        s = Session(
            Vault(addr=proxy.url, role_id=bao.role_id, retries=0), {"VAULT_SECRET_ID": secret_id}
        )
        with pytest.raises(VaultError) as err:
            s.read("demo", DEMO)
        token = s.client.token if s.client else ""
        s.close()
    msg = str(err.value)
    assert f"redirected to {recorder.url}, another origin: refused" in msg
    assert "allowed: redirects within" in msg
    assert secret_id not in msg and bao.role_id not in msg and PLANTED not in msg
    _refused(recorder.seen, bao.role_id, secret_id, token)


@pytest.mark.parametrize("code", [307, 308])
def test_vault_unwrap_redirect_sends_no_wrapping_token(
    bao: Bao, recorder: Running, code: int
) -> None:
    wrapped = bao.secret_id(wrap_ttl="60s")
    for proxy in redirector([Rule(UNWRAP_PATH, code, recorder.url)], upstream=bao.addr):
        s = Session(
            Vault(addr=proxy.url, role_id=bao.role_id, retries=0),
            {"VAULT_WRAPPED_SECRET_ID": wrapped},
        )
        with pytest.raises(VaultError, match=rf"redirected to {recorder.url}"):
            s.read("demo", DEMO)
    _refused(recorder.seen, wrapped)


def test_vault_redirect_within_the_origin_is_followed(bao: Bao, recorder: Running) -> None:
    """Same scheme, host and port: followed (the token goes where it was going anyway)."""
    for proxy in redirector([Rule(KV_PATH, 307, None)], upstream=bao.addr):
        s = Session(
            Vault(addr=proxy.url, role_id=bao.role_id, retries=0),
            {"VAULT_SECRET_ID": bao.secret_id()},
        )
        assert s.read("demo", DEMO).value == "the-real-value"
        s.close()
        assert [x.path for x in proxy.seen if "gpunode/demo" in x.path] == [
            KV_PATH,
            f"/hop{KV_PATH}",
        ]


def test_the_same_port_under_another_name_is_another_origin(bao: Bao) -> None:
    """http://127.0.0.1:P and http://localhost:P are different origins (RFC 6454)."""
    port = urlsplit(bao.addr).port
    for proxy in redirector([Rule(KV_PATH, 307, f"http://localhost:{port}")], upstream=bao.addr):
        s = Session(
            Vault(addr=proxy.url, role_id=bao.role_id, retries=0),
            {"VAULT_SECRET_ID": bao.secret_id()},
        )
        with pytest.raises(VaultError, match=rf"redirected to http://localhost:{port}, another"):
            s.read("demo", DEMO)
        s.close()


# --- Nomad ----------------------------------------------------------------------------------


@pytest.mark.parametrize("code", [301, 302, 303, 307, 308])
@pytest.mark.parametrize("call", ["plan", "deployment"])
def test_nomad_redirect_to_another_origin_sends_no_token(
    recorder: Running, call: str, code: int
) -> None:
    for proxy in redirector([Rule("/v1/", code, recorder.url)]):
        client = NomadClient(proxy.url, token=NOMAD_TOKEN, retries=0, sleep=lambda s: None)
        with pytest.raises(NomadError) as err:
            if call == "plan":
                client.plan({"ID": "my-job", "TaskGroups": []})
            else:
                client.latest_deployment("my-job")
        assert len(proxy.seen) == 1
        assert proxy.seen[0].headers["x-nomad-token"] == NOMAD_TOKEN  # the real one got it
    msg = str(err.value)
    assert f"redirected to {recorder.url}, another origin: refused" in msg
    assert NOMAD_TOKEN not in msg
    _refused(recorder.seen, NOMAD_TOKEN)


def test_nomad_redirect_within_the_origin_is_followed(recorder: Running) -> None:
    for proxy in redirector([Rule("/v1/job/my-job/deployment", 307, None)]):
        client = NomadClient(proxy.url, token=NOMAD_TOKEN, retries=0, sleep=lambda s: None)
        deployment = client.latest_deployment("my-job")
        assert deployment and deployment["Status"] == "successful"
        assert [s.path.split("?")[0] for s in proxy.seen] == [
            "/v1/job/my-job/deployment",
            "/hop/v1/job/my-job/deployment",
        ]
    assert recorder.seen == []


@pytest.mark.parametrize(
    ("address", "kwargs", "message"),
    [
        ("http://nomad.example.com:4646", {}, "is plain http to a host that is not loopback"),
        ("https://user:pw@nomad.example.com:4646", {}, "holds user info"),
        ("http://user:pw@127.0.0.1:4646", {"insecure_http": True}, "holds user info"),
    ],
)
def test_nomad_client_refuses_plain_http_and_user_info(
    address: str, kwargs: dict[str, Any], message: str
) -> None:
    """$NOMAD_ADDR reaches the client without the schema: the client checks it too."""
    with pytest.raises(NomadError, match=message) as err:
        NomadClient(address, token=NOMAD_TOKEN, **kwargs)
    assert "pw" not in str(err.value)
    NomadClient("http://127.0.0.1:4646")
    NomadClient("http://[::1]:4646")
    NomadClient("http://nomad.example.com:4646", insecure_http=True)


# --- config load: http only on loopback or with the flag; no user info ---------------------


def _inventory(vault: dict[str, Any], nomad: dict[str, Any] | None = None) -> dict[str, Any]:
    defaults: dict[str, Any] = {
        "distro": "debian12",
        "vault": vault,
        "firewall": {"enabled": False},
    }
    if nomad is not None:
        defaults["nomad"] = nomad
    return {
        "defaults": defaults,
        "hosts": {
            "gpu-01": {"connection": {"address": "192.0.2.11"}},
            "gpu-02": {"connection": {"address": "192.0.2.12"}},
        },
    }


@pytest.mark.parametrize(
    ("vault", "nomad", "message"),
    [
        (
            {"addr": "http://vault.example.com:8200"},
            None,
            "inv.yml: defaults: vault.addr: 'http://vault.example.com:8200' is plain http to a "
            "host that is not loopback",
        ),
        (
            {"addr": "https://vault.example.com:8200"},
            {"address": "http://nomad.example.com:4646"},
            "inv.yml: defaults: nomad.address: 'http://nomad.example.com:4646' is plain http to "
            "a host that is not loopback",
        ),
        (
            {"addr": "https://gpunode:s3cret-pw@vault.example.com:8200"},
            None,
            "inv.yml: defaults: vault.addr: ",
        ),
        (
            {"addr": "https://vault.example.com:8200"},
            {"address": "https://token@nomad.example.com:4646"},
            "inv.yml: defaults: nomad.address: ",
        ),
        (
            {"addr": "http://127.0.0.1.nip.io:8200"},
            None,
            "vault.addr: 'http://127.0.0.1.nip.io:8200' is plain http",
        ),
        (
            {"addr": "https://vault.example.com:0"},
            None,
            "inv.yml: defaults: vault.addr: ",
        ),
    ],
)
def test_insecure_urls_are_refused_at_load(
    vault: dict[str, Any], nomad: dict[str, Any] | None, message: str
) -> None:
    with pytest.raises(ConfigError) as err:
        load(_inventory(vault, nomad), source="inv.yml")
    text = str(err.value)
    assert message in text
    assert "(allowed: " in text
    assert ("user" in text) == ("@" in str(vault) + str(nomad))  # says why: user info
    assert "port" in text or ":0" not in str(vault)
    assert "s3cret-pw" not in text and "token@" not in text and "gpunode:" not in text


@pytest.mark.parametrize(
    "addr",
    [
        "http://127.0.0.1:8200",
        "http://127.9.8.7:8200",
        "http://[::1]:8200",
        "http://localhost:8200",
    ],
)
def test_plain_http_to_loopback_is_allowed(addr: str) -> None:
    inv = load(_inventory({"addr": addr}, {"address": addr.replace("8200", "4646")}), "inv.yml")
    assert inv.hosts["gpu-01"].config.vault.addr == addr


def test_the_flag_allows_plain_http_beside_the_address() -> None:
    assert Vault(addr="http://vault.lab:8200", insecure_http=True).addr == "http://vault.lab:8200"
    assert Nomad(address="http://nomad.lab:4646", insecure_http=True).address
    with pytest.raises(ValidationError, match="insecure_http: true beside it"):
        Vault(addr="http://vault.lab:8200")


def _write(tmp_path: Path, data: dict[str, Any]) -> Path:
    path = tmp_path / "inv.yml"
    path.write_text(yaml.safe_dump(data))
    return path


def _check(path: Path) -> list[str]:
    """`gpunode check` in its own process (a run): its stderr lines."""
    proc = subprocess.run(
        [sys.executable, "-m", "gpunode.commands.cli", "check", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO_ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stderr.splitlines()


def test_insecure_settings_warn_on_every_run_once_each_naming_the_hosts(tmp_path: Path) -> None:
    data = _inventory(
        {"addr": "http://vault.lab:8200", "insecure_http": True, "tls_verify": False},
        {"address": "http://nomad.lab:4646", "insecure_http": True},
    )
    data["hosts"]["gpu-03"] = {
        "connection": {"address": "192.0.2.13"},
        "data": {"vault": {"addr": "https://vault.example.com:8200", "insecure_http": False}},
    }
    path = _write(tmp_path, data)
    expected = [
        "gpunode: warning: vault.insecure_http is true: the secret_id, the Vault token and every "
        "secret may cross the network unencrypted (vault.addr http://vault.lab:8200) "
        "(hosts: gpu-01, gpu-02)",
        "gpunode: warning: vault.tls_verify is false: Vault's certificate is not checked, anyone "
        "on the path to http://vault.lab:8200 can read the secret_id, the token and every "
        "secret (hosts: gpu-01, gpu-02)",
        "gpunode: warning: vault.tls_verify is false: Vault's certificate is not checked, anyone "
        "on the path to https://vault.example.com:8200 can read the secret_id, the token and "
        "every secret (hosts: gpu-03)",
        "gpunode: warning: nomad.insecure_http is true: the Nomad ACL token may cross the "
        "network unencrypted (nomad.address http://nomad.lab:4646) (hosts: gpu-01, gpu-02, "
        "gpu-03)",
    ]
    for _ in range(2):  # every run, once per distinct warning
        err = _check(path)
        for line in expected:
            assert err.count(line) == 1, (line, err)
    # Without the insecure settings: no such warning.
    err = _check(_write(tmp_path, _inventory({"addr": "https://vault.example.com:8200"})))
    assert not [line for line in err if "vault." in line or "nomad." in line]


def test_loading_twice_in_one_run_warns_once_and_inventory_files_warn(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """pyinfra loads inventories/*.py, which call from_yaml (gpunode's commands load them
    the same way, drift twice): the warning is printed there, once in one process."""
    monkeypatch.setattr(gpunode_inventory, "_REPORTED", set())
    _write(tmp_path, _inventory({"addr": "https://vault.example.com:8200", "tls_verify": False}))
    py = tmp_path / "inv.py"
    py.write_text((REPO_ROOT / "inventories" / "example.py").read_text())
    gpunode_inventory.load_inventory_file(py)
    err = capsys.readouterr().err
    assert err.count("gpunode: warning: vault.tls_verify is false") == 1
    assert "(hosts: gpu-01, gpu-02)" in err
    gpunode_inventory.load_inventory_file(py)
    assert capsys.readouterr().err == ""
