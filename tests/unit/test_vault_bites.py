"""gpunode/clients/vault.py: what the full mutation run of 2026-12-04 (84.6%) found untested.

Each test pins one behaviour a user depends on and that a changed line could break without
any other test noticing: the transport the client is built with (client certificate,
namespace, timeout, the redirect limit), the login paths (token, AppRole on another mount),
KV v2 on another mount, a deleted version, and the whole of each message a user reads.
The servers are a real OpenBao dev server (``bao``) and harness.py's replaying HTTP(S)
server where an answer must be one Vault would rarely give on demand (a hang, a redirect
loop, a lookup without a role name).
"""

from __future__ import annotations

import signal
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import FrameType
from typing import Any

import pytest
from harness import Bao, Pki, Server, make_pki, serve_mtls, start_bao, stop_bao

from gpunode.clients import vault as vault_module
from gpunode.clients.vault import Session, VaultError, read_root_only, rotate_secret_id
from gpunode.schema.vault import Secret, Vault

DEMO = Secret(path="gpunode/demo", key="api_key")
ON_KV2 = Secret(mount="kv2", path="app/db", key="password")
LOGIN = "/v1/auth/approle/login"
LOGGED_IN = (200, {"auth": {"client_token": "t-fake", "lease_duration": 60}})
DEMO_ANSWER = (200, {"data": {"data": {"api_key": "fake-value"}, "metadata": {"version": 4}}})
ALLOWED_FILE = "(allowed: a regular file owned by root, mode 0600 or 0400)"
DENIED = (
    "permission denied by Vault (allowed: a policy on this login that grants the capability "
    "on the path, see docs/secrets.md)"
)
KV2_POLICY = """
path "kv2/data/ro/*" { capabilities = ["read"] }
path "kv2/data/app/*" { capabilities = ["create", "read", "update"] }
path "kv2/metadata/app/*" { capabilities = ["read"] }
path "kv2/destroy/app/*" { capabilities = ["update"] }
"""


@pytest.fixture(scope="module")
def bao(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bao]:
    """AppRole on a mount of its own (``ctl-approle``), KV v2 at ``kv2``."""
    server = start_bao(tmp_path_factory.mktemp("bao"))
    c = server.client()
    c.sys.enable_auth_method("approle", path="ctl-approle")
    c.sys.enable_secrets_engine("kv", path="kv2", options={"version": "2"})
    c.sys.create_or_update_policy("kv2", KV2_POLICY)
    c.auth.approle.create_or_update_approle(
        "app", token_policies=["kv2"], mount_point="ctl-approle"
    )
    server.role_id = c.auth.approle.read_role_id("app", mount_point="ctl-approle")["data"][
        "role_id"
    ]
    c.secrets.kv.v2.create_or_update_secret("app/db", {"password": "pw-1"}, mount_point="kv2")
    c.secrets.kv.v2.create_or_update_secret("app/db", {"password": "pw-2"}, mount_point="kv2")
    yield server
    stop_bao(server)


def approle(bao: Bao, **kw: Any) -> Session:
    secret_id = bao.client().auth.approle.generate_secret_id("app", mount_point="ctl-approle")
    config = Vault(addr=bao.addr, role_id=bao.role_id, approle_mount="ctl-approle", retries=0, **kw)
    return Session(config, environ={"VAULT_SECRET_ID": secret_id["data"]["secret_id"]})


def fake(server: Server, **kw: Any) -> Session:
    config = Vault(addr=server.address, role_id="r", **{"retries": 0, **kw})
    return Session(config, environ={"VAULT_SECRET_ID": "s-fake"})


def refused(fn: Any) -> str:
    with pytest.raises(VaultError) as err:
        fn()
    return str(err.value)


@pytest.fixture
def alarm() -> Iterator[None]:
    """A test that would hang fails after 20 s instead."""

    def fail(signum: int, frame: FrameType | None) -> None:
        raise AssertionError("no answer within 20 s: the request had no timeout")

    previous = signal.signal(signal.SIGALRM, fail)
    signal.alarm(20)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# --- the transport ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"), "vault")


@pytest.fixture
def mtls(pki: Pki) -> Iterator[Server]:
    yield from serve_mtls(pki)


def test_a_client_certificate_and_key_are_presented(mtls: Server, pki: Pki) -> None:
    mtls.replay.add("POST", LOGIN, LOGGED_IN)
    mtls.replay.add("GET", "/v1/secret/data/gpunode/demo", DEMO_ANSWER)
    s = fake(
        mtls, ca_cert=str(pki.ca), client_cert=str(pki.client_cert), client_key=str(pki.client_key)
    )
    assert s.read("demo", DEMO).value == "fake-value"
    assert len(mtls.replay.calls("POST", LOGIN)) == 1


