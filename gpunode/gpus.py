"""What a node's GPUs are: the declared ``gpu`` section, GPU models as data, the probe fact.

A node declares its GPUs in config (``gpu.required``, ``gpu.count``, ``gpu.model``);
the probe (gpunode/probe.py, installed on the node as ``/usr/local/sbin/gpunode-probe``)
says what is really there. The capacity planner (gpunode/planner.py) compares a
model's footprint with the declared GPUs at config load.

A host is **declared GPU-less** when ``gpu.required`` is false, ``gpu.count`` is unset
or 0 and no ``gpu.model`` is set: there, GPU roles show a visible skip and the GPU host
checks skip. Any other host is expected to have NVIDIA GPUs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import Field, field_validator
from pyinfra.api import FactBase

from gpunode import probe
from gpunode.schema import Model

if TYPE_CHECKING:
    from gpunode.config import Connection, NodeConfig

GIB = 2**30


@dataclass(frozen=True)
class GpuModel:
    key: str  # what users write: `gpu: {model: H100-SXM-80GB}`
    memory_gib: int  # memory per GPU, from NVIDIA's product datasheet
    nvml_names: tuple[str, ...]  # nvmlDeviceGetName() / nvidia-smi "name" of this model
    nvswitch: bool = False  # HGX boards of this model use NVSwitches (need nvidia-fabricmanager)
    nvml_total: int | None = None  # bytes NVML reports as memory total, where recorded

    @property
    def memory_bytes(self) -> int:
        """What the planner counts per GPU: NVML's total where a real GPU of this model was
        recorded, else the datasheet's capacity."""
        return self.nvml_total or self.memory_gib * GIB


# Memory per GPU from NVIDIA's datasheets (H100, H200, A100, L40S, L4, A10 product pages).
# NVML reports a little less as total: a recorded H100 80GB HBM3 (driver 580.159.04,
# tests/unit/fixtures/gpu/nvidia-h100-80gb-hbm3) has 85,520,809,984 bytes = 81,559 MiB,
# 99.6 % of 80 GiB. Names and totals of the other models are not recorded yet.
GPU_MODELS: dict[str, GpuModel] = {
    row.key: row
    for row in (
        GpuModel(
            "H100-SXM-80GB",
            80,
            ("NVIDIA H100 80GB HBM3",),
            nvswitch=True,
            nvml_total=85_520_809_984,
        ),
        GpuModel("H100-PCIE-80GB", 80, ("NVIDIA H100 PCIe",)),
        GpuModel("H100-NVL-94GB", 94, ("NVIDIA H100 NVL",)),
        GpuModel("H200-SXM-141GB", 141, ("NVIDIA H200",), nvswitch=True),
        GpuModel("A100-SXM-80GB", 80, ("NVIDIA A100-SXM4-80GB",), nvswitch=True),
        GpuModel("A100-SXM-40GB", 40, ("NVIDIA A100-SXM4-40GB",), nvswitch=True),
        GpuModel("A100-PCIE-80GB", 80, ("NVIDIA A100 80GB PCIe",)),
        GpuModel("A100-PCIE-40GB", 40, ("NVIDIA A100-PCIE-40GB",)),
        GpuModel("L40S-48GB", 48, ("NVIDIA L40S",)),
        GpuModel("L4-24GB", 24, ("NVIDIA L4",)),
        GpuModel("A10-24GB", 24, ("NVIDIA A10",)),
    )
}


class Gpu(Model):
    required: bool = False  # a node without an NVIDIA GPU is an error (True) or a visible skip
    count: Annotated[int, Field(ge=0, le=64)] | None = None  # declared GPU count, checked by verify
    model: str | None = None  # a key of GPU_MODELS; gives the planner the memory per GPU
    # nvidia-fabricmanager must run: None = when the node has NVSwitches (seen by the probe)
    fabric_manager: bool | None = None

    @field_validator("model", mode="before")
    @classmethod
    def _known_model(cls, value: Any) -> Any:
        if value is not None and value not in GPU_MODELS:
            raise ValueError(
                f"{value!r} is not a GPU model gpunode knows (allowed: {', '.join(GPU_MODELS)})"
            )
        return value

    @property
    def declares_gpu(self) -> bool:
        """False only for a host declared GPU-less (see the module docstring)."""
        return self.required or bool(self.count) or self.model is not None


