"""The GPU stack's distro support, as data, and what a node's ``nvidia:``/``cuda:`` resolve to.

The sections themselves (every default, the driver branches) are in
gpunode/schema/nvidia.py. The roles
(roles/nvidia_driver.py, roles/cuda.py) never branch on distro names: they read
the rows below for the host's declared distro and the chosen package source.

Package sources
---------------
``nvidia``  NVIDIA's CUDA network repository (one per distro, rows in
            :data:`CUDA_REPOS`): the driver branch as a package name (apt) or a
            dnf module stream, the CUDA toolkit, DCGM and fabric manager.
``distro``  the distribution's own archive (rows in :data:`DISTRO_ARCHIVES`):
            Ubuntu's ``-server`` driver packages, Debian 12's ``non-free``
            ``nvidia-driver`` and ``nvidia-cuda-toolkit``.

Sources of the package names and repository layouts (checked 2026-11):
NVIDIA CUDA Installation Guide for Linux and NVIDIA Driver Installation Guide
(docs.nvidia.com: "Network Repository Installation" (the signing keys: see NVIDIA_KEYS),
``dnf module install nvidia-driver:<stream>``, ``cuda-toolkit-X-Y``, fabric
manager packages), NVIDIA Container Toolkit install guide (the
libnvidia-container apt list / dnf .repo file and its four packages), DCGM user
guide ("Getting Started": ``datacenter-gpu-manager-4-cuda<major>``,
``nvidia-dcgm`` service), Debian's bookworm archive (``nvidia-driver``,
``nvidia-kernel-dkms``, ``nvidia-open-kernel-dkms`` in contrib,
``nvidia-cuda-toolkit`` 11.8.89), Ubuntu's jammy/noble archives
(``nvidia-driver-<branch>-server[-open]``, ``nvidia-fabricmanager-<branch>``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from gpunode.schema.node import Connection, NodeConfig
from gpunode.schema.nvidia import DRIVER_BRANCHES

# --- NVIDIA's repositories ----------------------------------------------------------------

# Base URL of NVIDIA's download site; ``nvidia.mirror`` replaces it (air-gapped sites
# mirror the same layout: <base>/cuda/repos/<distro>/x86_64/).
NVIDIA_DOWNLOAD = "https://developer.download.nvidia.com/compute"
# Base URL of the NVIDIA Container Toolkit's package repository; ``cuda.container_toolkit_mirror``
# replaces it (<base>/stable/deb/$(ARCH) and <base>/stable/rpm/$basearch).
CONTAINER_TOOLKIT_REPO = "https://nvidia.github.io/libnvidia-container"
# EPEL (for dkms on RHEL 9): Fedora's documented install RPM.
EPEL_RELEASE_RPM = "https://dl.fedoraproject.org/pub/epel/epel-release-latest-9.noarch.rpm"
# EPEL 9's signing key, "Fedora (epel9) <epel@fedoraproject.org>", published beside the RPM
# (https://dl.fedoraproject.org/pub/epel/RPM-GPG-KEY-EPEL-9) and on https://fedoraproject.org/keys;
# the release RPM is installed only with its signature checked against it.
EPEL_KEY_URL = "https://dl.fedoraproject.org/pub/epel/RPM-GPG-KEY-EPEL-9"
EPEL_KEY_FINGERPRINTS = ("FF8AD1344597106ECE813B918A3872BF3228467C",)
EPEL_KEYRING = "/etc/pki/rpm-gpg/RPM-GPG-KEY-gpunode-epel-9"

CONTAINER_TOOLKIT_PACKAGES = (  # pinned to one version together
    "nvidia-container-toolkit",
    "nvidia-container-toolkit-base",
    "libnvidia-container-tools",
    "libnvidia-container1",
)

# --- NVIDIA's signing keys, pinned ----------------------------------------------------------
#
# Each key file NVIDIA publishes (next to a CUDA repository, or at the container toolkit's
# base URL) with the fingerprints of the primary keys the file must hold: exactly these, no
# other key (apt trusts every key in a signed-by file, dnf imports every key of a gpgkey=
# file). The file is read with gpg on every run (gpunode/facts/keys.py); a file holding
# anything else stops the run for that host before a repository file or package uses it.
NVIDIA_KEYS: dict[str, tuple[str, ...]] = {
    # The CUDA apt repositories' key (debian12, ubuntu2204, ubuntu2404: <repo>/3bf863cc.pub),
    # "cudatools <cudatools@nvidia.com>", since 2022. Source: NVIDIA's own
    # https://github.com/NVIDIA/cuda-repo-management/blob/main/SIGNATURES.md
    # ("Primary key fingerprint: EB69 3B30 35CD 5710 E231 E123 A4B4 6996 3BF8 63CC").
    "3bf863cc.pub": ("EB693B3035CD5710E231E123A4B469963BF863CC",),
    # The CUDA dnf repositories' key (rhel9: <repo>/D42D0685.pub), same page ("Importing GPG
    # key 0xD42D0685 ... Fingerprint: 610C 7B14 E068 A878 070D A4E9 9CD0 A493 D42D 0685").
    "D42D0685.pub": ("610C7B14E068A878070DA4E99CD0A493D42D0685",),
    # The container toolkit's key (<base>/gpgkey, apt and dnf alike), "NVIDIA CORPORATION
    # (Open Source Projects) <cudatools@nvidia.com>": read with gpg --show-keys from the
    # gpgkey file of https://github.com/NVIDIA/nvidia-docker (served as
    # https://nvidia.github.io/nvidia-docker/gpgkey; NVIDIA's container toolkit install guide
    # fetches the same key from https://nvidia.github.io/libnvidia-container/gpgkey).
    "gpgkey": ("C95B321B61E88C1809C4F759DDCAE044F796ECB0",),
}
CUDA_APT_KEY = "3bf863cc.pub"
CUDA_RPM_KEY = "D42D0685.pub"  # RPM signing key of the CUDA repos since 2022
CONTAINER_TOOLKIT_KEY = "gpgkey"
# Where gpunode keeps them on a host. The apt keyrings are the armored files as published
# (.asc: apt reads armored signed-by files by that extension); cuda-keyring's own
# /usr/share/keyrings/cuda-archive-keyring.gpg is not used (gpunode removes that package).
CUDA_KEYRING = "/usr/share/keyrings/gpunode-nvidia-cuda.asc"
CUDA_RPM_KEYRING = "/etc/pki/rpm-gpg/RPM-GPG-KEY-gpunode-nvidia-cuda"
CONTAINER_TOOLKIT_KEYRING = "/usr/share/keyrings/nvidia-container-toolkit-keyring.asc"
CONTAINER_TOOLKIT_RPM_KEYRING = "/etc/pki/rpm-gpg/RPM-GPG-KEY-gpunode-nvidia-container-toolkit"
# NVIDIA's package that used to carry the CUDA apt key (installed by gpunode before
# 2026-12): removed, so no package-owned file competes with the pinned keyring.
CUDA_KEYRING_PACKAGE = "cuda-keyring"


@dataclass(frozen=True)
class CudaRepo:
    """NVIDIA's CUDA network repository for one distro (``source: nvidia``)."""

    path: str  # directory under <base>/cuda/repos/
    family: Literal["apt", "dnf"]
    # dnf only: where dkms comes from (EPEL): an RPM URL, or a package in the distro's extras
    epel: str | None = None

    def url(self, base: str) -> str:
        return f"{base.rstrip('/')}/cuda/repos/{self.path}/x86_64"

    @property
    def key(self) -> str:
        """The signing key file NVIDIA publishes next to the repository (a key of
        :data:`NVIDIA_KEYS`)."""
        return CUDA_APT_KEY if self.family == "apt" else CUDA_RPM_KEY

    @property
    def keyring(self) -> str:
        """Where gpunode keeps that key on the host (apt: signed-by; dnf: gpgkey=file://)."""
        return CUDA_KEYRING if self.family == "apt" else CUDA_RPM_KEYRING

    @property
    def list_file(self) -> str:
        """apt: the sources file NVIDIA's cuda-keyring package installs (gpunode writes the
        same one, pointing at its pinned keyring)."""
        return f"/etc/apt/sources.list.d/cuda-{self.path}-x86_64.list"

    @property
    def repo_id(self) -> str:
        """dnf: the repository id (and /etc/yum.repos.d/<id>.repo) of NVIDIA's .repo file."""
        return f"cuda-{self.path}-x86_64"


