"""What a node's GPUs are: capacity from the declared ``gpu`` section or the probe's report.

The section and the GPU models are in gpunode/schema/gpu.py; the probe fact in
gpunode/facts/nvidia.py.

A node declares its GPUs in config (``gpu.required``, ``gpu.count``, ``gpu.model``);
the probe (gpunode/probe.py, installed on the node as ``/usr/local/sbin/gpunode-probe``)
says what is really there. The capacity planner (gpunode/planner.py) compares a
model's footprint with the declared GPUs at config load.

A host is **declared GPU-less** when ``gpu.required`` is false, ``gpu.count`` is unset
or 0 and no ``gpu.model`` is set: there, GPU roles show a visible skip and the GPU host
checks skip. Any other host is expected to have NVIDIA GPUs.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from gpunode import probe
from gpunode.schema.gpu import GPU_MODELS
from gpunode.schema.node import Connection, NodeConfig


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


def sees_no_gpu(report: dict[str, Any]) -> bool:
    """True when the node surely has no NVIDIA GPU: the probe says ``no_gpu`` (no driver or
    zero devices, and none on the PCI bus), or, before it is installed, the PCI bus shows
    none. An NVML error, a failed probe or an unreadable PCI bus is not "no GPU"."""
    if report["status"] == "no_gpu":
        return True
    return report["status"] == "not_installed" and report["pci_gpus"] == []


PROBE_SOURCE = Path(probe.__file__)


def pynvml_source() -> Path:
    """The controller's pynvml.py (nvidia-ml-py is one pure-Python module)."""
    spec = importlib.util.find_spec("pynvml")
    if spec is None or spec.origin is None or not spec.origin.endswith("pynvml.py"):
        raise RuntimeError(
            "nvidia-ml-py is not installed on the controller as a single pynvml.py "
            "(pip install gpunode's dependencies)"
        )
    return Path(spec.origin)
