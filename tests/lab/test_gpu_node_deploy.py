"""deploys/gpu_node.py on real lab hosts: converge, converge again with 0 changes, verify."""

from __future__ import annotations

import xml.etree.ElementTree as ET  # noqa: S405

import pytest

from .conftest import Lab, changes, gpunode, planned_changes, pyinfra, umask_027_sessions

INVENTORY = "inventories/lab.py"
DEPLOY = "deploys/gpu_node.py"


@pytest.fixture(scope="module")
def converged(lab: Lab) -> Lab:
    umask_027_sessions(lab, "lab-01")  # lab-02 keeps Debian's stock 022
    first = pyinfra(INVENTORY, DEPLOY, env=lab.env, check=True)
    changed, errors = changes(first.stdout + first.stderr)
    assert errors == 0
    assert changed > 0, "fresh hosts must need changes on the first run"
    return lab


def test_second_deploy_changes_nothing_on_every_host(converged: Lab) -> None:
    second = pyinfra(INVENTORY, DEPLOY, env=converged.env, check=True)
    op, changed = "", []
    for line in second.stdout.splitlines():  # which operations changed, to say so on failure
        if "Starting operation" in line:
            op = line.strip()
        elif "] Success" in line:
            changed.append(f"{op} {line.strip()}")
    assert changes(second.stdout + second.stderr) == (0, 0), "\n".join(changed[-20:])
    # And per host, from pyinfra's own plan: no operation would change on any host.
    assert planned_changes(INVENTORY, DEPLOY, converged.env) == {}


def test_verify_passes_on_every_host(converged: Lab, tmp_path) -> None:
    junit = tmp_path / "verify.xml"
    proc = gpunode("verify", INVENTORY, "--junit", str(junit), env=converged.env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for name in converged.hosts:
        assert f"{name}: ok: " in proc.stdout
    suites = ET.parse(junit).getroot().findall("testsuite")  # noqa: S314
    assert sorted(s.get("name") for s in suites) == converged.hosts
    assert all(int(s.get("tests", 0)) >= 10 and s.get("failures") == "0" for s in suites)


def test_verify_catches_a_broken_host_and_a_deploy_repairs_it(converged: Lab) -> None:
    converged.ssh(
        "lab-02",
        "rm /etc/sudoers.d/90-gpunode-admins && "
        "sed -i s/SystemMaxUse=.*/SystemMaxUse=9G/ /etc/systemd/journald.conf.d/50-gpunode.conf",
        check=True,
    )
    broken = gpunode("verify", INVENTORY, env=converged.env)
    assert broken.returncode == 1
    assert "lab-01: ok: " in broken.stdout
    # sudoers, sudo, journald, and AIDE, which finds both files changed since the deploy
    assert "lab-02: FAILED: " in broken.stdout and "4 failed" in broken.stdout
    drift = planned_changes(INVENTORY, DEPLOY, converged.env)
    assert set(drift) == {"lab-02"}
    assert sorted(drift["lab-02"]) == [
        "gpunode base | journald limits",
        "gpunode base | sudo for the admin group",
    ]
    pyinfra(INVENTORY, DEPLOY, env=converged.env, check=True)
    assert gpunode("verify", INVENTORY, "--limit", "lab-02", env=converged.env).returncode == 0


def test_declared_distro_must_match_the_host(converged: Lab, tmp_path) -> None:
    data = tmp_path / "lab.yml"
    # (no network CIDRs here: the firewall, on by default, is off for this one check)
    data.write_text(
        "defaults:\n  distro: ubuntu2204\n  firewall: {enabled: false}\ngroups:\n  gpu_nodes: {}\n"
    )
    proc = pyinfra(INVENTORY, DEPLOY, env={**converged.env, "GPUNODE_LAB_DATA": str(data)})
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1
    assert "distro: declared ubuntu2204, but the host runs debian 12" in out
    assert "Base packages" not in out  # nothing was planned past the check


def test_admin_user_logs_in_with_its_key_and_uses_sudo(converged: Lab) -> None:
    proc = converged.ssh("lab-01", "true")  # root via the lab key
    assert proc.returncode == 0
    cfg = converged.state_dir / "ssh_config"
    from .conftest import run

    out = run(["ssh", "-F", str(cfg), "-l", "labadmin", "lab-01", "sudo -n id -u"], check=True)
    assert out.stdout.strip() == "0"


HOLD_APT_LISTS_LOCK = (
    "python3 -c 'import fcntl, os, sys, time\n"
    'fd = os.open("/var/lib/apt/lists/lock", os.O_RDWR | os.O_CREAT, 0o640)\n'
    "fcntl.lockf(fd, fcntl.LOCK_EX)\n"
    'open("/run/gpunode-test-held", "w").close()\n'
    "time.sleep(float(sys.argv[1]))' {seconds} </dev/null >/dev/null 2>&1 &\n"
    "while [ ! -e /run/gpunode-test-held ]; do sleep 0.1; done; rm -f /run/gpunode-test-held\n"
)


def test_an_apt_update_waits_while_another_apt_holds_its_lock(converged: Lab) -> None:
    """The roles' apt_update on a real apt whose lists lock another process holds (as the daily
    update does): apt-get update alone fails at once, even with DPkg::Lock::Timeout set; the
    operation waits for the lock and then succeeds."""
    import time

    from gpunode.operations.packages import apt_update_command

    host = "lab-02"
    plain = converged.ssh(host, HOLD_APT_LISTS_LOCK.format(seconds=3) + "LC_ALL=C apt-get update")
    assert plain.returncode == 100 and "Could not get lock /var/lib/apt/lists/lock" in plain.stderr
    time.sleep(3)
    start = time.monotonic()
    waited = converged.ssh(
        host, HOLD_APT_LISTS_LOCK.format(seconds=6) + apt_update_command(wait_s=120, retry_s=1)
    )
    took = time.monotonic() - start
    assert waited.returncode == 0, waited.stdout + waited.stderr
    assert "another apt process holds its lock" in waited.stderr
    assert "Reading package lists..." in waited.stdout
    assert took >= 5, took