CUDA_REPOS: dict[str, CudaRepo] = {
    "debian12": CudaRepo("debian12", "apt"),
    "ubuntu2204": CudaRepo("ubuntu2204", "apt"),
    "ubuntu2404": CudaRepo("ubuntu2404", "apt"),
    "rhel9": CudaRepo("rhel9", "dnf", epel=EPEL_RELEASE_RPM),
    "rocky9": CudaRepo("rhel9", "dnf", epel="epel-release"),
    "alma9": CudaRepo("rhel9", "dnf", epel="epel-release"),
}

# NVIDIA repo driver packages per family and kernel modules; {branch} is filled in.
# dnf installs a module stream instead: nvidia-driver:<branch>-open / -dkms.
NVIDIA_REPO_DRIVER: dict[tuple[str, str], tuple[str, ...]] = {
    ("apt", "open"): ("nvidia-open-{branch}", "nvidia-persistenced"),
    ("apt", "proprietary"): ("cuda-drivers-{branch}", "nvidia-persistenced"),
    ("dnf", "open"): ("nvidia-persistenced",),
    ("dnf", "proprietary"): ("nvidia-persistenced",),
}
DNF_DRIVER_MODULE = "nvidia-driver"
DNF_STREAM_SUFFIX = {"open": "-open", "proprietary": "-dkms"}
NVIDIA_REPO_FABRICMANAGER = {
    "apt": ("nvidia-fabricmanager-{branch}", "libnvidia-nscq-{branch}"),
    "dnf": ("nvidia-fabric-manager", "libnvidia-nscq"),
}