def test_a_client_certificate_alone_holds_its_key(mtls: Server, pki: Pki, tmp_path: Path) -> None:
    both = tmp_path / "client.pem"
    both.write_bytes(pki.client_cert.read_bytes() + pki.client_key.read_bytes())
    both.chmod(0o600)
    mtls.replay.add("POST", LOGIN, LOGGED_IN)
    mtls.replay.add("GET", "/v1/secret/data/gpunode/demo", DEMO_ANSWER)
    assert fake(mtls, ca_cert=str(pki.ca), client_cert=str(both)).read("demo", DEMO).value == (
        "fake-value"
    )


def test_without_a_client_certificate_nothing_is_read(mtls: Server, pki: Pki) -> None:
    mtls.replay.add("POST", LOGIN, LOGGED_IN)
    with pytest.raises(VaultError):
        fake(mtls, ca_cert=str(pki.ca)).read("demo", DEMO)
    assert mtls.replay.requests == []


@pytest.mark.parametrize("which", ["client_key", "client_cert"])
def test_a_client_key_others_can_read_is_refused_before_any_request(
    server: Server, pki: Pki, tmp_path: Path, which: str
) -> None:
    loose = tmp_path / "key.pem"
    loose.write_bytes(pki.client_cert.read_bytes() + pki.client_key.read_bytes())
    loose.chmod(0o640)
    files = {"client_cert": str(loose)}
    if which == "client_key":
        files = {"client_cert": str(pki.client_cert), "client_key": str(loose)}
    msg = refused(lambda: fake(server, **files).read("demo", DEMO))
    assert msg == (
        f"secret demo (secret/gpunode/demo#api_key): vault.{which} {loose}: owned by uid "
        f"{loose.stat().st_uid} with mode 0640 {ALLOWED_FILE}"
    )
    assert server.replay.requests == []
    missing = tmp_path / "missing.pem"
    msg = refused(lambda: fake(server, client_cert=str(missing)).read("demo", DEMO))
    assert msg.endswith(f"vault.client_cert {missing}: cannot read it (No such file or directory)")


def test_the_namespace_goes_with_every_request(server: Server) -> None:
    server.replay.add("POST", LOGIN, LOGGED_IN)
    server.replay.add("GET", "/v1/secret/data/gpunode/demo", DEMO_ANSWER)
    fake(server, namespace="team-a").read("demo", DEMO)
    assert [r.headers.get("x-vault-namespace") for r in server.replay.requests] == [
        "team-a",
        "team-a",
    ]


def test_an_approle_login_sends_no_token(server: Server) -> None:
    server.replay.add("POST", LOGIN, LOGGED_IN)
    server.replay.add("GET", "/v1/secret/data/gpunode/demo", DEMO_ANSWER)
    fake(server).read("demo", DEMO)
    login, read = server.replay.requests
    assert "x-vault-token" not in login.headers
    assert read.headers["x-vault-token"] == "t-fake"  # noqa: S105 - the fake's token


def test_a_vault_that_never_answers_times_out(alarm: None) -> None:
    with socket.socket() as listener:  # connections queue in the backlog, nothing answers
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        addr = f"http://127.0.0.1:{listener.getsockname()[1]}"
        s = Session(Vault(addr=addr, role_id="r", retries=0, timeout=0.5), {"VAULT_SECRET_ID": "x"})
        assert refused(lambda: s.read("demo", DEMO)) == (
            "secret demo (secret/gpunode/demo#api_key): vault login (AppRole approle): Vault at "
            f"{addr} is unreachable (ReadTimeout) after 1 attempt(s)"
        )


class _Redirects(BaseHTTPRequestHandler):
    """Every request is sent on to ``target`` (its path kept), or back to itself."""

    target = ""

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        self.send_response(307)
        self.send_header("Location", f"{self.target}{self.path}")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def redirector() -> Iterator[tuple[str, type[_Redirects]]]:
    handler = type("Handler", (_Redirects,), {})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", handler
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_a_redirect_loop_stops_after_five_hops(redirector: tuple[str, Any]) -> None:
    addr, handler = redirector
    handler.target = addr
    s = Session(Vault(addr=addr, role_id="r", retries=0), {"VAULT_SECRET_ID": "x"})
    assert refused(lambda: s.read("demo", DEMO)) == (
        f"secret demo (secret/gpunode/demo#api_key): vault login (AppRole approle): Vault at "
        f"{addr} redirected more than 5 times (allowed: an answer, or a redirect within its "
        "origin)"
    )


