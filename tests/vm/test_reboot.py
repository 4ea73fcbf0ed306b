"""What a reboot must keep: the kernel and fs sysctls gpunode sets, and the firewall, which
gpunode's boot unit loads before the network comes up. Containers share the machine's
kernel and never boot: only a VM shows these."""

from __future__ import annotations

import time
from typing import Any

import pytest

from gpunode import firewall as rules
from gpunode import hardening

from .conftest import DEPLOY, INVENTORY, VmLab, changed_ops, changes, figure, pyinfra_sudo

HOST = "gpu-02"


def snapshot(lab: VmLab, keys: list[str]) -> dict[str, Any]:
    sysctls = lab.ssh(HOST, f"sysctl {' '.join(keys)}", check=True).stdout
    return {
        "boot_id": lab.boot_id(HOST),
        "sysctl": {
            k.strip(): v.strip()
            for k, _, v in (line.partition("=") for line in sysctls.splitlines())
        },
        "ruleset": lab.ssh(HOST, f"nft -s list table inet {rules.NFT_TABLE}").stdout,
        "unit": lab.ssh(
            HOST,
            f"systemctl is-enabled {rules.FIREWALL_UNIT}; systemctl is-active "
            f"{rules.FIREWALL_UNIT} {rules.ROLLBACK_UNIT}.timer; true",
        ).stdout.split(),  # fmt: skip
    }


@pytest.fixture(scope="module")
def rebooted(converged: VmLab) -> dict[str, Any]:
    """gpu-02's sysctls, gpunode's nftables table and its units, before and after a reboot."""
    wanted = {k: str(v) for k, v in hardening.sysctl_settings(converged.config(HOST)).items()}
    before = snapshot(converged, sorted(wanted))
    seconds = converged.reboot(HOST)
    figure(f"reboot of {HOST} (until SSH answers)", seconds)
    after = snapshot(converged, sorted(wanted))
    assert after["boot_id"] != before["boot_id"]
    return {"wanted": wanted, "before": before, "after": after}


def test_sysctls_are_applied_and_still_in_place_after_a_reboot(rebooted: dict[str, Any]) -> None:
    wanted = rebooted["wanted"]
    # kernel-wide and fs keys are there (read-only in a container), with values unlike the
    # kernel's own defaults (kptr_restrict 0, sysrq 438 on Debian), so the boot applied them
    assert {"kernel.kptr_restrict", "kernel.sysrq", "fs.suid_dumpable"} <= set(wanted)
    assert (wanted["kernel.kptr_restrict"], wanted["kernel.sysrq"]) == ("2", "0")
    assert rebooted["before"]["sysctl"] == wanted
    assert rebooted["after"]["sysctl"] == wanted


def test_the_boot_unit_loads_the_firewall_before_the_network(
    converged: VmLab, rebooted: dict[str, Any]
) -> None:
    before, after = rebooted["before"], rebooted["after"]
    assert f"table inet {rules.NFT_TABLE}" in before["ruleset"]
    assert after["ruleset"] == before["ruleset"]  # the confirmed ruleset, as it was
    # enabled (the role loads the table itself, so before the first boot the unit has not
    # run); after the boot it ran (oneshot, remains active), and no rollback is armed
    assert before["unit"][0] == "enabled"
    assert after["unit"] == ["enabled", "active", "inactive"]
    shown = converged.ssh(
        HOST,
        f"systemctl show -P ActiveEnterTimestampMonotonic {rules.FIREWALL_UNIT}; "
        "systemctl show -P InactiveExitTimestampMonotonic networking.service",
        check=True,
    ).stdout.split()
    loaded, network_started = (int(v) for v in shown)
    assert 0 < loaded < network_started, shown  # the table was there before any interface


def test_a_deploy_after_the_reboot_changes_nothing(rebooted: dict[str, Any]) -> None:
    started = time.monotonic()
    done = pyinfra_sudo(INVENTORY, DEPLOY, "--limit", HOST)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-6000:]
    changed, bookkeeping = changed_ops(out)
    # nothing the roles manage changed; the seal may be written again: the first boot after
    # the first deploy starts the firewall's boot unit, which the deploy enabled but did not
    # start (inactive/dead, then active/exited; seen with `gpunode-seal check` on the VMs,
    # 2026-12-05), and a sealed unit's state is part of the seal. Later boots keep it.
    assert changed == bookkeeping, out[-6000:]
    assert changes(out)[1] == 0
    figure(f"deploy of {HOST} after its reboot ({len(bookkeeping)} bookkeeping changes)",
           time.monotonic() - started)  # fmt: skip