@dataclass(frozen=True)
class DistroArchive:
    """The NVIDIA packages a distribution ships itself (``source: distro``)."""

    branches: tuple[str, ...]  # driver branches the archive has
    driver: dict[str, tuple[str, ...]]  # kernel_modules -> packages ({branch} filled in)
    cuda_version: str  # the CUDA toolkit version of ``nvidia-cuda-toolkit``
    fabricmanager: tuple[str, ...] = ()  # () = not in this archive
    # apt components to add to the distro's suites (Debian keeps NVIDIA in non-free/contrib)
    components: tuple[str, ...] = ()
    # open modules lag the driver in security updates: a pinned version is required
    open_needs_version: str | None = None


CUDA_TOOLKIT_DISTRO_PACKAGE = "nvidia-cuda-toolkit"
CUDA_TOOLKIT_DISTRO_HOME = "/usr/lib/nvidia-cuda-toolkit"

DISTRO_ARCHIVES: dict[str, DistroArchive] = {
    "debian12": DistroArchive(
        branches=("535",),
        driver={
            "proprietary": ("nvidia-driver", "nvidia-kernel-dkms", "nvidia-persistenced"),
            "open": ("nvidia-driver", "nvidia-open-kernel-dkms", "nvidia-persistenced"),
        },
        cuda_version="11.8",
        components=("contrib", "non-free", "non-free-firmware"),
        open_needs_version="535.261.03",
    ),
    **{
        key: DistroArchive(
            branches=("535", "550", "570", "580"),
            driver={
                "proprietary": ("nvidia-driver-{branch}-server",),
                "open": ("nvidia-driver-{branch}-server-open",),
            },
            cuda_version=cuda,
            fabricmanager=("nvidia-fabricmanager-{branch}", "libnvidia-nscq-{branch}"),
        )
        for key, cuda in (("ubuntu2204", "11.5"), ("ubuntu2404", "12.0"))
    },
}

# Debian's archive (the default for the non-free sources file when neither
# nvidia.mirror nor base.apt_mirror is set).
DEBIAN_ARCHIVE = "http://deb.debian.org/debian"


@dataclass(frozen=True)
class FamilyRow:
    """What differs between apt and dnf hosts for the GPU stack."""

    headers: tuple[str, ...]  # kernel headers for the running kernel ({kernel} filled in)
    initramfs: str  # rebuilds the initramfs (after the nouveau blacklist changed)
    lock_packages: tuple[str, ...] = ()  # what the hold mechanism needs
    # NVIDIA's packages that must move together: held after install (apt-mark hold /
    # dnf versionlock). Shell glob patterns over package names.
    hold: tuple[str, ...] = field(default=())


FAMILIES: dict[str, FamilyRow] = {
    "apt": FamilyRow(
        headers=("linux-headers-{kernel}",),
        initramfs="update-initramfs -u -k all",
        hold=(
            "*nvidia*",
            "libcuda*",
            "libnvcuvid*",
            "libnvoptix*",
            "cuda-*",
            "libcudnn*",
            "datacenter-gpu-manager*",
        ),
    ),
    "dnf": FamilyRow(
        headers=("kernel-devel-{kernel}", "kernel-headers-{kernel}"),
        initramfs="dracut --regenerate-all --force",
        lock_packages=("python3-dnf-plugin-versionlock",),
        hold=("*nvidia*", "cuda-*", "libcudnn*", "datacenter-gpu-manager*"),
    ),
}