def test_a_redirect_to_another_origin_is_refused_naming_both(
    redirector: tuple[str, Any],
) -> None:
    addr, handler = redirector
    handler.target = "http://localhost:9"
    s = Session(Vault(addr=addr, role_id="r", retries=0), {"VAULT_SECRET_ID": "x"})
    assert refused(lambda: s.read("demo", DEMO)) == (
        f"secret demo (secret/gpunode/demo#api_key): vault login (AppRole approle): Vault at "
        f"{addr} redirected to http://localhost:9, another origin: refused, nothing was sent "
        f"there (allowed: redirects within {addr}; set vault.addr to the server that answers, "
        "e.g. the active node or its load balancer)"
    )


def test_no_address_is_refused_not_taken_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("VAULT_ADDR", "http://127.0.0.1:9")
    s = Session(Vault(role_id="r"), {"VAULT_SECRET_ID": "x"})
    assert refused(lambda: s.read("demo", DEMO)) == (
        "secret demo (secret/gpunode/demo#api_key): vault login: vault.addr is not set "
        "(allowed: the Vault URL)"
    )


# --- logins -------------------------------------------------------------------------------


def test_token_login_reads_with_the_token_and_checks_it_first(bao: Bao) -> None:
    token = bao.client().auth.token.create(policies=["kv2"], ttl="5m")["auth"]["client_token"]
    s = Session(Vault(addr=bao.addr, auth="token", retries=0), {"VAULT_TOKEN": token})
    assert s.read("db", ON_KV2).value == "pw-2"
    s.close()  # a given token is kept
    assert bao.client().auth.token.lookup(token)["data"]["policies"] == ["default", "kv2"]
    bad = Session(Vault(addr=bao.addr, auth="token", retries=0), {"VAULT_TOKEN": "hvs.bogus"})
    assert refused(lambda: bad.login()) == f"vault login (token): {DENIED}"


