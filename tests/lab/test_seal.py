"""The drift seal against the full plan on real lab hosts: every kind of drift the full plan
sees, the one-command seal check sees too (it then hands the host to the full plan, so the
two reports are the same), and a converged host is proven in one command.

Each case changes a converged host (or the controller's inputs), then compares
``gpunode drift`` (seal first) with ``gpunode drift --full`` (every host planned), then
corrects with ``--apply`` and checks the host is sealed again. The random cases perturb
files the seal holds, chosen by a seed that is printed (set GPUNODE_SEAL_SEED to replay).
"""

from __future__ import annotations

import json
import os
import random
import re
import shlex
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from gpunode.facts.seal import SEAL_SWITCH
from gpunode.paths import REPO_ROOT
from gpunode.sealcheck import UNITS_ARGV

from .conftest import Lab, changes, gpunode, pyinfra, root_vault
from .test_controller import overlay_working_tree

INVENTORY = "inventories/lab.py"
DEPLOY = "deploys/gpu_node.py"
NODE = "lab-02"
SEED = int(os.environ.get("GPUNODE_SEAL_SEED") or random.SystemRandom().randrange(10**6))
RANDOM_CASES = 6


@dataclass
class Checks:
    fast: dict  # the drift report (JSON) with the seal
    full: dict  # the drift report (JSON) with --full


@pytest.fixture(scope="module")
def sealed(lab: Lab) -> Lab:
    """The lab converged; the seal's shortcut on for every run of this module."""
    on = Lab(env={**lab.env, SEAL_SWITCH: "1"}, state_dir=lab.state_dir, hosts=lab.hosts)
    pyinfra(INVENTORY, DEPLOY, env=on.env, check=True)
    # the full plan (shortcut off) changes nothing, the seal included: written once
    again = pyinfra(INVENTORY, DEPLOY, env={**lab.env, SEAL_SWITCH: "0"}, check=True)
    assert changes(again.stdout + again.stderr) == (0, 0)
    return on


def test_a_deploy_of_a_sealed_node_plans_nothing(sealed: Lab) -> None:
    proc = pyinfra(INVENTORY, DEPLOY, "-v", env=sealed.env, check=True)
    out = proc.stdout + proc.stderr
    assert changes(out) == (0, 0)
    assert re.search(r"Drift seal\s+2\s", out), out[-2000:]  # the one operation per host
    assert "Base packages" not in out  # nothing else was planned


def report(lab: Lab, tmp: Path, *args: str, env: dict | None = None, cwd: Path | None = None):
    out = tmp / f"drift-{len(list(tmp.iterdir()))}.json"
    cmd = [sys.executable, "-m", "gpunode.commands.cli", "drift", INVENTORY, DEPLOY]
    proc = subprocess.run(
        [*cmd, *args, "--json", str(out)],
        cwd=cwd or REPO_ROOT,
        env={**os.environ, **lab.env, **(env or {})},
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=900,
    )
    assert proc.returncode in (0, 2), proc.stdout + proc.stderr
    return json.loads(out.read_text())["hosts"]


def both(lab: Lab, tmp: Path, **kw) -> Checks:
    return Checks(fast=report(lab, tmp, **kw), full=report(lab, tmp, "--full", **kw))


def assert_agree(checks: Checks, host: str = NODE, drift: bool = True) -> None:
    fast, full = checks.fast[host], checks.full[host]
    if full["drifted"]:
        # the full plan sees drift: the seal must not claim the host converged
        assert not fast["sealed"], (fast, full)
        assert fast["drifted"] == full["drifted"]
    if drift:
        assert full["drifted"] or not fast["sealed"], (fast, full)
    assert fast["seal"] or fast["sealed"]


def converge_and_prove(lab: Lab, tmp: Path) -> None:
    """--apply corrects the host (and renews its seal); the next check proves it in one go."""
    fixed = gpunode("drift", INVENTORY, DEPLOY, "--apply", env=lab.env, timeout=900)
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    hosts = report(lab, tmp)
    assert all(h["sealed"] for h in hosts.values()), hosts


def test_a_converged_host_is_proven_by_its_seal_in_one_command(sealed: Lab, tmp_path: Path) -> None:
    hosts = report(sealed, tmp_path)
    for name in ("lab-01", "lab-02"):
        assert hosts[name]["sealed"] and hosts[name]["drifted"] == [], hosts[name]
        assert hosts[name]["checked"] > 20  # what the seal holds, not an empty seal
    full = report(sealed, tmp_path, "--full")
    assert all(not h["drifted"] and not h["sealed"] for h in full.values())
    # the seal is root-only: it holds digests of private files
    mode = sealed.ssh(NODE, "stat -c '%a %U' /var/lib/gpunode/seal.json", check=True)
    assert mode.stdout.split() == ["600", "root"]