NOUVEAU_BLACKLIST = "/etc/modprobe.d/gpunode-blacklist-nouveau.conf"
DKMS_SIGNING_CONF = "/etc/dkms/framework.conf.d/gpunode-signing.conf"
APT_PIN_FILE = "/etc/apt/preferences.d/gpunode-nvidia"
DEBIAN_NONFREE_SOURCES = "/etc/apt/sources.list.d/gpunode-nvidia-distro.sources"
CUDA_PROFILE = "/etc/profile.d/gpunode-cuda.sh"

# after a reboot into a new driver: fails unless the kernel runs the NVIDIA module that is
# installed for it (the rolling reboot's check; gpunode/operations/server.py)
DRIVER_LOADED_CHECK = (
    "loaded=$(cat /sys/module/nvidia/version 2>/dev/null); "
    "on_disk=$(modinfo -F version nvidia 2>/dev/null); "
    'if [ -z "$loaded" ] || [ "$loaded" != "$on_disk" ]; then '
    'echo "gpunode: NVIDIA driver loaded: ${loaded:-none}, installed: ${on_disk:-none}" >&2; '
    "exit 1; fi"
)
PERSISTENCED_SERVICE = "nvidia-persistenced"
FABRICMANAGER_SERVICE = "nvidia-fabricmanager"
DCGM_SERVICE = "nvidia-dcgm"
DCGM_PACKAGE = "datacenter-gpu-manager-4-cuda{major}"


def cuda_major_minor(version: str) -> tuple[int, int]:
    major, minor = version.split(".")[:2]
    return int(major), int(minor)


# --- config sections ------------------------------------------------------------------------

# --- what the config resolves to ---------------------------------------------------------


def cuda_version(config: NodeConfig) -> str:
    """The CUDA toolkit version a host gets."""
    if config.cuda.version:
        return config.cuda.version
    if config.nvidia.source == "distro" and config.distro in DISTRO_ARCHIVES:
        return DISTRO_ARCHIVES[config.distro].cuda_version
    return DRIVER_BRANCHES[config.nvidia.branch].max_cuda


def wants_fabricmanager(config: NodeConfig, nvswitches: int) -> bool:
    """nvidia-fabricmanager goes on: config says so (nvidia.fabricmanager, or gpu.fabric_manager
    which the host checks verify), or ``auto`` and the host has NVSwitches."""
    flag = config.nvidia.fabricmanager
    if flag is True or config.gpu.fabric_manager:
        return True
    return flag == "auto" and nvswitches > 0


def wants_container_toolkit(config: NodeConfig) -> bool:
    flag = config.cuda.container_toolkit
    return flag if flag is not None else config.nvidia.source == "nvidia"


def wants_dcgm(config: NodeConfig) -> bool:
    flag = config.cuda.dcgm
    return flag if flag is not None else config.nvidia.source == "nvidia"


