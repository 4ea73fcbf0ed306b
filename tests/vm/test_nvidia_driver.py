"""The NVIDIA driver role's kernel paths on a GPU-less VM, from Debian's non-free archive
(the only NVIDIA source reachable here): DKMS builds the module for the running kernel, the
nouveau blacklist goes into the initramfs the role rebuilds, the VM boots that initramfs
(its own, through GRUB), the role says there is no GPU, and a second run changes nothing.

``nvidia.install: always`` is what a host gets whose GPU is not visible yet (a driver
installed before the card); ``kernel_modules: proprietary`` builds the smaller of Debian's two
DKMS packages (under software emulation the build is most of this test's time)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from gpunode import nvidia as nv

from .conftest import DEPLOY, VmLab, changed_ops, changes, figure, pyinfra_sudo

HOST = "gpu-01"
NVIDIA = {"install": "always", "source": "distro", "branch": "535", "kernel_modules": "proprietary"}
# the driver's kernel path only: Debian's CUDA toolkit (nvidia-cuda-toolkit) is gigabytes more
# to unpack under software emulation, after a driver install that alone took over 75 minutes
CUDA = {"toolkit": False}
NO_GPU = "no NVIDIA GPU found: installing anyway (nvidia.install: always)"
INITRD = "/boot/initrd.img-$(uname -r)"


def initrd(lab: VmLab) -> tuple[str, int]:
    """(sha256, size in bytes) of the running kernel's initramfs in /boot."""
    out = lab.ssh(HOST, f"sha256sum {INITRD} && stat -Lc %s {INITRD}", check=True).stdout.split()
    return out[0], int(out[2])


def pages(size: int) -> int:
    return -(-size // 4096)


@pytest.fixture(scope="module")
def driver(converged: VmLab) -> dict[str, Any]:
    """gpu-01 deployed with the driver (a first run: packages, DKMS build, initramfs), then
    rebooted; what was seen at each step."""
    lab = converged
    seen: dict[str, Any] = {"initrd_before": initrd(lab)}
    inventory, env = lab.inventory_with("nvidia", {"nvidia": NVIDIA, "cuda": CUDA})
    seen["inventory"], seen["env"] = inventory, env
    started = time.monotonic()
    first = pyinfra_sudo(inventory, DEPLOY, "--limit", HOST, env=env, timeout=4 * 3600)
    seen["first"] = first.stdout + first.stderr
    assert first.returncode == 0, seen["first"][-6000:]
    figure(
        f"first deploy of {HOST} with the NVIDIA driver (DKMS build)", time.monotonic() - started
    )
    seen["initrd_after"] = initrd(lab)
    seen["listing"] = lab.ssh(HOST, f"lsinitramfs {INITRD}", check=True).stdout.splitlines()
    seen["dkms"] = lab.ssh(HOST, "dkms status -k $(uname -r)", check=True).stdout
    seen["kernel"] = lab.ssh(HOST, "uname -r", check=True).stdout.strip()
    seen["reboot_seconds"] = lab.reboot(HOST)
    seen["freed"] = lab.ssh(HOST, "dmesg | grep -o 'Freeing initrd memory: [0-9]*K'").stdout
    seen["modinfo"] = lab.ssh(HOST, "modinfo -F version nvidia-current", check=True).stdout
    seen["loaded"] = lab.ssh(HOST, "cat /proc/modules", check=True).stdout
    return seen


def test_dkms_builds_the_module_for_the_running_kernel(driver: dict[str, Any]) -> None:
    assert NO_GPU in driver["first"]  # the role says why it installs on a GPU-less host
    built = [line for line in driver["dkms"].splitlines() if line.startswith("nvidia-current/")]
    assert len(built) == 1, driver["dkms"]
    assert f", {driver['kernel']}, x86_64: installed" in built[0], built
    version = built[0].split("/", 1)[1].split(",", 1)[0]
    assert driver["modinfo"].strip() == version  # depmod'ed for the kernel that booted
    assert "nvidia" not in driver["loaded"] and "nouveau" not in driver["loaded"]  # no GPU


def test_the_vm_boots_the_initramfs_with_the_nouveau_blacklist(driver: dict[str, Any]) -> None:
    blacklist = Path(nv.NOUVEAU_BLACKLIST).relative_to("/")
    assert str(blacklist) in driver["listing"]
    (sha_before, size_before), (sha_after, size_after) = (
        driver["initrd_before"],
        driver["initrd_after"],
    )
    assert sha_after != sha_before  # the role rebuilt it
    # the kernel frees the initrd it was booted with, page by page: the rebuilt file's size
    assert driver["freed"].split() == ["Freeing", "initrd", "memory:", f"{pages(size_after) * 4}K"]
    assert pages(size_after) != pages(size_before), "sizes too close to tell the two apart"


def test_a_second_run_changes_nothing_and_says_there_is_no_gpu(driver: dict[str, Any]) -> None:
    started = time.monotonic()
    again = pyinfra_sudo(driver["inventory"], DEPLOY, "--limit", HOST, env=driver["env"])
    out = again.stdout + again.stderr
    assert again.returncode == 0, out[-6000:]
    changed, bookkeeping = changed_ops(out)
    # the first run after the reboot: nothing the roles manage changed; the seal may be written
    # again (the first boot starts the firewall's boot unit), as in test_reboot.py
    assert changed == bookkeeping, out[-6000:]
    assert changes(out)[1] == 0
    assert NO_GPU in out
    figure(f"second deploy of {HOST} with the NVIDIA driver", time.monotonic() - started)
