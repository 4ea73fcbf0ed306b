"""The GpuProbe fact and the gpu_probe role.

The fact's command is run for real by ``sh`` here: without the probe (it lists NVIDIA GPUs
on this machine's PCI bus, or on a sysfs tree built from a GPU machine's recording), with
a copy of the probe whose NVML finds no driver library (this machine has none), and with
a probe that cannot start. Outputs recorded on real GPU machines
(tests/unit/fixtures/gpu/*/fact*.out, by scripts/record_gpu_fixtures.py) are parsed too.

The role runs through pyinfra's real API against the ``@fake`` connector of
tests/unit/harness.py, answered with those real fact outputs.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from fake_nvml import recordings, sysfs_tree
from harness import Run, converged, run_deploys

from gpunode import probe
from gpunode.config import load
from gpunode.facts.nvidia import GpuProbe, parse_probe_output
from gpunode.facts.server import PythonBytecode
from gpunode.gpus import PROBE_SOURCE, capacity, capacity_from_report, pynvml_source, sees_no_gpu
from gpunode.planner import check_placement
from gpunode.schema.gpu import GPU_MODELS
from gpunode.schema.node import NodeConfig
from gpunode.schema.planner import ModelFootprint
from gpunode.schema.types import ConfigError
from roles.gpu_probe import gpu_probe

HOST = "gpu-01"


def fact_output(probe_path: Path | str, sysfs: Path | None = None) -> list[str]:
    """The fact's real command, run by sh, with the probe at ``probe_path`` (and the PCI
    sysfs folder replaced by ``sysfs``); its stdout lines, as pyinfra gives them to process()."""
    command = probe.FACT_COMMAND.format(probe=probe_path)
    if sysfs is not None:
        assert command.count("/sys/bus/pci/devices") == 1, "FACT_COMMAND changed: update this"
        command = command.replace("/sys/bus/pci/devices", str(sysfs))
    proc = subprocess.run(["sh", "-c", command], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc  # a fact command must never fail
    return proc.stdout.splitlines()


def install_probe(folder: Path, interpreter: str = sys.executable) -> Path:
    """A copy of the probe like the role installs it, run by ``interpreter``."""
    path = folder / "gpunode-probe"
    path.write_text(f"#!{interpreter}\n" + PROBE_SOURCE.read_text().split("\n", 1)[1])
    path.chmod(0o755)
    return path


RECORDINGS = recordings()


# --- the fact ----------------------------------------------------------------------------


def test_fact_command_is_the_probe_on_the_node() -> None:
    command = GpuProbe().command()
    assert command == probe.FACT_COMMAND.format(probe="/usr/local/sbin/gpunode-probe")


def test_without_the_probe_the_fact_lists_this_machines_pci_gpus(tmp_path: Path) -> None:
    report = parse_probe_output(fact_output(tmp_path / "not-installed"))
    assert report["status"] == "not_installed"
    assert report["exit_code"] is None
    assert report["pci_gpus"] == probe.pci_nvidia_gpus()
    assert sees_no_gpu(report) == (report["pci_gpus"] == [])


def test_probe_without_nvml_library_reports_no_gpu(tmp_path: Path) -> None:
    # this machine: pynvml installed, no libnvidia-ml.so.1, no NVIDIA GPU on the PCI bus
    if probe.pci_nvidia_gpus():
        pytest.skip("this machine has an NVIDIA GPU")
    report = parse_probe_output(fact_output(install_probe(tmp_path)))
    assert report["status"] == "no_gpu"
    assert report["exit_code"] == probe.EXIT_NO_GPU
    assert "NVMLError_LibraryNotFound" in report["error"]
    assert report["gpus"] == [] and report["gpu_count"] == 0
    assert sees_no_gpu(report)


def test_probe_that_cannot_start_is_not_mistaken_for_no_gpu(tmp_path: Path) -> None:
    report = parse_probe_output(fact_output(install_probe(tmp_path, "/nonexistent/python3")))
    assert report["status"] == "probe_failed"
    assert report["exit_code"] in (126, 127)  # sh: cannot execute / not found
    assert not sees_no_gpu(report)


def test_unexpected_output_is_an_error() -> None:
    with pytest.raises(ValueError, match="unexpected output"):
        parse_probe_output(["something else"])


@pytest.mark.parametrize("folder", RECORDINGS, ids=lambda p: p.name)
def test_recorded_pci_bus_through_the_fact_command(folder: Path, tmp_path: Path) -> None:
    devices = json.loads((folder / "nvml.json").read_text())["sysfs_pci_nvidia"]
    sysfs = sysfs_tree(tmp_path / "devices", devices)
    report = parse_probe_output(fact_output(tmp_path / "not-installed", sysfs))
    assert report["pci_gpus"] == probe.pci_nvidia_gpus(str(sysfs))
    assert report["pci_gpus"], "a GPU machine shows its GPUs on the PCI bus"
    assert not sees_no_gpu(report)


@pytest.mark.parametrize("folder", RECORDINGS, ids=lambda p: p.name)
def test_recorded_fact_outputs(folder: Path) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    report = parse_probe_output((folder / "fact.out").read_text().splitlines())
    direct = json.loads((folder / "probe.out").read_text())
    assert report["exit_code"] == manifest["steps"]["probe.out"]["rc"] == direct["exit_code"]
    assert report["status"] in ("healthy", "degraded")
    assert report["gpu_count"] == len(report["gpus"]) >= 1
    assert report["driver_version"] == direct["driver_version"]
    assert [g["uuid"] for g in report["gpus"]] == [g["uuid"] for g in direct["gpus"]]
    assert not sees_no_gpu(report)
    absent = parse_probe_output((folder / "fact-not-installed.out").read_text().splitlines())
    assert absent["status"] == "not_installed" and absent["pci_gpus"]


# --- the role ----------------------------------------------------------------------------


def node_config(**gpu: Any) -> NodeConfig:
    raw = {
        # the firewall (on by default) is the firewall role's: not this role's concern
        "defaults": {"distro": "debian12", "gpu": gpu, "firewall": {"enabled": False}},
        "hosts": {HOST: {"connection": {"address": "192.0.2.10"}}},
    }
    return load(raw, source="test_gpu_fact").hosts[HOST].config


def run_role(config: NodeConfig, fact: list[str], handlers: list[Any] | None = None) -> Run:
    responses = {GpuProbe().command(): fact}
    return run_deploys(config, responses, [gpu_probe], handlers or [], host_name=HOST)


@pytest.fixture(scope="module")
def no_gpu_fact(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """The real fact output of a GPU-less host before the probe is installed (an empty
    PCI sysfs: this machine's own, when it has no NVIDIA GPU)."""
    sysfs = tmp_path_factory.mktemp("devices")
    return fact_output(sysfs / "not-installed", sysfs)


def test_role_installs_the_probe_and_pynvml(no_gpu_fact: list[str]) -> None:
    run = run_role(node_config(), no_gpu_fact)
    assert not run.failed
    assert run.files[probe.PROBE_PATH] == PROBE_SOURCE.read_text()
    assert run.files[f"{probe.LIB_DIR}/pynvml.py"] == pynvml_source().read_text()
    assert run.files[probe.PROBE_PATH].startswith("#!/usr/bin/python3\n")
    assert run.grep(r"chmod 755 /usr/local/sbin/gpunode-probe")
    assert run.grep(r"chmod 644 /usr/local/lib/gpunode/pynvml\.py")
    assert run.grep(r"apt-get .*install.* python3")
    # its bytecode, compiled by the node's python3 once pynvml.py is in place
    compiled = [i for i, c in enumerate(run.commands) if "CHECKED_HASH" in c]
    put = [i for i, c in enumerate(run.commands) if "chmod 644 /usr/local/lib/gpunode/pynvml" in c]
    assert len(compiled) == 1 and put and put[0] < compiled[0]
    assert run.commands[compiled[0]].endswith(" /usr/local/lib/gpunode/pynvml.py")
    assert run.grep(r"mkdir -p /usr/local/lib/gpunode/__pycache__")


def test_gpu_less_host_not_required_is_a_visible_skip(no_gpu_fact: list[str]) -> None:
    run = run_role(node_config(required=False), no_gpu_fact)
    assert not run.failed
    assert "gpunode GPU probe | GPU stack" in run.op_labels
    assert not any("exit 1" in c for c in run.commands)


def test_gpu_less_host_when_required_fails_with_a_clear_message(
    no_gpu_fact: list[str],
) -> None:
    run = run_role(node_config(required=True), no_gpu_fact)
    assert run.failed
    failures = [out for _, ok, out in run.results if not ok]
    assert len(failures) == 1
    assert failures[0].stderr == (
        f"gpunode: host @fake/{HOST}: gpu.required is true but the host has no NVIDIA GPU "
        "(none on the PCI bus) (allowed: a host with an NVIDIA GPU, or gpu.required: false "
        "for a GPU-less host)"
    )


@pytest.mark.parametrize("folder", RECORDINGS, ids=lambda p: p.name)
def test_gpu_host_passes_quietly(folder: Path) -> None:
    fact = (folder / "fact.out").read_text().splitlines()
    run = run_role(node_config(required=True, count=1), fact)
    assert not run.failed
    assert "gpunode GPU probe | GPU stack" not in run.op_labels


def test_converged_host_gets_no_change(no_gpu_fact: list[str]) -> None:
    dpkg = subprocess.run(["dpkg", "-l", "python3"], capture_output=True, text=True)
    if dpkg.returncode != 0:
        pytest.skip("no dpkg here to answer the package fact with")
    pyc = f"{probe.LIB_DIR}/__pycache__/pynvml.cpython-311.pyc"
    files = {
        probe.PROBE_PATH: PROBE_SOURCE.read_text(),
        f"{probe.LIB_DIR}/pynvml.py": pynvml_source().read_text(),
        pyc: "bytecode",
    }
    modes = {probe.PROBE_PATH: "755", f"{probe.LIB_DIR}/pynvml.py": "644"}
    bytecode = PythonBytecode().command(path=f"{probe.LIB_DIR}/pynvml.py")
    source = hashlib.sha256(pynvml_source().read_bytes()).hexdigest()

    def packages(command: str) -> Any:
        if command.endswith(bytecode):
            return f"state=current pyc={pyc} source={source}"
        return dpkg.stdout if "dpkg -l" in command else None

    run = run_role(node_config(), no_gpu_fact, [converged(files, modes), packages])
    assert not run.failed
    assert run.uploads == []
    assert not run.grep(r"apt-get|chmod|chown|mkdir")


# --- the gpu section ------------------------------------------------------------------------


def load_error(**gpu: Any) -> str:
    with pytest.raises(ConfigError) as exc:
        node_config(**gpu)
    return str(exc.value)


def test_unknown_gpu_model_is_refused_at_load_with_the_allowed_list() -> None:
    message = load_error(model="H100")
    assert message.startswith("test_gpu_fact: defaults: gpu.model: ")  # where it was written
    assert "'H100' is not a GPU model gpunode knows" in message
    assert "allowed: H100-SXM-80GB, H100-PCIE-80GB" in message


def test_required_with_zero_gpus_is_refused() -> None:
    message = load_error(required=True, count=0)
    assert "gpu.count: 0 contradicts gpu.required: true" in message
    assert f"host {HOST}" in message


def test_model_with_zero_gpus_is_refused() -> None:
    assert "gpu.count: 0 contradicts gpu.model: L4-24GB" in load_error(model="L4-24GB", count=0)


def test_fabric_manager_on_a_gpu_less_host_is_refused() -> None:
    assert "gpu.fabric_manager: true on a host declared GPU-less" in load_error(fabric_manager=True)


@pytest.mark.parametrize(
    ("gpu", "declares"),
    [
        ({}, False),
        ({"required": False, "count": 0}, False),
        ({"required": True}, True),
        ({"count": 2}, True),
        ({"model": "L4-24GB"}, True),
    ],
)
def test_declared_gpu_less(gpu: dict[str, Any], declares: bool) -> None:
    assert node_config(**gpu).gpu.declares_gpu is declares


def test_capacity_from_the_declared_model() -> None:
    assert capacity(node_config(model="H100-SXM-80GB", count=8)) == (85_520_809_984, 8)
    assert capacity(node_config(model="L40S-48GB")) == (48 * 2**30, 1)
    assert capacity(node_config(count=2)) is None


@pytest.mark.parametrize("folder", RECORDINGS, ids=lambda p: p.name)
def test_gpu_model_table_matches_the_recorded_gpu(folder: Path) -> None:
    device = json.loads((folder / "nvml.json").read_text())["devices"][0]
    name = device["nvmlDeviceGetName()"]["result"]
    total = device["nvmlDeviceGetMemoryInfo()"]["result"]["fields"]["total"]
    rows = [m for m in GPU_MODELS.values() if name in m.nvml_names]
    assert len(rows) == 1, name
    assert rows[0].memory_bytes == total
    assert 0.99 * rows[0].memory_gib * 2**30 < total <= rows[0].memory_gib * 2**30


@pytest.mark.parametrize("folder", RECORDINGS, ids=lambda p: p.name)
def test_placement_on_the_recorded_gpu(folder: Path) -> None:
    report = parse_probe_output((folder / "fact.out").read_text().splitlines())
    have = capacity_from_report(report)
    assert have is not None
    per_gpu, count = have
    llama2_7b = ModelFootprint(parameters=6_738_415_616, dtype="fp16", batch=8)
    assert check_placement(f"host {HOST}", HOST, "chat", llama2_7b, per_gpu, count) == []
    llama2_70b = ModelFootprint(parameters="70B", dtype="fp16")
    (problem,) = check_placement(f"host {HOST}", HOST, "chat", llama2_70b, per_gpu, count)
    assert f"the node has {per_gpu / 2**30:.1f} GiB per GPU x {count}" in problem
    assert capacity_from_report({"gpus": []}) is None
