"""NVIDIA driver branches gpunode knows, as data.

The GPU stack roles read these rows; config validation uses the keys so an
unknown branch is refused before any host is contacted.
"""

from __future__ import annotations

from dataclasses import dataclass


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
