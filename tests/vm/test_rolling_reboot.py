"""The rolling reboot the NVIDIA driver role runs (gpunode.operations.server.rolling_reboot)
on the two VMs: one host at a time, each back with a new boot and checked before the next
reboots; a host that fails its check, or does not come back, stops the rollout, and the host
after it is named and not rebooted.

The driver role itself reboots only where an NVIDIA GPU is present and its loaded module
differs from the installed one; a VM has no GPU (QEMU presents none with NVIDIA's vendor id,
and nvidia.ko refuses to load without one), so the role's trigger and its driver check are
covered by tests/unit/test_nvidia_roles.py and the operation's sequencing by
tests/unit/test_rolling_reboot.py. Here the same operation runs on real machines, over
pyinfra's SSH with sudo, with a check the test chooses."""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Iterator

import pytest

from .conftest import INVENTORY, VmLab, figure, pyinfra_sudo

DEPLOY = "tests/vm/rolling_reboot_deploy.py"
SHUT_OUT_TABLE = "gpunode_vmtest"  # an nftables table of the controller, while a test runs
CHECKED = "/run/gpunode-vmtest-checked"  # where the passing check leaves its time (tmpfs)


def boots(lab: VmLab) -> dict[str, str]:
    return {name: lab.boot_id(name) for name in lab.hosts}


def rolling(check: str, timeout: int, shut_out: str = "") -> tuple[int, str, float]:
    env = {
        "GPUNODE_VMTEST_CHECK": check,
        "GPUNODE_VMTEST_TIMEOUT": str(timeout),
        "GPUNODE_VMTEST_SHUT_OUT": shut_out,
        "GPUNODE_VMTEST_SHUT_OUT_TABLE": SHUT_OUT_TABLE,
    }
    started = time.monotonic()
    done = pyinfra_sudo(INVENTORY, DEPLOY, env=env, timeout=3600)
    return done.returncode, done.stdout + done.stderr, time.monotonic() - started


def lift_shut_out() -> None:
    subprocess.run(["nft", "delete", "table", "inet", SHUT_OUT_TABLE], capture_output=True)


def wait_for(lab: VmLab, name: str, timeout: float = 900) -> None:
    started = time.monotonic()
    while not lab.answers(name):
        if time.monotonic() - started > timeout:
            pytest.fail(f"{name} did not answer within {timeout:.0f} s")
        time.sleep(5)


@pytest.fixture
def lab(converged: VmLab) -> Iterator[VmLab]:
    lift_shut_out()
    yield converged
    lift_shut_out()
    for name in converged.hosts:
        wait_for(converged, name)


def test_each_vm_reboots_and_passes_its_check_before_the_next_reboots(lab: VmLab) -> None:
    before = boots(lab)
    rc, out, seconds = rolling(f"date +%s.%N > {CHECKED}", timeout=900)
    assert rc == 0, out[-6000:]
    figure(f"rolling reboot of {len(lab.hosts)} VMs", seconds)
    after = boots(lab)
    assert all(after[name] != before[name] for name in lab.hosts)
    seen: dict[str, dict[str, float]] = {}
    for name in lab.hosts:
        booted = lab.ssh(name, "awk '/^btime/ {print $2}' /proc/stat", check=True).stdout
        checked = lab.ssh(name, f"cat {CHECKED}", check=True).stdout
        seen[name] = {"booted": float(booted), "checked": float(checked)}
    first, second = sorted(seen, key=lambda name: seen[name]["booted"])
    # the second VM went down only after the first was back and had passed its check
    assert seen[first]["checked"] < seen[second]["booted"], seen
    assert seen[second]["checked"] >= seen[second]["booted"], seen


def test_a_vm_that_fails_its_check_stops_the_rollout_there(lab: VmLab) -> None:
    before = boots(lab)
    check = "echo 'gpunode-vmtest: the check fails on purpose' >&2; exit 1"
    rc, out, seconds = rolling(check, timeout=900)
    assert rc != 0, out[-6000:]
    after = boots(lab)
    rebooted = [name for name in lab.hosts if after[name] != before[name]]
    assert len(rebooted) == 1, (before, after)
    (first,) = rebooted
    (other,) = set(lab.hosts) - {first}
    assert "gpunode-vmtest: the check fails on purpose" in out
    assert re.search(rf"\[{other}\]\s+not rebooted: the rolling reboot stopped at {first},", out), (
        out[-6000:]
    )
    figure("rolling reboot stopped by a failed check", seconds)


def test_a_vm_that_does_not_come_back_stops_the_rollout_naming_it(lab: VmLab) -> None:
    before = boots(lab)
    rc, out, seconds = rolling("true", timeout=60, shut_out=",".join(lab.hosts.values()))
    assert rc != 0, out[-6000:]
    assert re.search(r"\[(\S+)\]\s+did not come back within 60 s of its reboot", out), out[-6000:]
    first = re.search(r"\[(\S+)\]\s+did not come back within 60 s", out)[1]  # type: ignore[index]
    (other,) = set(lab.hosts) - {first}
    assert re.search(rf"\[{other}\]\s+not rebooted: the rolling reboot stopped at {first},", out), (
        out[-6000:]
    )
    lift_shut_out()
    wait_for(lab, first)
    after = boots(lab)
    assert after[first] != before[first] and after[other] == before[other]
    assert 60 <= seconds < 60 + 300  # gave up near its timeout (plus the run's own set-up)
    figure("rolling reboot stopped by a VM that did not come back", seconds)