SEALED_UNITS = [
    "chrony.service",
    "prometheus-node-exporter.service",
    "gpunode-firewall.service",
    "gpunode-file-integrity.timer",
    "systemd-journald.service",
    "no-such-unit.service",
]


def test_each_units_block_of_the_one_systemctl_holds_what_its_reads_print(sealed: Lab) -> None:
    """The seal keeps named units' SystemdStatus/SystemdEnabled reads as ``unit`` entries, read
    by one ``systemctl show`` and split into one block per unit (gpunode/sealcheck.py
    ``unit_states``): on a real systemd the blocks come one per unit, in order, and each
    read's own command prints nothing that its unit's block does not hold."""
    from pyinfra.facts.systemd import SystemdEnabled, SystemdStatus

    out = sealed.ssh(NODE, shlex.join(UNITS_ARGV + SEALED_UNITS), check=True)
    assert out.stderr == ""
    blocks = out.stdout.rstrip("\n").split("\n\n")
    assert len(blocks) == len(SEALED_UNITS), out.stdout
    for unit, block in zip(SEALED_UNITS, blocks, strict=True):
        assert block.splitlines()[0] == f"Id={unit}"
        for fact in (SystemdStatus, SystemdEnabled):
            own = sealed.ssh(NODE, str(fact().command(services=[unit])), check=True)
            lines = [line for line in own.stdout.splitlines() if line]
            assert lines and set(lines) <= set(block.splitlines()), (unit, lines, block)


HOST_CASES: dict[str, str] = {
    "file content": "echo RateLimitBurst=1 >> /etc/systemd/journald.conf.d/50-gpunode.conf",
    "file mode": "chmod 0666 /etc/chrony/chrony.conf",
    "file owner": "chown nobody /etc/sudoers.d/90-gpunode-admins",
    "file removed": "rm -f /etc/apt/apt.conf.d/52gpunode-unattended-upgrades",
    "unit stopped": "systemctl stop prometheus-node-exporter.service",
    "unit disabled": "systemctl disable --quiet chrony.service",
    "package removed": "DEBIAN_FRONTEND=noninteractive apt-get remove -y -q jq >/dev/null",
    "sysctl changed": "sysctl -q -w net.ipv4.conf.all.accept_redirects=1",
    "firewall rule added": "nft add rule inet gpunode input tcp dport 4444 accept",
    "admin key added": (
        "echo 'ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKQzXqXbOeWqSmJHyG5Dq6Bw3cG0hX1mFk4r9Zt0Vb2r "
        "intruder' >> /home/labadmin/.ssh/authorized_keys"
    ),
    "secret file edited": "sed -i 's/=.*/=tampered/' /etc/gpunode/secrets/demo.env",
}


@pytest.mark.parametrize("case", list(HOST_CASES))
def test_drift_on_the_host_is_seen_by_the_seal(sealed: Lab, tmp_path: Path, case: str) -> None:
    sealed.ssh(NODE, HOST_CASES[case], check=True)
    checks = both(sealed, tmp_path)
    assert checks.full[NODE]["drifted"], f"{case}: the full plan saw nothing"
    assert_agree(checks)
    assert checks.fast["lab-01"]["sealed"]  # the other host stays proven in one command
    converge_and_prove(sealed, tmp_path)


def test_a_new_secret_version_in_vault_is_seen(sealed: Lab, tmp_path: Path) -> None:
    client = root_vault(sealed)
    spec = yaml.safe_load((REPO_ROOT / "inventories" / "lab.yml").read_text())
    secret = spec["defaults"]["secrets"]["demo"]
    client.secrets.kv.v2.create_or_update_secret(
        path=secret["path"],
        mount_point=secret.get("mount", "secret"),
        secret={secret["key"]: "rotated-by-the-seal-test"},
    )
    checks = both(sealed, tmp_path)
    assert "Vault" in checks.fast[NODE]["seal"], checks.fast[NODE]
    assert checks.full[NODE]["drifted"]
    assert_agree(checks)
    converge_and_prove(sealed, tmp_path)