def check_host(where: str, config: NodeConfig, connection: Connection) -> list[str]:
    """Checks that need the merged config: versions, branches and sources fit together."""
    problems = []
    nvidia, cuda = config.nvidia, config.cuda
    if nvidia.version and not nvidia.version.startswith(nvidia.branch + "."):
        problems.append(
            f"{where}: nvidia.version: {nvidia.version} is not in branch {nvidia.branch} "
            f"(allowed: {nvidia.branch}.x versions, or change nvidia.branch)"
        )
    if nvidia.fabricmanager is False and config.gpu.fabric_manager:
        problems.append(
            f"{where}: nvidia.fabricmanager: false contradicts gpu.fabric_manager: true "
            "(allowed: nvidia.fabricmanager auto or true, or gpu.fabric_manager unset)"
        )
    if nvidia.install == "never" and config.gpu.required:
        problems.append(
            f"{where}: nvidia.install: never contradicts gpu.required: true "
            "(allowed: install auto or always, or gpu.required: false)"
        )
    if nvidia.source == "distro" and config.distro:
        archive = DISTRO_ARCHIVES.get(config.distro)
        if archive is None:
            problems.append(
                f"{where}: nvidia.source: distro: {config.distro} ships no NVIDIA driver "
                f"(allowed: source: nvidia, or distro one of {', '.join(DISTRO_ARCHIVES)})"
            )
        else:
            if nvidia.branch not in archive.branches:
                problems.append(
                    f"{where}: nvidia.branch: {config.distro}'s archive has driver branch "
                    f"{', '.join(archive.branches)} only, not {nvidia.branch} (allowed: "
                    f"{', '.join(archive.branches)}, or source: nvidia for other branches)"
                )
            if (
                nvidia.kernel_modules == "open"
                and archive.open_needs_version
                and not nvidia.version
            ):
                problems.append(
                    f"{where}: nvidia.kernel_modules: open: {config.distro}'s open kernel "
                    "modules are not updated with the driver's security updates, so the "
                    "driver must be pinned to their version (allowed: nvidia.version: "
                    f"{archive.open_needs_version}, or kernel_modules: proprietary)"
                )
            if (nvidia.fabricmanager is True or config.gpu.fabric_manager) and not (
                archive.fabricmanager
            ):
                problems.append(
                    f"{where}: nvidia.fabricmanager: true: {config.distro}'s archive has no "
                    "fabric manager (allowed: source: nvidia, or fabricmanager: auto/false)"
                )
            if cuda.toolkit and cuda.version and cuda.version != archive.cuda_version:
                problems.append(
                    f"{where}: cuda.version: {config.distro}'s archive has CUDA "
                    f"{archive.cuda_version} only, not {cuda.version} (allowed: "
                    f"{archive.cuda_version} or unset, or nvidia.source: nvidia)"
                )
            if cuda.dcgm:
                problems.append(
                    f"{where}: cuda.dcgm: true: DCGM comes from NVIDIA's CUDA repository only "
                    "(allowed: dcgm: false or unset with source: distro, or source: nvidia)"
                )
    if nvidia.source == "nvidia" and nvidia.kernel_modules == "open":
        if not DRIVER_BRANCHES[nvidia.branch].open_modules:
            problems.append(
                f"{where}: nvidia.kernel_modules: branch {nvidia.branch} has no open modules "
                "(allowed: proprietary)"
            )
    if cuda.toolkit or wants_dcgm(config):
        wanted = cuda_version(config)
        top = DRIVER_BRANCHES[nvidia.branch].max_cuda
        if cuda_major_minor(wanted) > cuda_major_minor(top):
            problems.append(
                f"{where}: cuda.version: CUDA {wanted} needs a newer driver than branch "
                f"{nvidia.branch} (supports CUDA up to {top}; allowed: cuda.version <= {top}, "
                "or a newer nvidia.branch)"
            )
    return problems


def driver_packages(config: NodeConfig, family: str) -> list[str]:
    nvidia = config.nvidia
    if nvidia.source == "distro":
        assert config.distro
        rows = DISTRO_ARCHIVES[config.distro].driver[nvidia.kernel_modules]
    else:
        rows = NVIDIA_REPO_DRIVER[(family, nvidia.kernel_modules)]
    return [p.format(branch=nvidia.branch) for p in rows]


def fabricmanager_packages(config: NodeConfig, family: str) -> list[str]:
    nvidia = config.nvidia
    if nvidia.source == "distro":
        assert config.distro
        rows = DISTRO_ARCHIVES[config.distro].fabricmanager
    else:
        rows = NVIDIA_REPO_FABRICMANAGER[family]
    return [p.format(branch=nvidia.branch) for p in rows]


def mirror_base(config: NodeConfig) -> str:
    return (config.nvidia.mirror or NVIDIA_DOWNLOAD).rstrip("/")


def toolkit(config: NodeConfig) -> tuple[list[str], str]:
    """(packages, CUDA_HOME) of the CUDA toolkit this host gets."""
    version = cuda_version(config)
    if config.nvidia.source == "distro":
        return [CUDA_TOOLKIT_DISTRO_PACKAGE], CUDA_TOOLKIT_DISTRO_HOME
    return [f"cuda-toolkit-{version.replace('.', '-')}"], f"/usr/local/cuda-{version}"


def container_toolkit_packages(config: NodeConfig, family: str) -> list[str]:
    version = config.cuda.container_toolkit_version
    join = "=" if family == "apt" else "-"
    return [f"{p}{join}{version}" for p in CONTAINER_TOOLKIT_PACKAGES]