def capacity(config: NodeConfig) -> tuple[int, int] | None:
    """(memory per GPU in bytes, GPU count) from the declared model; None if no model is
    declared. The count is ``gpu.count``, or 1 when only the model is given."""
    gpu = config.gpu
    if gpu.model is None:
        return None
    return GPU_MODELS[gpu.model].memory_bytes, gpu.count if gpu.count is not None else 1


def capacity_from_report(report: dict[str, Any]) -> tuple[int, int] | None:
    """(smallest memory total of the node's GPUs in bytes, GPU count) as the probe saw them
    (the GpuProbe fact); None when it saw no GPU."""
    totals = [gpu["memory"]["total"] for gpu in report.get("gpus", []) if "memory" in gpu]
    if not totals:
        return None
    return min(totals), len(totals)


def check_host(where: str, config: NodeConfig, connection: Connection) -> list[str]:
    """Checks that need the merged config (and the host's connection); [] when fine."""
    gpu = config.gpu
    problems = []
    if gpu.required and gpu.count == 0:
        problems.append(
            f"{where}: gpu.count: 0 contradicts gpu.required: true "
            "(allowed: a count of 1 or more, or gpu.required: false for a GPU-less host)"
        )
    if gpu.model is not None and gpu.count == 0:
        problems.append(
            f"{where}: gpu.count: 0 contradicts gpu.model: {gpu.model} "
            "(allowed: a count of 1 or more, or no gpu.model for a GPU-less host)"
        )
    if gpu.fabric_manager and not gpu.declares_gpu:
        problems.append(
            f"{where}: gpu.fabric_manager: true on a host declared GPU-less "
            "(allowed: set gpu.required, gpu.count or gpu.model, or drop fabric_manager)"
        )
    return problems


class GpuProbe(FactBase):
    """
    The node's GPUs and their health: the JSON report of ``gpunode-probe`` (one command
    per host; gpunode/probe.py documents the schema and exit codes). Before the probe is
    installed: status ``not_installed`` and the NVIDIA GPUs on the PCI bus.

    .. code:: python

        {"status": "healthy", "exit_code": 0, "gpu_count": 1, "driver_version": "580.95.05",
         "gpus": [{"index": 0, "name": "NVIDIA H100 80GB HBM3", ...}], ...}
        {"status": "no_gpu", "exit_code": 2, "gpu_count": 0, "gpus": [], "pci_gpus": [], ...}
        {"status": "not_installed", "exit_code": None, "pci_gpus": ["0000:01:00.0"], ...}
    """

    def command(self) -> str:
        return probe.FACT_COMMAND.format(probe=probe.PROBE_PATH)

    def process(self, output: list[str]) -> dict[str, Any]:
        return parse_probe_output(output)


def parse_probe_output(output: list[str]) -> dict[str, Any]:
    """The fact's output lines -> a probe report.

    A probe that prints no JSON (python3 missing, a crash) gives status ``probe_failed``
    and its exit code, so callers never mistake it for a GPU-less host."""
    lines = [line for line in output if line.strip()]
    exit_line = lines[-1] if lines else ""
    _, sep, code = exit_line.partition("gpunode-probe-exit=")
    if not sep:
        raise ValueError(f"gpunode-probe fact: unexpected output {output!r}")
    if code == "not-installed":
        pci = [line.partition("=")[2] for line in lines if line.startswith("pci-gpu=")]
        return {**probe.empty_report(), "status": "not_installed", "pci_gpus": pci}
    body = "\n".join(lines[:-1])
    try:
        report: dict[str, Any] = json.loads(body)
    except ValueError:
        report = {
            **probe.empty_report(),
            "status": "probe_failed",
            "error": f"gpunode-probe printed no JSON: {body[-500:]!r}",
        }
    report["exit_code"] = int(code)
    return report


def sees_no_gpu(report: dict[str, Any]) -> bool:
    """True when the node surely has no NVIDIA GPU: the probe says ``no_gpu`` (no driver or
    zero devices, and none on the PCI bus), or, before it is installed, the PCI bus shows
    none. An NVML error, a failed probe or an unreadable PCI bus is not "no GPU"."""
    if report["status"] == "no_gpu":
        return True
    return report["status"] == "not_installed" and report["pci_gpus"] == []