def clone_with(tmp: Path, change: Callable[[Path], None]) -> Path:
    """This checkout (uncommitted changes included) cloned, then changed by ``change``: the
    controller's inputs moved (gpunode runs from the clone)."""
    clone = tmp / "repo"
    subprocess.run(["git", "clone", "-q", str(REPO_ROOT), str(clone)], check=True)
    overlay_working_tree(clone)
    change(clone)
    return clone


@pytest.mark.parametrize("what", ["a config value", "a template"])
def test_changed_inputs_on_the_controller_are_seen(sealed: Lab, tmp_path: Path, what: str) -> None:
    data = yaml.safe_load((REPO_ROOT / "inventories" / "lab.yml").read_text())
    env = {"GPUNODE_LAB_DIR": str(sealed.state_dir)}
    cwd = None
    if what == "a config value":
        data["defaults"]["base"]["journald"]["system_max_use"] = "123M"
        (tmp_path / "lab.yml").write_text(yaml.safe_dump(data))
        env["GPUNODE_LAB_DATA"] = str(tmp_path / "lab.yml")
    else:

        def edit(clone: Path) -> None:
            path = clone / "templates" / "base" / "journald.conf.j2"
            path.write_text(path.read_text() + "# changed by the seal test\n")

        cwd = clone_with(tmp_path, edit)
        env["PYTHONPATH"] = str(cwd)
    checks = both(sealed, tmp_path, env=env, cwd=cwd)
    assert not checks.fast[NODE]["sealed"]
    assert "changed" in checks.fast[NODE]["seal"]
    # from the clone (another commit) the provenance record would name it too
    provenance = "gpunode provenance | Provenance record"
    plan = [n for n in checks.full[NODE]["drifted"] if n != provenance]
    assert plan == ["gpunode base | journald limits"], checks.full
    assert_agree(checks)
    # back on this checkout's inputs: the hosts were not touched, they are still sealed
    hosts = report(sealed, tmp_path)
    assert all(h["sealed"] for h in hosts.values()), hosts


MUTATIONS = {
    # each one changes the file whatever an earlier case left (the full plan does not manage
    # every sealed file's mode or owner: a mode set by an earlier case may still be there)
    "chmod": 'if [ "$(stat -c %a {p})" = 604 ]; then chmod 0640 {p}; else chmod 0604 {p}; fi',
    "chown": 'if [ "$(stat -c %U {p})" = nobody ]; then chown root {p}; else chown nobody {p}; fi',
    "append": "printf '\\n# seal test\\n' >> {p}",
    "remove": "mv {p} {p}.seal-test-moved",
}


def sealed_files(lab: Lab) -> list[str]:
    """Regular files the seal holds that a test may change without breaking the host."""
    out = lab.ssh(
        NODE,
        "python3 -c 'import json; [print(e[1]) for e in "
        'json.load(open("/var/lib/gpunode/seal.json"))["entries"] if e[0] == "path"]\'',
        check=True,
    ).stdout.split()
    safe = ("/etc/gpunode/", "/etc/systemd/journald.conf.d/", "/etc/chrony/", "/etc/sysctl.d/")
    present = lab.ssh(NODE, " ".join(f"test -f {p} && echo {p};" for p in out)).stdout.split()
    return [p for p in present if p.startswith(safe)]


@pytest.mark.parametrize("n", range(RANDOM_CASES))
def test_random_perturbations_of_sealed_files(sealed: Lab, tmp_path: Path, n: int) -> None:
    rng = random.Random(SEED * 1000 + n)
    print(f"seal differential: GPUNODE_SEAL_SEED={SEED} case {n}")
    path = rng.choice(sealed_files(sealed))
    mutation = rng.choice(sorted(MUTATIONS))
    sealed.ssh(NODE, MUTATIONS[mutation].format(p=path), check=True)
    try:
        checks = both(sealed, tmp_path)
        fast = checks.fast[NODE]
        # the seal always sees a sealed file changed, whether the plan cares or not
        assert not fast["sealed"] and path in fast["seal"], (mutation, path, fast)
        assert_agree(checks, drift=False)
    finally:
        if mutation == "remove":
            sealed.ssh(NODE, f"mv -f {path}.seal-test-moved {path}")
    converge_and_prove(sealed, tmp_path)


def test_an_unsealable_host_gets_the_full_plan(sealed: Lab, tmp_path: Path) -> None:
    sealed.ssh(NODE, "rm -f /var/lib/gpunode/seal.json", check=True)
    hosts = report(sealed, tmp_path)
    assert not hosts[NODE]["sealed"] and hosts[NODE]["seal"] == "seal missing"
    assert hosts[NODE]["drifted"] == []
    converge_and_prove(sealed, tmp_path)
