"""The controller's self-rotating AppRole secret_id (``vault.rotate_secret_id``,
gpunode.clients.vault.rotate_secret_id, docs/controller.md) against a real OpenBao dev server.

The role and its policy are the ones docs/controller.md documents (the policy is read from
that page). A crash is a real one: the rotation runs in a child process that dies with
``os._exit`` at the step under test (no ``finally``, no ``atexit``), then the next rotation
runs in this process. Nothing here prints a secret_id.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import hvac
import pytest
from harness import Bao, start_bao, stop_bao

from gpunode.clients.vault import ROTATED_SUFFIX, VaultError, rotate_secret_id
from gpunode.config import load
from gpunode.paths import REPO_ROOT
from gpunode.schema.types import ConfigError
from gpunode.schema.vault import Vault

ROLE = "gpunode-controller"
DOC = REPO_ROOT / "docs" / "controller.md"


def documented_policy() -> str:
    (hcl,) = re.findall(r"```hcl\n(.*?)```", DOC.read_text(), re.S)
    return hcl


def start_audited_bao(tmp: Path) -> Bao:
    """harness.start_bao's dev server plus a file audit device (OpenBao takes audit devices
    from its config file only): the audit log counts the login attempts."""
    (tmp / "audit.hcl").write_text(
        f'audit "file" "log" {{\n  options {{\n    file_path = "{tmp / "audit.log"}"\n  }}\n}}\n'
    )
    return start_bao(tmp, extra_args=[f"-config={tmp / 'audit.hcl'}"])


@pytest.fixture(scope="module")
def bao(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bao]:
    tmp = tmp_path_factory.mktemp("bao")
    server = start_audited_bao(tmp)
    server.audit = tmp / "audit.log"  # type: ignore[attr-defined]
    c = server.client()
    c.sys.enable_auth_method("approle", path="approle")
    c.sys.create_or_update_policy(ROLE, documented_policy())
    c.auth.approle.create_or_update_approle(
        ROLE,
        token_policies=[ROLE],
        token_ttl="60s",  # noqa: S106 - a duration
        secret_id_ttl="300s",  # noqa: S106
        secret_id_bound_cidrs=["127.0.0.1/32"],
        token_bound_cidrs=["127.0.0.1/32"],
    )
    c.auth.approle.create_or_update_approle("other", token_policies=["default"])
    server.role_id = c.auth.approle.read_role_id(ROLE)["data"]["role_id"]
    yield server
    stop_bao(server)


@pytest.fixture
def seeded(bao: Bao, tmp_path: Path) -> Iterator[Vault]:
    """A controller's secret_id file with a fresh secret_id of the role (and no other)."""
    destroy_all(bao)
    path = tmp_path / "controller" / "secret_id"
    path.parent.mkdir(mode=0o700)
    path.write_text(bao.secret_id(ROLE) + "\n")
    path.chmod(0o600)
    yield Vault(
        addr=bao.addr,
        role_id=bao.role_id,
        secret_id_file=str(path),
        rotate_secret_id=True,
        retries=3,
        backoff=0.2,
    )
    destroy_all(bao)


def accessors(bao: Bao, role: str = ROLE) -> list[str]:
    try:
        return list(bao.client().auth.approle.list_secret_id_accessors(role)["data"]["keys"])
    except hvac.exceptions.InvalidPath:  # none left
        return []


def destroy_all(bao: Bao, role: str = ROLE) -> None:
    for accessor in accessors(bao, role):
        bao.client().auth.approle.destroy_secret_id_accessor(role, accessor)


def logs_in(bao: Bao, secret_id: str) -> bool:
    client = hvac.Client(url=bao.addr, token="", timeout=5)
    try:
        client.auth.approle.login(role_id=bao.role_id, secret_id=secret_id)
    except hvac.exceptions.InvalidRequest:
        return False
    client.auth.token.revoke_self()
    return True


def on_disk(config: Vault) -> str:
    return Path(str(config.secret_id_file)).read_text().strip()


def requests(bao: Bao, path: str) -> int:
    """Requests to ``path`` that Vault has seen (its audit log)."""
    log = bao.audit.read_text().splitlines()  # type: ignore[attr-defined]
    entries = [json.loads(line) for line in log]
    return sum(e["type"] == "request" and e["request"]["path"] == path for e in entries)


def logins(bao: Bao) -> int:
    return requests(bao, "auth/approle/login")


