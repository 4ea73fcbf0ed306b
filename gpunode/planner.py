"""Capacity planner: will a model fit a node's GPUs? Checked at config load.

The footprint and the estimate are in gpunode/schema/planner.py.
"""

from __future__ import annotations

from gpunode.schema.planner import GIB, ModelFootprint


def gib(value: float) -> str:
    return f"{value / GIB:.1f} GiB"


def check_placement(
    where: str,
    node: str,
    service: str,
    footprint: ModelFootprint,
    gpus_have_bytes: int,
    gpu_count: int,
    model: str | None = None,
) -> list[str]:
    """Problems (``[]`` when it fits) placing ``service``'s model, split over ``gpu_count``
    GPUs of ``gpus_have_bytes`` each (the declared GPU model, or the probe's
    memory.total), on ``node``. ``model`` names the model in the message (default: the
    service)."""
    need = footprint.estimate(max(gpu_count, 1))
    if need.per_gpu <= gpus_have_bytes and gpu_count >= 1:
        return []
    spread = f" over {gpu_count} GPUs" if gpu_count > 1 else ""
    return [
        f"{where}: {service}: model {model or service} does not fit node {node}: it needs "
        f"{gib(need.per_gpu)} per GPU{spread} ({gib(need.weights)} weights "
        f"({footprint.parameters / 1e9:g}B parameters in {footprint.dtype}) + "
        f"{gib(need.kv_cache)} KV cache ({footprint.context_length} tokens x "
        f"{footprint.batch} in {footprint.kv_dtype}) + {gib(need.overhead)} overhead), "
        f"the node has {gib(gpus_have_bytes)} per GPU x {gpu_count} "
        "(allowed: a smaller dtype or quantization, a shorter context_length or batch, "
        "more GPUs, or a node with bigger GPUs)"
    ]
