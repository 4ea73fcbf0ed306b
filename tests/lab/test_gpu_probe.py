"""roles/gpu_probe.py on real lab hosts, which have no GPU: the probe is installed and says
"no GPU", gpu.required is enforced, and a second run leaves the role's operations unchanged."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
import yaml

from gpunode import probe
from gpunode.gpus import PROBE_SOURCE, pynvml_source

from .conftest import REPO_ROOT, Lab, planned_changes, pyinfra

INVENTORY = "inventories/lab.py"
DEPLOY = "deploys/gpu_node.py"
ROLE = "gpunode GPU probe | "


@pytest.fixture(scope="module")
def deployed(lab: Lab) -> Lab:
    pyinfra(INVENTORY, DEPLOY, env=lab.env, check=True)
    return lab


def test_probe_says_no_gpu(deployed: Lab) -> None:
    out = deployed.ssh("lab-01", probe.PROBE_PATH)
    report = json.loads(out.stdout)
    assert out.returncode == probe.EXIT_NO_GPU == report["exit_code"]
    assert report["status"] == "no_gpu"
    assert report["error"] == "nvmlInit: NVMLError_LibraryNotFound: NVML Shared Library Not Found"
    assert report["pci_gpus"] == []
    gate = deployed.ssh("lab-01", f"{probe.PROBE_PATH} --check --min-gpus 1")
    assert gate.returncode == probe.EXIT_NO_GPU
    assert "gpunode-probe: no_gpu: nvmlInit: NVMLError_LibraryNotFound" in gate.stderr
    assert deployed.ssh("lab-01", f"{probe.PROBE_PATH} --min-gpus 1").returncode == 64


def test_probe_files_as_installed(deployed: Lab) -> None:
    wanted = {
        probe.PROBE_PATH: ("root root 755", PROBE_SOURCE),
        f"{probe.LIB_DIR}/pynvml.py": ("root root 644", pynvml_source()),
    }
    for path, (owner_mode, source) in wanted.items():
        out = deployed.ssh(
            "lab-02", f"stat -c '%U %G %a' {path} && sha256sum {path}", check=True
        ).stdout.split("\n")
        assert out[0] == owner_mode, path
        assert out[1].split()[0] == hashlib.sha256(source.read_bytes()).hexdigest(), path
    listing = deployed.ssh("lab-02", f"ls -A {probe.LIB_DIR}", check=True).stdout.split()
    assert listing == ["__pycache__", "pynvml.py"]  # the probe itself writes no bytecode
    # pynvml's bytecode, compiled by the node's python3, hash-checked, and the one the
    # probe loads
    cache = deployed.ssh(
        "lab-02", f"cd {probe.LIB_DIR}/__pycache__ && stat -c '%U %G %a %n' *", check=True
    ).stdout.split("\n")[0]
    assert re.fullmatch(r"root root 644 pynvml\.cpython-3\d+\.pyc", cache), cache
    verbose = deployed.ssh("lab-02", f"python3 -v {probe.PROBE_PATH}")
    assert f"# code object from '{probe.LIB_DIR}/__pycache__/{cache.split()[-1]}'" in (
        verbose.stderr
    ), verbose.stderr[-3000:]


def test_second_run_plans_no_change_for_the_role(deployed: Lab) -> None:
    plan = planned_changes(INVENTORY, DEPLOY, deployed.env)
    assert {host: [op for op in ops if op.startswith(ROLE)] for host, ops in plan.items()} == {
        host: [] for host in plan
    }


def test_gpu_required_fails_a_gpu_less_host_clearly(deployed: Lab, tmp_path: Path) -> None:
    doc = yaml.safe_load((REPO_ROOT / "inventories" / "lab.yml").read_text())
    doc["defaults"]["gpu"] = {"required": True}
    data = tmp_path / "lab.yml"
    data.write_text(yaml.safe_dump(doc))
    env = {**deployed.env, "GPUNODE_LAB_DATA": str(data)}
    proc = pyinfra(INVENTORY, DEPLOY, "--limit", "lab-01", env=env)
    assert proc.returncode == 1
    # The first role that looks for the GPU fails the host (the driver role, before the probe
    # role; roles/gpu_probe.py's own message is checked in tests/unit/test_gpu_fact.py).
    assert (
        "gpunode: host lab-01: gpu.required: true, but no NVIDIA GPU was found "
        "(no NVIDIA device, vendor 10de, on the PCI bus; allowed: fix the hardware, or set "
        "gpu.required: false)"
    ) in proc.stdout + proc.stderr
