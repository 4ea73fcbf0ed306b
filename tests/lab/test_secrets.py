"""Secrets from the lab's real OpenBao onto real lab hosts: deploy, leaks, rotation, failures.

A small real service on each host, ``gpunode-demo.service``, reads
``/etc/gpunode/secrets/demo.env`` (``EnvironmentFile=``) and serves ``/health`` on
127.0.0.1:8099 only when ``API_KEY`` is well-formed (32 or more URL-safe characters); with
a bad value it exits. The secret's ``restart`` names it with that health URL, so a bad
rotation fails its health check for real and takes the rollback path.

The tests run in file order on the session's lab; the last one stops the lab's OpenBao and
brings it back with ``gpunode lab up`` (which seeds it anew).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import hvac
import pytest
import yaml

from gpunode.commands.lab import LabState
from gpunode.paths import REPO_ROOT

from .conftest import Lab, changes, gpunode, planned_changes, pyinfra, run

INVENTORY = "inventories/lab.py"
DEPLOY = "deploys/gpu_node.py"
SECRETS_ONLY = "deploys/rotate_secrets.py"
DEST = "/etc/gpunode/secrets/demo.env"
HOSTS = ("lab-01", "lab-02")

DEMO_SERVICE = r"""#!/usr/bin/python3
# gpunode lab demo: healthy only with a well-formed API_KEY (never printed).
import http.server, os, re, sys
if not re.fullmatch(r"[A-Za-z0-9_-]{32,}", os.environ.get("API_KEY", "")):
    print("gpunode-demo: API_KEY is not well-formed", file=sys.stderr)
    sys.exit(1)
class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()
    def log_message(self, *args):
        pass
