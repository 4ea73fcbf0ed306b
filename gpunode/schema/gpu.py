"""``gpu:``: the GPUs a node declares, and the GPU models gpunode knows as data.

A host is **declared GPU-less** when ``gpu.required`` is false, ``gpu.count`` is unset
or 0 and no ``gpu.model`` is set: there, GPU roles show a visible skip and the GPU host
checks skip. Any other host is expected to have NVIDIA GPUs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import Field, field_validator

from gpunode.schema.types import Model

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
    """The GPUs a node declares. A host is declared GPU-less when `required` is false,
    `count` is unset or 0 and no `model` is set: there, GPU roles show a visible skip and the
    GPU host checks skip. Any other host is expected to have NVIDIA GPUs."""

    required: bool = False
    """A node without an NVIDIA GPU is an error (true) or a visible skip (false)."""
    count: Annotated[int, Field(ge=0, le=64)] | None = None
    """The declared GPU count, checked by verify."""
    model: str | None = None
    """The GPU model, a key of GPU_MODELS (gpunode/schema/gpu.py); gives the planner the
    memory per GPU."""
    fabric_manager: bool | None = None
    """nvidia-fabricmanager must run: null = when the node has NVSwitches (seen by the
    probe)."""

    @field_validator("model", mode="before")
    @classmethod
    def _known_model(cls, value: Any) -> Any:
        if value is not None and str(value) not in GPU_MODELS:
            raise ValueError(
                f"{value!r} is not a GPU model gpunode knows (allowed: {', '.join(GPU_MODELS)})"
            )
        return value

    @property
    def declares_gpu(self) -> bool:
        """False only for a host declared GPU-less (see the module docstring)."""
        return self.required or bool(self.count) or self.model is not None