CRASH = """
import os, sys
import gpunode.clients.vault as v
from gpunode.schema.vault import Vault
step = sys.argv[1]
def die(*args, **kw):
    os._exit(137)
if step == "before-write":
    v.write_root_only = die
elif step == "before-rename":
    v.os.replace = die
elif step == "before-destroy":
    import hvac.api.auth_methods.approle as approle
    approle.AppRole.destroy_secret_id = die
v.rotate_secret_id(Vault.model_validate_json(sys.stdin.read()), environ={})
print("no crash")
"""


def crash(config: Vault, step: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", CRASH, step],
        input=config.model_dump_json(),
        env={"PATH": os.environ["PATH"], "PYTHONPATH": str(REPO_ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 137, proc.stdout + proc.stderr


# --- the normal run --------------------------------------------------------------------


def test_each_rotation_replaces_the_file_and_the_old_secret_id_is_refused(
    bao: Bao, seeded: Vault
) -> None:
    path = Path(str(seeded.secret_id_file))
    seen = [on_disk(seeded)]
    for _ in range(3):
        rotation = rotate_secret_id(seeded, environ={})
        assert (rotation.role, rotation.ttl, rotation.path) == (ROLE, 300, str(path))
        new = on_disk(seeded)
        assert new not in seen
        assert logs_in(bao, new)
        assert not logs_in(bao, seen[-1])  # destroyed, not merely replaced
        seen.append(new)
        st = path.stat()
        assert (st.st_mode & 0o777, st.st_uid) == (0o600, os.geteuid())
        assert sorted(p.name for p in path.parent.iterdir()) == ["secret_id"]  # no temp file
        assert len(accessors(bao)) == 1  # only the one on disk is alive
    assert not any(logs_in(bao, old) for old in seen[:-1])


def test_the_run_token_is_revoked_and_only_the_role_is_touched(bao: Bao, seeded: Vault) -> None:
    before = logins(bao)
    other = bao.secret_id("other")
    revoked = requests(bao, "auth/token/revoke-self")
    rotate_secret_id(seeded, environ={})
    assert logins(bao) == before + 1
    assert requests(bao, "auth/token/revoke-self") == revoked + 1  # its token, at the end
    assert len(accessors(bao, "other")) >= 1 and other  # another role's secret_ids stay


def test_the_new_secret_id_says_who_issued_it(bao: Bao, seeded: Vault) -> None:
    """What an admin sees of a controller's secret_id in Vault (`read auth/approle/role/R/
    secret-id/lookup`): its metadata names gpunode's drift run."""
    rotate_secret_id(seeded, environ={})
    found = bao.client().auth.approle.read_secret_id(ROLE, on_disk(seeded))
    assert found["data"]["metadata"] == {"issued_by": "gpunode drift"}


def test_the_role_id_may_come_from_the_given_environment(bao: Bao, seeded: Vault) -> None:
    without = seeded.model_copy(update={"role_id": None})
    old = on_disk(seeded)
    rotation = rotate_secret_id(without, environ={"VAULT_ROLE_ID": bao.role_id})
    assert rotation.role == ROLE and on_disk(seeded) != old
    assert logs_in(bao, on_disk(seeded)) and not logs_in(bao, old)


def test_a_policy_without_destroy_keeps_the_new_one_and_says_so(bao: Bao, tmp_path: Path) -> None:
    role = "nodestroy"
    c = bao.client()
    c.sys.create_or_update_policy(
        role, f'path "auth/approle/role/{role}/secret-id" {{ capabilities = ["update"] }}\n'
    )
    c.auth.approle.create_or_update_approle(role, token_policies=[role])
    path = tmp_path / "secret_id"
    old = bao.secret_id(role)
    path.write_text(old + "\n")
    path.chmod(0o600)
    config = Vault(
        addr=bao.addr,
        role_id=c.auth.approle.read_role_id(role)["data"]["role_id"],
        secret_id_file=str(path),
        retries=0,
    )
    with pytest.raises(VaultError) as err:
        rotate_secret_id(config, environ={})
    assert str(err.value) == (
        f"vault: destroying the previous secret_id of AppRole role {role} (the new one is "
        f"already in {path}; the old one stays valid until its TTL): permission denied by "
        "Vault (allowed: a policy on this login that grants the capability on the path, see "
        "docs/secrets.md)"
    )
    new = path.read_text().strip()
    assert new != old and path.stat().st_mode & 0o777 == 0o600
    assert len(accessors(bao, role)) == 2  # both alive: the old one until its TTL
    destroy_all(bao, role)


# --- crashes ----------------------------------------------------------------------------


def test_a_crash_after_generating_before_writing_keeps_the_old_one(bao: Bao, seeded: Vault) -> None:
    old = on_disk(seeded)
    crash(seeded, "before-write")
    assert on_disk(seeded) == old  # the new one died with the process
    assert len(accessors(bao)) == 2  # the lost one lives until its TTL
    rotate_secret_id(seeded, environ={})  # the next run still logs in
    assert on_disk(seeded) != old and logs_in(bao, on_disk(seeded))
    assert not logs_in(bao, old)


def test_a_crash_before_the_rename_leaves_the_file_whole(bao: Bao, seeded: Vault) -> None:
    old = on_disk(seeded)
    path = Path(str(seeded.secret_id_file))
    crash(seeded, "before-rename")
    tmp = path.parent / f".{path.name}{ROTATED_SUFFIX}"
    assert tmp.exists() and tmp.stat().st_mode & 0o777 == 0o600
    assert on_disk(seeded) == old and logs_in(bao, old)
    rotate_secret_id(seeded, environ={})
    assert not tmp.exists()  # the crash's temporary file is gone
    assert logs_in(bao, on_disk(seeded)) and not logs_in(bao, old)


def test_a_crash_after_the_rename_before_destroying_keeps_the_new_one(
    bao: Bao, seeded: Vault
) -> None:
    old = on_disk(seeded)
    crash(seeded, "before-destroy")
    new = on_disk(seeded)
    assert new != old and logs_in(bao, new)
    assert logs_in(bao, old)  # not destroyed: it lives until its TTL (docs/controller.md)
    rotate_secret_id(seeded, environ={})
    assert logs_in(bao, on_disk(seeded)) and not logs_in(bao, new)


# --- when it stops ------------------------------------------------------------------------


def test_a_revoked_secret_id_fails_once_with_a_clear_message(bao: Bao, seeded: Vault) -> None:
    old = on_disk(seeded)
    destroy_all(bao)  # the admin revokes the controller
    before = logins(bao)
    with pytest.raises(VaultError) as err:
        rotate_secret_id(seeded, environ={})
    msg = str(err.value)
    assert msg == (
        "vault login (AppRole approle): Vault refused the request: invalid role or secret ID: "
        f"the controller's secret_id in {seeded.secret_id_file} no longer logs in: it was "
        "revoked, or it expired because no run replaced it within the role's secret_id_ttl, "
        "or this host's address is outside the role's bound CIDRs (allowed: a new secret_id "
        "of the role in that file, root-only; see docs/controller.md)"
    )
    assert old not in msg
    assert logins(bao) == before + 1  # a refusal is not retried (retries=3)
    assert on_disk(seeded) == old


def test_the_secret_id_dies_at_its_ttl_when_runs_stop(bao: Bao, tmp_path: Path) -> None:
    c = bao.client()
    c.sys.create_or_update_policy("short", documented_policy().replace(ROLE, "short"))
    c.auth.approle.create_or_update_approle("short", token_policies=["short"], secret_id_ttl="3s")  # noqa: S106
    path = tmp_path / "secret_id"
    path.write_text(bao.secret_id("short") + "\n")
    path.chmod(0o600)
    config = Vault(
        addr=bao.addr,
        role_id=c.auth.approle.read_role_id("short")["data"]["role_id"],
        secret_id_file=str(path),
        retries=0,
    )
    assert rotate_secret_id(config, environ={}).ttl == 3
    time.sleep(4)  # no run within the TTL
    with pytest.raises(VaultError, match="no longer logs in"):
        rotate_secret_id(config, environ={})


def test_an_unreachable_vault_is_said_as_it_is(seeded: Vault) -> None:
    down = seeded.model_copy(update={"addr": "http://127.0.0.1:9", "retries": 0})
    with pytest.raises(VaultError) as err:
        rotate_secret_id(down, environ={})
    assert "unreachable" in str(err.value) and "no longer logs in" not in str(err.value)


def test_the_policy_allows_nothing_but_plain_secret_ids_of_its_own_role(
    bao: Bao, seeded: Vault
) -> None:
    client = hvac.Client(url=bao.addr, token="", timeout=5)
    client.auth.approle.login(role_id=bao.role_id, secret_id=on_disk(seeded))
    for extra in ({"ttl": "1000h"}, {"cidr_list": "0.0.0.0/0"}, {"num_uses": 5}):
        with pytest.raises(hvac.exceptions.Forbidden):
            client.adapter.post(f"/v1/auth/approle/role/{ROLE}/secret-id", json=extra)
    with pytest.raises(hvac.exceptions.Forbidden):
        client.auth.approle.generate_secret_id("other")
    client.auth.token.revoke_self()


def test_a_secret_id_in_the_environment_is_refused(seeded: Vault) -> None:
    with pytest.raises(VaultError, match=r"\$VAULT_SECRET_ID is set"):
        rotate_secret_id(seeded, environ={"VAULT_SECRET_ID": "x"})


# --- config ---------------------------------------------------------------------------------


def inventory(vault: dict[str, object], drift: dict[str, object] | None = None) -> dict:
    return {
        "defaults": {
            "distro": "debian12",
            "firewall": {"enabled": False},
            "vault": {"addr": "https://vault.example.com:8200", **vault},
            "monitoring": {"drift": drift or {}},
        },
        "hosts": {"c1": {"connection": {"address": "192.0.2.10"}}},
    }


@pytest.mark.parametrize(
    "vault",
    [
        {"rotate_secret_id": True},
        {"rotate_secret_id": True, "auth": "token", "secret_id_file": "/var/lib/x/secret_id"},
    ],
)
def test_rotation_without_a_file_to_rotate_is_refused_at_load(vault: dict[str, object]) -> None:
    with pytest.raises(ConfigError, match=r"host c1: vault.rotate_secret_id: needs vault.auth"):
        load(inventory(vault), "inv.yml")


@pytest.mark.parametrize(
    "path",
    ["/etc/gpunode/controller/secret_id", "/var/lib/gpunode/secret_id", "/root/secret_id"],
)
def test_a_rotated_credential_outside_the_run_state_directory_is_refused_at_load(
    path: str,
) -> None:
    # /etc/gpunode/controller is where deploys put `credentials` back, and the run cannot
    # write elsewhere (ProtectSystem=strict): only its own state directory works
    drift = {"rotated_credentials": {path: "/root/seed"}}
    with pytest.raises(
        ConfigError,
        match=r"drift.rotated_credentials: .*: not a file in /var/lib/gpunode/controller",
    ):
        load(inventory({}, drift), "inv.yml")
    ok = {"rotated_credentials": {"/var/lib/gpunode/controller/secret_id": "/root/seed"}}
    assert load(inventory({}, ok), "inv.yml")


# --- the drift run ----------------------------------------------------------------------------


def test_the_drift_run_rotates_first_and_stops_cleanly_when_revoked(
    bao: Bao, seeded: Vault, tmp_path: Path
) -> None:
    """``gpunode drift`` rotates before it plans; revoked, it exits 1 with one line and
    touches no host (the fleet host here is a closed port: reaching it is an error too)."""
    (tmp_path / "fleet.yml").write_text(
        json.dumps(
            {
                "defaults": {
                    "distro": "debian12",
                    "firewall": {"enabled": False},
                    "vault": json.loads(seeded.model_dump_json(exclude_defaults=True)),
                },
                "hosts": {"n1": {"connection": {"address": "127.0.0.1", "port": 9}}},
            }
        )
    )
    (tmp_path / "fleet.py").write_text(
        "from gpunode.inventory import from_yaml\n_gpunode = from_yaml(__file__)\n"
        "globals().update(_gpunode.pyinfra_groups())\n"
    )
    (tmp_path / "noop.py").write_text("")

    def drift() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "gpunode.commands.cli",
                "drift",
                "fleet.py",
                "noop.py",
                "--prometheus",
                "drift.prom",
            ],
            cwd=tmp_path,
            env={"PATH": os.environ["PATH"], "PYTHONPATH": str(REPO_ROOT), "HOME": str(tmp_path)},
            capture_output=True,
            text=True,
            timeout=120,
            stdin=subprocess.DEVNULL,
        )

    old = on_disk(seeded)
    ran = drift()
    said = f"vault: the secret_id in {seeded.secret_id_file} (AppRole role {ROLE}) was replaced"
    assert said in ran.stdout, ran.stdout + ran.stderr
    assert "n1: error" in ran.stdout  # then it went on to the host
    new = on_disk(seeded)
    assert new != old and not logs_in(bao, old)

    destroy_all(bao)
    stopped = drift()
    assert stopped.returncode == 1
    said = [x for x in stopped.stderr.splitlines() if not x.startswith("gpunode: warning:")]
    assert len(said) == 1, stopped.stderr  # one line, no traceback
    assert said[0].startswith("gpunode drift: credential step: vault login"), said
    assert "no longer logs in" in said[0]
    assert "Traceback" not in stopped.stdout + stopped.stderr
    assert stopped.stdout == ""  # no host was checked or reported
    for text in (ran.stdout, ran.stderr, stopped.stdout, stopped.stderr):
        assert old not in text and new not in text
    assert "gpunode_drift_success 0" in (tmp_path / "drift.prom").read_text()