def test_token_login_without_the_variable_names_it(
    bao: Bao, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VAULT_TOKEN", bao.root)  # the process's own is never used
    config = Vault(addr=bao.addr, auth="token", token_env="GPUNODE_VAULT_TOKEN", retries=0)  # noqa: S106
    assert refused(lambda: Session(config, {"VAULT_TOKEN": bao.root}).login()) == (
        "vault login: auth is token but $GPUNODE_VAULT_TOKEN is not set"
    )


def test_approle_without_a_role_id_names_both_places(bao: Bao) -> None:
    s = Session(Vault(addr=bao.addr, role_id_env="CTL_ROLE_ID"), {"VAULT_SECRET_ID": "x"})
    assert refused(s.login) == (
        "vault login: no AppRole role_id (allowed: vault.role_id in the inventory or $CTL_ROLE_ID)"
    )


def test_a_used_wrapping_token_is_explained(bao: Bao) -> None:
    wrapped = bao.client().auth.approle.generate_secret_id(
        "app", wrap_ttl="60s", mount_point="ctl-approle"
    )["wrap_info"]["token"]
    config = Vault(addr=bao.addr, role_id=bao.role_id, approle_mount="ctl-approle", retries=0)
    first = Session(config, {"VAULT_WRAPPED_SECRET_ID": wrapped})
    first.login()
    first.close()
    msg = refused(Session(config, {"VAULT_WRAPPED_SECRET_ID": wrapped}).login)
    assert msg.startswith("vault login: unwrapping $VAULT_WRAPPED_SECRET_ID: ")
    assert msg.endswith(
        " (a wrapping token works once: it was already used, expired or is not a wrapping "
        "token; ask for a new wrapped secret_id)"
    )


# --- KV v2 on another mount ---------------------------------------------------------------


def test_read_metadata_write_and_destroy_on_another_mount(bao: Bao) -> None:
    s = approle(bao)
    read = s.read("db", ON_KV2)
    assert (read.name, read.value, read.version) == ("db", "pw-2", 2)
    assert s.read("db", ON_KV2, version=1).value == "pw-1"
    assert s.metadata("db", ON_KV2)["current_version"] == 2
    assert s.write("db", ON_KV2, "pw-3", cas=2) == 3
    assert refused(lambda: s.write("db", ON_KV2, "pw-x", cas=2)) == (
        "secret db (kv2/app/db#password): someone wrote a newer version than 2 meanwhile "
        "(check-and-set failed); run the rotation again"
    )
    s.destroy("db", ON_KV2, [1])
    assert refused(lambda: s.read("db", ON_KV2, version=1)) == (
        "secret db (kv2/app/db#password version 1): not found in Vault"
    )
    assert s.read("db", ON_KV2).value == "pw-3"
    s.close()


def test_a_deleted_latest_version_is_not_found_not_empty(bao: Bao) -> None:
    kv = bao.client().secrets.kv.v2
    kv.create_or_update_secret("app/gone", {"password": "pw"}, mount_point="kv2")
    kv.delete_latest_version_of_secret("app/gone", mount_point="kv2")
    gone = Secret(mount="kv2", path="app/gone", key="password")
    assert refused(lambda: approle(bao).read("gone", gone)) == (
        "secret gone (kv2/app/gone#password): not found in Vault"
    )


def test_refused_writes_and_destroys_name_what_was_asked(bao: Bao) -> None:
    bao.client().secrets.kv.v2.create_or_update_secret(
        "ro/db", {"password": "x"}, mount_point="kv2"
    )
    s = approle(bao)
    read_only = Secret(mount="kv2", path="ro/db", key="password")
    assert refused(lambda: s.write("db", read_only, "y", cas=1)) == (
        f"secret db (kv2/ro/db#password) write (check-and-set on version 1): {DENIED}"
    )  # a refusal, not taken for a stale version because the step's name says check-and-set
    other = Secret(mount="kv2", path="other/db", key="password")
    assert refused(lambda: s.write("db", other, "x", cas=1)) == (
        f"secret db (kv2/other/db#password): {DENIED}"
    )
    assert refused(lambda: s.destroy("db", other, [1, 2])) == (
        f"secret db (kv2/other/db) destroy versions [1, 2]: {DENIED}"
    )
    s.close()


def test_a_read_without_metadata_is_version_0(server: Server) -> None:
    server.replay.add("POST", LOGIN, LOGGED_IN)
    server.replay.add(
        "GET", "/v1/secret/data/gpunode/demo", (200, {"data": {"data": {"api_key": "v"}}})
    )
    read = fake(server).read("demo", DEMO)
    assert (read.name, read.version) == ("demo", 0)


def test_an_error_without_a_list_is_cut_at_its_url(server: Server) -> None:
    server.replay.add("POST", LOGIN, (412, "x" * 400))
    msg = refused(lambda: fake(server).read("demo", DEMO))
    assert msg == (
        "secret demo (secret/gpunode/demo#api_key): vault login (AppRole approle): "
        "UnexpectedError: " + "x" * 300
    )
    server.replay.add("POST", LOGIN, (412, "needs a newer index"))
    msg = refused(lambda: fake(server).read("demo", DEMO))
    assert msg == (
        "secret demo (secret/gpunode/demo#api_key): vault login (AppRole approle): "
        "UnexpectedError: needs a newer index"
    )


# --- the secret_id file -------------------------------------------------------------------


def _secret_id_file(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / "secret_id"
    path.write_bytes(data)
    path.chmod(0o600)
    return path


def test_a_secret_id_file_is_one_line_of_printable_ascii(tmp_path: Path) -> None:
    path = _secret_id_file(tmp_path, b"  " + b"a" * 512 + b"\n")
    assert read_root_only(str(path)) == "a" * 512
    not_one = (
        f"vault.secret_id_file {path}: not one secret_id (allowed: one line of 1 to 512 "
        "printable ASCII characters, no spaces or control characters)"
    )
    for data in (
        b"a" * 513,
        b"two\nlines",
        b"s p",
        b"tab\tbed",
        b"\xff\xfe-not-utf-8",
        "é".encode(),
    ):
        path.write_bytes(data)
        assert refused(lambda: read_root_only(str(path))) == not_one, data


def test_a_secret_id_file_over_64_kib_is_refused_unread(tmp_path: Path) -> None:
    path = _secret_id_file(tmp_path, b"a" * 65537)
    assert refused(lambda: read_root_only(str(path))) == (
        f"vault.secret_id_file {path}: larger than 65536 bytes (allowed: one secret_id)"
    )
    path.write_bytes(b"a" * 65536)  # the size is allowed; the content is not one secret_id
    assert "not one secret_id" in refused(lambda: read_root_only(str(path)))


# --- rotate_secret_id ---------------------------------------------------------------------


def test_rotation_reads_the_process_environment_when_given_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VAULT_SECRET_ID", "from-the-process")
    path = _secret_id_file(tmp_path, b"old-secret-id\n")
    config = Vault(addr="https://v:8200", role_id="r", secret_id_file=str(path))
    assert refused(lambda: rotate_secret_id(config)) == (
        f"vault.rotate_secret_id: $VAULT_SECRET_ID is set, so the run would log in with it "
        f"instead of {path}, the file it rotates (allowed: unset it)"
    )


def test_rotation_with_token_auth_is_refused_even_with_a_file(tmp_path: Path) -> None:
    path = _secret_id_file(tmp_path, b"old-secret-id\n")
    config = Vault(addr="https://v:8200", auth="token", secret_id_file=str(path))
    assert refused(lambda: rotate_secret_id(config, environ={})) == (
        "vault.rotate_secret_id: needs vault.auth: approle and vault.secret_id_file "
        "(allowed: both set, or rotate_secret_id: false)"
    )


def test_rotation_under_a_file_not_a_directory_names_it(tmp_path: Path) -> None:
    file = tmp_path / "not-a-directory"
    file.write_text("x")
    config = Vault(addr="https://v:8200", role_id="r", secret_id_file=str(file / "secret_id"))
    assert refused(lambda: rotate_secret_id(config, environ={})) == (
        f"vault.secret_id_file: {file}: Not a directory"
    )


def _rotation_server(server: Server, lookup: tuple[int, Any], **routes: tuple[int, Any]) -> None:
    server.replay.add("POST", "/v1/auth/ctl/login", LOGGED_IN)
    server.replay.add("GET", "/v1/auth/token/lookup-self", lookup)
    server.replay.add("POST", "/v1/auth/token/revoke-self", (204, ""))
    for path, answer in routes.items():
        server.replay.add("POST", f"/v1/auth/ctl/role/{path}", answer)


def _rotate(server: Server, tmp_path: Path) -> tuple[Vault, Path]:
    path = _secret_id_file(tmp_path, b"old-secret-id-0001\n")
    config = Vault(
        addr=server.address, role_id="r", approle_mount="ctl", secret_id_file=str(path), retries=0
    )
    return config, path


def test_rotation_on_another_mount_asks_there_and_says_no_ttl(
    server: Server, tmp_path: Path
) -> None:
    _rotation_server(
        server,
        (200, {"data": {"meta": {"role_name": "ctl-role"}}}),
        **{
            "ctl-role/secret-id": (200, {"data": {"secret_id": "new-secret-id-0002"}}),
            "ctl-role/secret-id/destroy": (204, ""),
        },
    )
    config, path = _rotate(server, tmp_path)
    rotation = rotate_secret_id(config, environ={})
    assert (rotation.role, rotation.ttl, rotation.path) == ("ctl-role", 0, str(path))
    assert path.read_text() == "new-secret-id-0002\n"
    (issued,) = server.replay.calls("POST", "/v1/auth/ctl/role/ctl-role/secret-id")
    assert issued.body == {"metadata": '{"issued_by": "gpunode drift"}'}
    (destroyed,) = server.replay.calls("POST", "/v1/auth/ctl/role/ctl-role/secret-id/destroy")
    assert destroyed.body == {"secret_id": "old-secret-id-0001"}


def test_rotation_when_the_token_lookup_is_denied(server: Server, tmp_path: Path) -> None:
    _rotation_server(server, (403, {"errors": ["permission denied"]}))
    config, path = _rotate(server, tmp_path)
    assert refused(lambda: rotate_secret_id(config, environ={})) == (
        f"vault: looking up this run's token: {DENIED}"
    )
    assert path.read_text() == "old-secret-id-0001\n"


@pytest.mark.parametrize(
    ("meta", "shown"),
    [({}, "''"), ({"role_name": "r" * 39 + "/" + "x" * 20}, repr("r" * 39 + "/"))],
    ids=["none", "bad-and-long"],
)
def test_rotation_when_vault_names_no_usable_role(
    server: Server, tmp_path: Path, meta: dict[str, str], shown: str
) -> None:
    _rotation_server(server, (200, {"data": {"meta": meta}}))
    config, _ = _rotate(server, tmp_path)
    assert refused(lambda: rotate_secret_id(config, environ={})) == (
        "vault.rotate_secret_id: Vault named no usable AppRole role for this login "
        f"(got {shown}; allowed: {vault_module.ROLE_NAME_RE})"
    )


def test_rotation_when_a_new_secret_id_is_denied(server: Server, tmp_path: Path) -> None:
    _rotation_server(
        server,
        (200, {"data": {"meta": {"role_name": "ctl-role"}}}),
        **{"ctl-role/secret-id": (403, {"errors": ["permission denied"]})},
    )
    config, path = _rotate(server, tmp_path)
    assert refused(lambda: rotate_secret_id(config, environ={})) == (
        f"vault: a new secret_id for AppRole role ctl-role: {DENIED}"
    )
    assert path.read_text() == "old-secret-id-0001\n"
