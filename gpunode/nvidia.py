"""NVIDIA driver branches gpunode knows, as data.

The GPU stack roles read these rows; config validation uses the keys so an
unknown branch is refused before any host is contacted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import StringConstraints, field_validator

from gpunode.schema import Model

if TYPE_CHECKING:
    from gpunode.config import Connection, NodeConfig


@dataclass(frozen=True)
class DriverBranch:
    branch: str
    # Highest CUDA toolkit major.minor this branch's driver supports (NVIDIA's
    # CUDA toolkit release notes, "CUDA Toolkit and Corresponding Driver Versions").
    max_cuda: str
    open_modules: bool  # open kernel modules are published for this branch
    lts: bool = False


DRIVER_BRANCHES: dict[str, DriverBranch] = {
    row.branch: row
    for row in (
        DriverBranch("535", max_cuda="12.2", open_modules=True, lts=True),
        DriverBranch("550", max_cuda="12.4", open_modules=True),
        DriverBranch("570", max_cuda="12.8", open_modules=True),
        DriverBranch("575", max_cuda="12.9", open_modules=True),
        DriverBranch("580", max_cuda="13.0", open_modules=True, lts=True),
    )
}


class Nvidia(Model):
    branch: str = "580"
    kernel_modules: Literal["open", "proprietary"] = "open"
    version: Annotated[str, StringConstraints(pattern=r"^[0-9]+(\.[0-9]+){1,2}$")] | None = None

    @field_validator("branch", mode="before")
    @classmethod
    def _known_branch(cls, value: Any) -> str:
        value = str(value)
        if value not in DRIVER_BRANCHES:
            raise ValueError(
                f"{value!r} is not a driver branch gpunode knows "
                f"(allowed: {', '.join(DRIVER_BRANCHES)})"
            )
        return value


class Cuda(Model):
    """CUDA toolkit, container toolkit and DCGM (roles/cuda.py)."""


def check_host(where: str, config: NodeConfig, connection: Connection) -> list[str]:
    """Checks that need the merged config: the pinned version is in the branch."""
    problems = []
    nvidia = config.nvidia
    if nvidia.version and not nvidia.version.startswith(nvidia.branch + "."):
        problems.append(
            f"{where}: nvidia.version: {nvidia.version} is not in branch {nvidia.branch} "
            f"(allowed: {nvidia.branch}.x versions, or change nvidia.branch)"
        )
    return problems
