"""The GPU stack from Debian 12's own archive, installed for real on a lab host.

deploys/gpu_stack.py (base, nvidia_driver, cuda) with tests/lab/data/gpu_stack.yml:
``nvidia.source: distro`` (the role adds the ``non-free`` sources), branch 535,
``nvidia.install: always`` (lab hosts have no GPU). The host is a systemd-nspawn
container, so what a container allows is asserted: packages, holds, the nouveau
blacklist, the initramfs left to the machine underneath, services enabled; no kernel
module is built and nothing reboots. The first run downloads about 1.7 GB (nvidia-driver
and nvidia-cuda-toolkit 11.8) and takes 5-6 minutes here; the second changes nothing.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from gpunode import nvidia as nv
from gpunode.facts.nvidia import UnheldPackages
from gpunode.paths import REPO_ROOT

from .conftest import Lab, changes, dry, gpunode, lab_env, planned_changes, pyinfra, require_root

INVENTORY = "inventories/lab.py"
DEPLOY = "deploys/gpu_stack.py"
DATA = REPO_ROOT / "tests" / "lab" / "data" / "gpu_stack.yml"


@pytest.fixture(scope="module")
def gpu_lab() -> Iterator[Lab]:
    require_root()
    base_env = lab_env("gpu", 5)
    env = {**base_env, "GPUNODE_LAB_DATA": str(DATA)}
    gpunode("lab", "down", env=env)
    up = gpunode("lab", "up", "--hosts", "1", env=env)
    if up.returncode != 0:
        pytest.fail(f"the lab did not start:\n{up.stdout}\n{up.stderr}")
    state_dir = REPO_ROOT / ".lab" / env["GPUNODE_LAB_NAME"]
    yield Lab(env=env, state_dir=state_dir, hosts=["lab-01"])
    gpunode("lab", "down", env=env, check=True)


@pytest.fixture(scope="module")
def first_run(gpu_lab: Lab) -> str:
    proc = pyinfra(INVENTORY, DEPLOY, env=gpu_lab.env, check=True, timeout=1800)
    output = proc.stdout + proc.stderr
    changed, errors = changes(output)
    assert errors == 0
    assert changed > 0
    return output


def sh(lab: Lab, command: str) -> str:
    return lab.ssh("lab-01", command, check=True).stdout


def test_driver_and_toolkit_come_from_debian_non_free(gpu_lab: Lab, first_run: str) -> None:
    versions = dict(
        line.split()
        for line in sh(
            gpu_lab,
            "dpkg-query -W -f='${Package} ${Version}\\n' nvidia-driver nvidia-kernel-dkms "
            "nvidia-persistenced nvidia-cuda-toolkit dkms",
        ).splitlines()
    )
    assert versions["nvidia-driver"].startswith("535.")
    assert versions["nvidia-kernel-dkms"] == versions["nvidia-driver"]
    assert versions["nvidia-cuda-toolkit"].startswith("11.8.89")
    assert "dkms" in versions
    policy = sh(gpu_lab, "apt-cache policy nvidia-driver")
    assert "/non-free amd64 Packages" in policy
    sources = sh(gpu_lab, f"cat {nv.DEBIAN_NONFREE_SOURCES}")
    assert "Components: contrib non-free non-free-firmware" in sources
    # proprietary modules only (kernel_modules: proprietary), nothing from NVIDIA's repository
    assert gpu_lab.ssh("lab-01", "dpkg-query -W nvidia-open-kernel-dkms").returncode != 0
    # and the base role's security suite, which the lab's debootstrapped hosts lack
    assert sh(gpu_lab, "ls /etc/apt/sources.list.d/").split() == [
        "gpunode-nvidia-distro.sources",
        "gpunode-security.list",
    ]


def test_every_nvidia_package_is_held(gpu_lab: Lab, first_run: str) -> None:
    held = set(sh(gpu_lab, "apt-mark showhold").split())
    assert {
        "nvidia-driver",
        "nvidia-kernel-dkms",
        "nvidia-persistenced",
        "libcuda1",
        "libnvidia-ml1",
        "nvidia-cuda-toolkit",
    } <= held
    # the role's own fact, run on the host: no installed NVIDIA package is left unheld
    unheld = sh(gpu_lab, UnheldPackages().command("apt", nv.FAMILIES["apt"].hold))
    assert unheld.split() == []
    # and apt really refuses to move them: another driver version needs held packages changed
    other = sh(gpu_lab, "apt-cache madison nvidia-driver | awk '{print $3}'").split()
    installed = sh(gpu_lab, "dpkg-query -W -f='${Version}' nvidia-driver").strip()
    (version,) = [v for v in other if v != installed]
    simulate = gpu_lab.ssh("lab-01", f"apt-get -s install nvidia-driver={version} 2>&1")
    assert "you have held broken packages" in simulate.stdout
    assert f"Inst nvidia-driver [{installed}] ({version}" not in simulate.stdout


def test_nouveau_blacklisted_and_the_initramfs_left_to_the_machine(
    gpu_lab: Lab, first_run: str
) -> None:
    assert sh(gpu_lab, f"grep -v '^#' {nv.NOUVEAU_BLACKLIST}").split("\n")[:2] == [
        "blacklist nouveau",
        "options nouveau modeset=0",
    ]
    # in a container: no initramfs is built (the kernel is the machine's), visibly
    assert "Rebuild the initramfs" in first_run
    assert sh(gpu_lab, "ls /boot").split() == []
    assert sh(gpu_lab, "command -v update-initramfs || true").strip() == ""


def test_services_enabled_and_no_module_build_in_a_container(gpu_lab: Lab, first_run: str) -> None:
    assert sh(gpu_lab, "systemctl is-enabled nvidia-persistenced").strip() == "enabled"
    # no kernel headers for this kernel in a container: dkms has the source, builds nothing
    assert "Kernel headers" in first_run and "NVIDIA driver: no NVIDIA GPU" in first_run
    assert "nvidia-current/535." in sh(gpu_lab, "dkms status")
    assert "installed" not in sh(gpu_lab, "dkms status")
    assert sh(gpu_lab, "ls /lib/modules 2>/dev/null || true").strip() == ""


def test_cuda_is_on_path_for_login_shells(gpu_lab: Lab, first_run: str) -> None:
    out = sh(gpu_lab, "bash -lc 'echo $CUDA_HOME; nvcc --version'")
    assert out.splitlines()[0] == nv.CUDA_TOOLKIT_DISTRO_HOME
    assert "release 11.8, V11.8.89" in out
    assert "NVIDIA Container Toolkit" in first_run and "DCGM" in first_run  # visible skips


def test_second_run_changes_nothing(gpu_lab: Lab, first_run: str) -> None:
    second = pyinfra(INVENTORY, DEPLOY, env=gpu_lab.env, check=True)
    assert changes(second.stdout + second.stderr) == (0, 0)
    assert planned_changes(INVENTORY, DEPLOY, gpu_lab.env) == {}


def test_default_lab_data_skips_the_gpu_stack_with_a_notice(gpu_lab: Lab, first_run: str) -> None:
    env = {k: v for k, v in gpu_lab.env.items() if k != "GPUNODE_LAB_DATA"}
    env["GPUNODE_LAB_DATA"] = str(REPO_ROOT / "inventories" / "lab.yml")
    plan = planned_changes(INVENTORY, DEPLOY, env)
    gpu_ops = [op for op in plan.get("lab-01", []) if "nvidia" in op or "cuda" in op]
    assert gpu_ops == []
    out = dry(INVENTORY, DEPLOY, env=env, check=True)  # the notices show in its table
    text = out.stdout + out.stderr
    assert "gpunode nvidia driver | NVIDIA driver: no NVIDIA GPU" in text
    assert "gpunode cuda | CUDA: no NVIDIA GPU" in text
    assert "NVIDIA driver packages" not in text
