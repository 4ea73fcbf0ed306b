"""What a node's GPUs are: the declared GPU section, the probe's facts, the capacity planner."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

from pydantic import Field

from gpunode.schema import Model

if TYPE_CHECKING:
    from gpunode.config import Connection, NodeConfig


class Gpu(Model):
    required: bool = False  # a node without an NVIDIA GPU is an error (True) or a visible skip
    count: Annotated[int, Field(ge=0, le=64)] | None = None  # declared GPU count, checked by verify


def check_host(where: str, config: NodeConfig, connection: Connection) -> list[str]:
    """Checks that need the merged config (and the host's connection); [] when fine."""
    return []