http.server.HTTPServer(("127.0.0.1", 8099), Health).serve_forever()
"""
DEMO_UNIT = """[Unit]
Description=gpunode lab demo service (needs a well-formed API_KEY)
[Service]
EnvironmentFile=/etc/gpunode/secrets/demo.env
ExecStart=/usr/bin/python3 /usr/local/bin/gpunode-demo
[Install]
WantedBy=multi-user.target
"""

ROTATE_POLICY = """
path "secret/data/gpunode/*" { capabilities = ["create", "read", "update"] }
path "secret/metadata/gpunode/*" { capabilities = ["read"] }
path "secret/destroy/gpunode/*" { capabilities = ["update"] }
"""


class SecretsLab:
    def __init__(self, lab: Lab, data_file: Path) -> None:
        self.lab = lab
        self.env = {**lab.env, "GPUNODE_LAB_DATA": str(data_file)}

    def creds(self) -> dict[str, str]:
        return json.loads((self.lab.state_dir / "vault.json").read_text())

    def root(self) -> hvac.Client:
        creds = self.creds()
        return hvac.Client(url=creds["addr"], token=creds["root_token"], timeout=5)

    def write(self, value: str) -> int:
        resp = self.root().secrets.kv.v2.create_or_update_secret(
            "gpunode/demo", {"api_key": value}, mount_point="secret"
        )
        return int(resp["data"]["version"])

    def approle(self, role: str, policy_hcl: str) -> dict[str, str]:
        """A role with its own policy; env for gpunode (role_id and secret_id override)."""
        c = self.root()
        c.sys.create_or_update_policy(role, policy_hcl)
        c.auth.approle.create_or_update_approle(role, token_policies=[role], token_ttl="10m")  # noqa: S106
        return {
            "VAULT_ROLE_ID": c.auth.approle.read_role_id(role)["data"]["role_id"],
            "VAULT_SECRET_ID": c.auth.approle.generate_secret_id(role)["data"]["secret_id"],
        }

    def ssh(self, host: str, command: str) -> str:
        return self.lab.ssh(host, command, check=True).stdout

    def file(self, host: str) -> tuple[str, str]:
        """(sha256 and inode, owner/group/mode) of the secret file on a host."""
        out = self.ssh(host, f"sha256sum {DEST} | cut -d' ' -f1; stat -c '%i' {DEST}; "
                       f"stat -c '%U %G %a' {DEST}")  # fmt: skip
        digest, inode, perms = out.splitlines()
        return f"{digest} {inode}", perms

    def main_pid(self, host: str) -> str:
        return self.ssh(host, "systemctl show -p MainPID --value gpunode-demo.service").strip()

    def healthy(self, host: str, within: int = 15) -> bool:
        """The demo service answers /health within ``within`` seconds: a restart returns
        once the process is started (Type=simple), before Python listens."""
        probe = (
            f"for i in $(seq {2 * within}); do "
            "curl -fsS -o /dev/null http://127.0.0.1:8099/health && exit 0; sleep 0.5; "
            "done; exit 1"
        )
        return self.lab.ssh(host, probe).returncode == 0

    def live_tokens(self, policy: str) -> int:
        c = self.root()
        count = 0
        for accessor in c.auth.token.list_accessors()["data"]["keys"]:
            try:
                info = c.auth.token.lookup_accessor(accessor)["data"]
            except hvac.exceptions.VaultError:
                continue
            count += policy in (info.get("policies") or [])
        return count


def env_line_sha(value: str) -> str:
    return hashlib.sha256(f"API_KEY={value}\n".encode()).hexdigest()


def derived_from(value: str) -> list[str]:
    """Digests of the value and of its env line that a log could carry."""
    out = []
    for data in (value.encode(), f"API_KEY={value}\n".encode()):
        out += [hashlib.new(a, data).hexdigest() for a in ("md5", "sha1", "sha256", "sha512")]
    return out


@pytest.fixture(scope="module")
def sl(lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecretsLab]:
    doc = yaml.safe_load((REPO_ROOT / "inventories" / "lab.yml").read_text())
    doc["defaults"]["secrets"]["demo"].update(
        restart=[{"name": "gpunode-demo.service", "health_url": "http://127.0.0.1:8099/health"}],
        health_timeout=8,
    )
    data = tmp_path_factory.mktemp("secrets") / "lab.yml"
    data.write_text(yaml.safe_dump(doc))
    s = SecretsLab(lab, data)
    install_demo(lab)
    yield s


def install_demo(lab: Lab) -> None:
    """The demo service on every host (again on a host the lab has rebuilt: ``gpunode lab
    up`` rebuilds a host whose systemd is not "running", e.g. degraded by a failed unit)."""
    for host in HOSTS:
        script = DEMO_SERVICE.replace("'", "'\\''")
        unit = DEMO_UNIT.replace("'", "'\\''")
        lab.ssh(
            host,
            f"printf '%s' '{script}' > /usr/local/bin/gpunode-demo && "
            f"printf '%s' '{unit}' > /etc/systemd/system/gpunode-demo.service && "
            "systemctl daemon-reload && systemctl enable -q gpunode-demo.service",
            check=True,
        )


def test_deploy_with_vvv_and_diff_leaks_the_secret_nowhere(sl: SecretsLab) -> None:
    canary = "CANARY" + secrets.token_urlsafe(32)
    version = sl.write(canary)
    tokens_before = sl.live_tokens("gpunode-read")
    for host in HOSTS:  # every command line on the node during the run, every 20 ms
        sl.ssh(
            host,
            "rm -f /root/ps.log; systemd-run -q --unit gpunode-ps-sampler sh -c "
            "'while :; do ps -eo args >> /root/ps.log; sleep 0.02; done'",
        )
    debug_log = REPO_ROOT / "pyinfra-debug.log"
    debug_log.unlink(missing_ok=True)
    # No -y: pyinfra detects changes (where --diff would print files), then asks to go on.
    proc = run(
        [*_pyinfra_cmd(), "-vvv", "--debug", "--diff", INVENTORY, DEPLOY],
        env=sl.env,
        input="\n",
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    assert "Secret file" in output and "Detected changes" in output
    places = {"pyinfra output (-vvv --debug --diff)": output}
    if debug_log.exists():
        places["pyinfra-debug.log"] = debug_log.read_text()
        debug_log.unlink()
    for host in HOSTS:
        sl.ssh(host, "systemctl stop gpunode-ps-sampler")
        places[f"{host} ps -eo args samples"] = sl.ssh(host, "cat /root/ps.log")
        places[f"{host} journal"] = sl.ssh(host, "journalctl -o verbose --no-pager")
        places[f"{host} auth/sshd logs"] = sl.ssh(host, "cat /var/log/auth.log 2>/dev/null; true")
    for place, text in places.items():
        assert canary not in text, f"the secret leaked into {place}"
        # finding 12: nor anything computed from it (the old fact printed the sha256 of the
        # env line at -vvv, an offline guessing oracle)
        for derived in derived_from(canary):
            assert derived not in text, f"a function of the secret was printed in {place}"
    for host in HOSTS:
        samples = places[f"{host} ps -eo args samples"]
        assert samples.count("\n") > 100 and "sshd" in samples  # the sampler really ran
        digest, perms = sl.file(host)
        assert digest.split()[0] == env_line_sha(canary)
        assert perms == "root root 640"
        assert sl.healthy(host)
        assert sl.ssh(host, "ls -A /etc/gpunode/secrets").split() == ["demo.env"]
        assert sl.ssh(host, "ls -A /tmp /var/tmp | grep -c gpunode-secret || true").strip() == "0"
        assert sl.ssh(host, "stat -c '%U %G %a' /etc/gpunode/secrets").strip() == "root root 750"
    assert version >= 2
    # The run's AppRole token was revoked at its end.
    assert sl.live_tokens("gpunode-read") == tokens_before


def _pyinfra_cmd() -> list[str]:
    return [sys.executable, "-m", "pyinfra"]


def test_second_deploy_changes_nothing(sl: SecretsLab) -> None:
    proc = pyinfra(INVENTORY, DEPLOY, env=sl.env, check=True)
    # The provenance record holds the repository's commit: in a checkout where commits
    # land between two runs it changes once; every secrets op must not.
    out = proc.stdout + proc.stderr
    for op in ("Secrets directory", "Secret file", "Restart a service whose secret changed"):
        assert re.search(rf"gpunode secrets \| {op}\s+2\s+-\s+-\s+2\s", out) or (
            op.startswith("Restart") and "Restart a service" not in out
        ), out[-3000:]
    assert changes(out)[1] == 0
    plan = planned_changes(INVENTORY, DEPLOY, sl.env)
    assert {h: [op for op in ops if "provenance" not in op] for h, ops in plan.items()} == {
        h: [] for h in plan
    }


def test_a_version_written_elsewhere_is_picked_up_by_the_next_deploy(sl: SecretsLab) -> None:
    value = secrets.token_urlsafe(32)
    sl.write(value)
    pids = {h: sl.main_pid(h) for h in HOSTS}
    plan = planned_changes(INVENTORY, DEPLOY, sl.env)
    # What a drift run sees: the file would change (its restart is a conditional change,
    # and the provenance record holds the new version number).
    allowed = {
        "gpunode secrets | Secret file",
        "gpunode secrets | Restart a service whose secret changed",
        "gpunode provenance | Provenance record",
    }
    assert sorted(plan) == list(HOSTS)
    for ops in plan.values():
        assert "gpunode secrets | Secret file" in ops and set(ops) <= allowed, ops
    proc = pyinfra(INVENTORY, SECRETS_ONLY, env=sl.env, check=True)
    assert value not in proc.stdout + proc.stderr
    for host in HOSTS:
        assert sl.file(host)[0].split()[0] == env_line_sha(value)
        assert sl.main_pid(host) != pids[host]  # restarted on the new value
        assert sl.healthy(host)
    proc = pyinfra(INVENTORY, SECRETS_ONLY, env=sl.env, check=True)
    assert changes(proc.stdout + proc.stderr) == (0, 0)


def test_rotate_across_two_hosts_then_in_one_batch(sl: SecretsLab) -> None:
    env = {**sl.env, **sl.approle("gpunode-rotate", ROTATE_POLICY)}
    before = {h: sl.file(h)[0] for h in HOSTS}
    old = sl.root().secrets.kv.v2.read_secret_metadata("gpunode/demo")["data"]["current_version"]
    proc = gpunode("rotate", INVENTORY, "demo", "--generate", "--destroy-old", env=env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    new = old + 1
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("lab-")]
    assert [ln.split(":")[0] for ln in lines] == ["lab-01", "lab-02"]  # host by host
    assert all(f"version {new}: healthy: gpunode-demo.service healthy after" in ln for ln in lines)
    assert f"secret demo: destroyed version {old}" in out
    data = sl.root().secrets.kv.v2.read_secret_version(
        "gpunode/demo", raise_on_deleted_version=True
    )["data"]
    value = data["data"]["api_key"]
    assert data["metadata"]["version"] == new and value not in out
    meta = sl.root().secrets.kv.v2.read_secret_metadata("gpunode/demo")["data"]
    assert meta["versions"][str(old)]["destroyed"] is True
    for host in HOSTS:
        assert sl.file(host)[0] != before[host]
        assert sl.file(host)[0].split()[0] == env_line_sha(value)
        assert sl.healthy(host)

    proc = gpunode("rotate", INVENTORY, "demo", "--generate", "--batch", "2", env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"wrote version {new + 1} " in proc.stdout
    assert all(sl.healthy(h) for h in HOSTS)


def test_a_rotation_that_breaks_health_stops_and_rolls_back(sl: SecretsLab) -> None:
    env = {**sl.env, **sl.approle("gpunode-rotate", ROTATE_POLICY)}
    before = {h: sl.file(h)[0] for h in HOSTS}
    old = sl.root().secrets.kv.v2.read_secret_metadata("gpunode/demo")["data"]["current_version"]
    bad = "not well-formed!"
    proc = gpunode("rotate", INVENTORY, "demo", "--value-from-stdin", env=env, input=bad + "\n")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert bad not in out
    assert f"lab-01: version {old + 1}: FAILED: " in out
    assert f"lab-01: rolled back to version {old}: healthy" in out
    assert "rotation stopped at lab-01; not touched: lab-02" in out
    assert "lab-02: version" not in out
    assert sl.file("lab-01")[0].split()[0] == before["lab-01"].split()[0]  # old content back
    assert sl.file("lab-02")[0] == before["lab-02"]  # never touched (same inode)
    assert all(sl.healthy(h) for h in HOSTS)
    # Vault's latest is the bad version: a good one goes back for the tests after this.
    sl.write(secrets.token_urlsafe(32))
    pyinfra(INVENTORY, SECRETS_ONLY, env=sl.env, check=True)


def _snapshot(sl: SecretsLab) -> dict[str, tuple[str, str, str]]:
    return {h: (*sl.file(h), sl.main_pid(h)) for h in HOSTS}


def _break_sudoers(sl: SecretsLab) -> None:
    # A change the base role (which runs before secrets) would repair: it must not.
    sl.ssh("lab-02", "rm -f /etc/sudoers.d/90-gpunode-admins")


def _sudoers_present(sl: SecretsLab) -> bool:
    return sl.lab.ssh("lab-02", "test -f /etc/sudoers.d/90-gpunode-admins").returncode == 0


def test_a_policy_that_denies_the_path_stops_the_run_before_anything_is_written(
    sl: SecretsLab,
) -> None:
    denied = sl.approle("gpunode-other", 'path "secret/data/other/*" { capabilities = ["read"] }\n')
    sl.write(secrets.token_urlsafe(32))  # a deploy would change the file
    snap = _snapshot(sl)
    _break_sudoers(sl)
    proc = pyinfra(INVENTORY, DEPLOY, env={**sl.env, **denied})
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1
    assert "secret demo (secret/gpunode/demo#api_key): permission denied by Vault" in out
    assert "--> Beginning operation run" not in out
    assert _snapshot(sl) == snap  # same file (inode), same service process
    assert not _sudoers_present(sl)
    pyinfra(INVENTORY, DEPLOY, env=sl.env, check=True)
    assert _sudoers_present(sl)


def test_a_missing_key_stops_the_run_before_anything_is_written(
    sl: SecretsLab, tmp_path: Path
) -> None:
    doc = yaml.safe_load(Path(sl.env["GPUNODE_LAB_DATA"]).read_text())
    doc["defaults"]["secrets"]["demo"]["key"] = "no_such_key"
    data = tmp_path / "lab.yml"
    data.write_text(yaml.safe_dump(doc))
    snap = _snapshot(sl)
    _break_sudoers(sl)
    proc = pyinfra(INVENTORY, DEPLOY, env={**sl.env, "GPUNODE_LAB_DATA": str(data)})
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1
    assert (
        "secret demo (secret/gpunode/demo#no_such_key): key 'no_such_key' is missing "
        "(keys there: api_key)"
    ) in out, out[-3000:]
    assert "--> Beginning operation run" not in out
    assert _snapshot(sl) == snap and not _sudoers_present(sl)
    pyinfra(INVENTORY, DEPLOY, env=sl.env, check=True)
    assert _sudoers_present(sl)


def test_a_wrapped_secret_id_works_once(sl: SecretsLab) -> None:
    wrapped = sl.root().auth.approle.generate_secret_id("gpunode", wrap_ttl="120s")
    env = {**sl.env, "VAULT_WRAPPED_SECRET_ID": wrapped["wrap_info"]["token"]}
    value = secrets.token_urlsafe(32)
    sl.write(value)
    first = pyinfra(INVENTORY, SECRETS_ONLY, env=env)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert all(sl.file(h)[0].split()[0] == env_line_sha(value) for h in HOSTS)
    sl.write(secrets.token_urlsafe(32))
    snap = _snapshot(sl)
    second = pyinfra(INVENTORY, SECRETS_ONLY, env=env)
    out = second.stdout + second.stderr
    assert second.returncode == 1
    assert "vault login: unwrapping $VAULT_WRAPPED_SECRET_ID" in out
    assert "a wrapping token works once" in out
    assert _snapshot(sl) == snap


def test_as_an_admin_user_with_sudo_no_file_is_ever_loose(sl: SecretsLab) -> None:
    value = secrets.token_urlsafe(32)
    sl.write(value)
    proc = pyinfra("--user", "labadmin", "--sudo", "-vv", INVENTORY, SECRETS_ONLY, env=sl.env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert value not in out
    for host in HOSTS:
        lines = [ln for ln in out.splitlines() if ln.startswith(f"[{host}] >>> ")]
        tmp = next(i for i, ln in enumerate(lines) if "install -m 640 -o root -g root -T" in ln)
        staging = [i for i, ln in enumerate(lines) if "umask 077 && mkdir -- /tmp/" in ln]
        copy = next(i for i, ln in enumerate(lines) if "sudo -H -n sh -c 'cp -- /tmp/" in ln)
        assert "sudo" in lines[tmp] and not any("sudo" in lines[i] for i in staging)
        # the temporary file and the login user's private staging directory both exist,
        # with their modes, before the copy
        assert tmp < copy and any(i < copy for i in staging)
        digest, perms = sl.file(host)
        assert (digest.split()[0], perms) == (env_line_sha(value), "root root 640")
        assert sl.ssh(host, "ls /tmp | grep -c gpunode-secret || true").strip() == "0"
        assert sl.healthy(host)


FAILING_CP = """#!/bin/sh
# lab: a cp that fails for gpunode's staged copies (in root's PATH only: /usr/local/sbin)
case "$*" in *gpunode*) echo "cp: forced failure" >&2; exit 1;; esac
exec /bin/cp "$@"
"""


def test_with_sudo_a_failed_copy_leaves_nothing_behind(sl: SecretsLab) -> None:
    """Finding 13: with --sudo, the staged /tmp/gpunode-secret-* stayed behind when the
    privileged copy failed. Now the staging and the temporary file go on every path."""
    sl.write(secrets.token_urlsafe(32))  # the deploy would change the file
    snap = _snapshot(sl)
    script = FAILING_CP.replace("'", "'\\''")
    for host in HOSTS:
        sl.ssh(host, f"printf '%s' '{script}' > /usr/local/sbin/cp && chmod 755 /usr/local/sbin/cp")
    try:
        proc = pyinfra("--user", "labadmin", "--sudo", INVENTORY, SECRETS_ONLY, env=sl.env)
    finally:
        for host in HOSTS:
            sl.ssh(host, "rm -f /usr/local/sbin/cp")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out[-3000:]
    assert "cp: forced failure" in out  # it was the copy that failed
    for host in HOSTS:
        assert sl.ssh(host, "ls -A /tmp /var/tmp | grep -c gpunode-secret || true").strip() == "0"
        assert sl.ssh(host, "ls -A /etc/gpunode/secrets").split() == ["demo.env"]
    assert _snapshot(sl) == snap  # same file (inode), same service process
    pyinfra(INVENTORY, SECRETS_ONLY, env=sl.env, check=True)


def test_an_empty_value_stops_the_run_before_anything_is_written(sl: SecretsLab) -> None:
    """Finding 13: an empty value was written as ``API_KEY=`` and the service ran without
    a key. Now the run stops while planning, naming the host, the secret and its path."""
    version = sl.write("")
    snap = _snapshot(sl)
    _break_sudoers(sl)
    proc = pyinfra(INVENTORY, DEPLOY, env=sl.env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1
    assert re.search(
        rf"host lab-0[12]: secret demo \(secret/gpunode/demo#api_key version {version}\): "
        r"the value in Vault is empty \(allowed: a non-empty value\)",
        out,
    ), out[-3000:]
    assert "Traceback" not in out and "--> Beginning operation run" not in out
    assert _snapshot(sl) == snap and not _sudoers_present(sl)
    sl.write(secrets.token_urlsafe(32))
    pyinfra(INVENTORY, DEPLOY, env=sl.env, check=True)
    assert _sudoers_present(sl) and all(sl.healthy(h) for h in HOSTS)


def _stop_vault(sl: SecretsLab) -> LabState:
    state = LabState.read(sl.lab.state_dir)
    assert state and state.vault_pid
    os.kill(state.vault_pid, signal.SIGTERM)
    deadline = time.monotonic() + 20
    while Path(f"/proc/{state.vault_pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    return state


def test_vault_down_in_the_middle_of_a_rotation_then_of_a_deploy(sl: SecretsLab) -> None:
    env = {**sl.env, **sl.approle("gpunode-rotate", ROTATE_POLICY)}
    # lab-01's service takes 3 s to start: Vault goes down while lab-01 is being restarted,
    # after the new version was written and read for lab-01, before lab-02's read.
    slow = "/etc/systemd/system/gpunode-demo.service.d"
    sl.ssh("lab-01", f"mkdir -p {slow} && printf '[Service]\\nExecStartPre=/bin/sleep 3\\n' "
           f"> {slow}/slow.conf && systemctl daemon-reload")  # fmt: skip
    old_01 = sl.file("lab-01")[0]
    snap_02 = _snapshot(sl)["lab-02"]
    rotate = subprocess.Popen(
        [sys.executable, "-m", "gpunode.commands.cli", "rotate", INVENTORY, "demo", "--generate"],
        cwd=REPO_ROOT,
        env={**os.environ, **env},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while sl.file("lab-01")[0] == old_01:
            assert time.monotonic() < deadline and rotate.poll() is None, "lab-01 never changed"
            time.sleep(0.1)
        state = _stop_vault(sl)
        out, _ = rotate.communicate(timeout=120)
        sl.ssh("lab-01", f"rm -rf {slow} && systemctl daemon-reload")
        assert rotate.returncode == 1, out
        assert re.search(r"^lab-01: version \d+: healthy: ", out, re.M), out
        assert (
            f"Vault at {state.vault_addr} is unreachable (ConnectionError) after 4 attempt(s); "
            "not touched: lab-02" in out
        ), out
        assert "secret demo: rotation stopped: secret demo (secret/gpunode/demo#api_key" in out
        assert _snapshot(sl)["lab-02"] == snap_02  # old file, same service process
        assert all(sl.healthy(h) for h in HOSTS)

        # A deploy now: it stops before anything is written anywhere.
        snap = _snapshot(sl)
        _break_sudoers(sl)
        proc = pyinfra(INVENTORY, DEPLOY, env=sl.env)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 1
        assert (
            "secret demo (secret/gpunode/demo#api_key): vault login (AppRole approle): "
            f"Vault at {state.vault_addr} is unreachable (ConnectionError) after 4 attempt(s)"
        ) in out, out[-3000:]
        assert "--> Beginning operation run" not in out
        assert _snapshot(sl) == snap  # old file, old service process: the old secret
        assert all(sl.healthy(h) for h in HOSTS)
        assert not _sudoers_present(sl)
    finally:
        if rotate.poll() is None:
            rotate.kill()
        up = gpunode("lab", "up", "--hosts", "2", env=sl.lab.env, check=True)  # seeds OpenBao anew
        install_demo(sl.lab)
    deploy = pyinfra(INVENTORY, DEPLOY, env=sl.env)
    assert deploy.returncode == 0, f"lab up said:\n{up.stdout}{up.stderr}\n{deploy.stdout[-3000:]}"
    assert _sudoers_present(sl)
    assert all(sl.healthy(h) for h in HOSTS)
