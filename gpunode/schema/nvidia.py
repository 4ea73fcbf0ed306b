"""``nvidia:`` and ``cuda:``: the NVIDIA driver, the CUDA toolkit, the container toolkit
and DCGM (roles/nvidia_driver.py, roles/cuda.py), with the driver branches and CUDA
versions gpunode knows as data. The package sources per distro are in gpunode/nvidia.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import Field, StringConstraints, ValidationInfo, field_validator

from gpunode.schema.types import AbsPath, DriverVersion, HttpUrl, Model, Uri


def repository_url(url: str | None, allow_http: bool, flag: str) -> str | None:
    """The rule for a package repository (or mirror) URL: ``https://`` or ``file:///``;
    ``http://`` only with ``flag`` (the section's allow-http flag) set beside it. Packages
    are checked against the pinned signing keys either way; over http an observer sees
    what a node installs and a man in the middle can hold back updates."""
    if url is not None and url.startswith("http://") and not allow_http:
        raise ValueError(
            f"{url!r} is plain http (allowed: https:// or file:///, or {flag}: true beside it "
            "for a mirror that only speaks http, warned about on every run)"
        )
    return url


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

# CUDA toolkit releases gpunode knows (major.minor): the version a config may ask for.
CUDA_VERSIONS = (
    "11.5", "11.8", "12.0", "12.1", "12.2", "12.3", "12.4", "12.5", "12.6", "12.8", "12.9",
    "13.0",
)  # fmt: skip


class ModuleSigning(Model):
    """A Machine Owner Key already enrolled (mokutil --import) that DKMS signs modules with."""

    key_file: AbsPath
    """The private key on the node, e.g. /var/lib/shim-signed/mok/MOK.priv."""
    cert_file: AbsPath
    """Its DER certificate, e.g. /var/lib/shim-signed/mok/MOK.der."""


class Nvidia(Model):
    """The NVIDIA driver (roles/nvidia_driver.py)."""

    install: Literal["auto", "always", "never"] = "auto"
    """auto: only on hosts where an NVIDIA device is found (no GPU: a visible skip, or an
    error with `gpu.required`); always: also without a GPU (images, the lab); never: skip."""
    source: Literal["nvidia", "distro"] = "nvidia"
    """Where the driver comes from: NVIDIA's CUDA repo, or the distro's archive."""
    mirror_allow_http: bool = False
    """Accept an `http://` `mirror`; every run warns while one is used. Packages are still
    checked against the pinned signing keys."""
    mirror: HttpUrl | Uri | None = None
    """Base URL replacing NVIDIA's download site (source: nvidia) or the Debian archive that
    gets the non-free sources file (source: distro on debian12), for air-gapped mirrors:
    `https://` or `file:///` (`file://` needs curl on the node); `http://` only with
    `mirror_allow_http`. NVIDIA's signing keys are fetched from it and checked against
    the fingerprints pinned in gpunode/nvidia.py."""
    branch: str = "580"
    """The driver branch, a key of DRIVER_BRANCHES (gpunode/schema/nvidia.py)."""
    kernel_modules: Literal["open", "proprietary"] = "open"
    """Open or proprietary kernel modules; open is NVIDIA's advice for Turing and newer."""
    version: DriverVersion | None = None
    """An exact driver version, e.g. 580.95.05 (an apt pin); it must be in `branch`."""
    fabricmanager: Literal["auto"] | bool = "auto"
    """The NVSwitch fabric manager: auto = where the host has NVSwitches (lspci / procfs)."""
    reboot: bool = False
    """Reboot (one host at a time) when the installed module differs from the loaded one.
    false: a visible "reboot needed" note instead."""
    reboot_timeout: Annotated[int, Field(ge=60, le=7200)] = 900
    """Seconds to wait for SSH after a reboot."""
    module_signing: ModuleSigning | None = None
    """Required on hosts with Secure Boot on."""

    @field_validator("mirror")
    @classmethod
    def _mirror_transport(cls, value: str | None, info: ValidationInfo) -> str | None:
        return repository_url(
            value, info.data.get("mirror_allow_http", False), "nvidia.mirror_allow_http"
        )

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

    toolkit: bool = True
    """Install the CUDA toolkit (`/etc/profile.d/gpunode-cuda.sh` sets `CUDA_HOME` and
    `PATH`)."""
    version: str | None = None
    """The CUDA version, major.minor (a value of CUDA_VERSIONS); default: the newest the
    driver branch supports (source: nvidia) or the distro's own nvidia-cuda-toolkit (source:
    distro)."""
    container_toolkit: bool | None = None
    """The NVIDIA Container Toolkit, its four packages pinned to `container_toolkit_version`.
    null: installed with source: nvidia, skipped (visibly) with source: distro."""
    container_toolkit_version: Annotated[
        str, StringConstraints(pattern=r"^[0-9]+\.[0-9]+\.[0-9]+(-[0-9A-Za-z.~]+)?$")
    ] = "1.17.8-1"
    """The version the NVIDIA Container Toolkit's four packages are pinned to."""
    container_toolkit_mirror_allow_http: bool = False
    """Accept an `http://` `container_toolkit_mirror`; every run warns while one is used.
    Packages are still checked against the pinned signing key."""
    container_toolkit_mirror: HttpUrl | Uri | None = None
    """Base URL replacing CONTAINER_TOOLKIT_REPO (NVIDIA's container toolkit repository),
    for air-gapped mirrors: `https://` or `file:///`; `http://` only with
    `container_toolkit_mirror_allow_http`. The key (`<base>/gpgkey`) is checked against the
    fingerprint pinned in gpunode/nvidia.py."""
    dcgm: bool | None = None
    """DCGM (datacenter-gpu-manager, service nvidia-dcgm) from NVIDIA's CUDA repo.
    null: installed with source: nvidia, skipped (visibly) with source: distro."""

    @field_validator("container_toolkit_mirror")
    @classmethod
    def _mirror_transport(cls, value: str | None, info: ValidationInfo) -> str | None:
        flag = "cuda.container_toolkit_mirror_allow_http"
        return repository_url(
            value, info.data.get("container_toolkit_mirror_allow_http", False), flag
        )

    @field_validator("version", mode="before")
    @classmethod
    def _known_cuda(cls, value: Any) -> str | None:
        if value is None:
            return None
        value = str(value)
        if value not in CUDA_VERSIONS:
            raise ValueError(
                f"{value!r} is not a CUDA version gpunode knows "
                f"(allowed: {', '.join(CUDA_VERSIONS)})"
            )
        return value
