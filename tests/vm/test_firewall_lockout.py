"""The firewall's anti-lockout rollback on a real kernel: a ruleset that shuts the controller
out is loaded, the role's confirmation over a new SSH connection fails, and the rollback
timer (systemd-run on the VM) puts the confirmed ruleset back; the boot configuration never
changes. tests/lab/test_firewall.py runs the same against a container's network namespace."""

from __future__ import annotations

import socket
import time

from gpunode import firewall as rules

from .conftest import DEPLOY, INVENTORY, VmLab, changes, figure, pyinfra_sudo

HOST = "gpu-01"
# long enough that the run has ended, locked out, before the timer fires, even under TCG
ROLLBACK_SECONDS = 90


def can_connect(address: str, port: int, timeout: float) -> bool:
    try:
        with socket.create_connection((address, port), timeout=timeout):
            return True
    except OSError:
        return False


def boot_files(lab: VmLab) -> str:
    return lab.ssh(
        HOST,
        f"systemctl is-enabled {rules.FIREWALL_UNIT}; sha1sum {rules.FIREWALL_ACTIVE} "
        f"/etc/systemd/system/{rules.FIREWALL_UNIT}",
        check=True,
    ).stdout


def test_a_lockout_is_rolled_back_and_the_boot_ruleset_kept(converged: VmLab) -> None:
    lab, address = converged, converged.hosts[HOST]
    live = f"nft -s list table inet {rules.NFT_TABLE}"
    before, boot_before = lab.ssh(HOST, live, check=True).stdout, boot_files(lab)

    inventory, env = lab.inventory_with(
        "lockout",
        {
            "network": {"admin_cidrs": ["192.0.2.0/24"]},  # not the controller
            "firewall": {"force_admin_cidrs": True, "rollback_seconds": ROLLBACK_SECONDS},
        },
    )
    done = pyinfra_sudo(inventory, DEPLOY, "--limit", HOST, env=env)
    locked_at = time.monotonic()
    out = done.stdout + done.stderr
    assert done.returncode == 1, out[-6000:]
    assert f"host {HOST}: firewall: a new SSH connection from the controller failed" in out
    assert not can_connect(address, 22, timeout=3)  # really locked out

    while not can_connect(address, 22, timeout=3):
        assert time.monotonic() < locked_at + ROLLBACK_SECONDS + 180, "no rollback"
        time.sleep(2)
    figure(f"{HOST} locked out until the rollback (rollback_seconds {ROLLBACK_SECONDS})",
           time.monotonic() - locked_at)  # fmt: skip
    assert lab.ssh(HOST, live, check=True).stdout == before
    assert boot_files(lab) == boot_before
    rollback = lab.ssh(HOST, f"systemctl is-active {rules.ROLLBACK_UNIT}.timer; true").stdout
    assert rollback.strip() == "inactive"

    # the good settings again: the candidate the failed run left is replaced and confirmed
    # (changes), then a second run changes nothing
    good = pyinfra_sudo(INVENTORY, DEPLOY, "--limit", HOST)
    assert good.returncode == 0, (good.stdout + good.stderr)[-6000:]
    assert lab.ssh(HOST, live, check=True).stdout == before
    again = pyinfra_sudo(INVENTORY, DEPLOY, "--limit", HOST)
    out = again.stdout + again.stderr
    assert again.returncode == 0, out[-6000:]
    assert changes(out) == (0, 0), out[-6000:]
