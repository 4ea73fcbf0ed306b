"""Distro support as data: one row per supported distro/version.

Roles never branch on distro names; they read the row for the host's declared
distro. Adding a distro means adding a row here (and operation tests for it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Family = Literal["apt", "dnf"]


@dataclass(frozen=True)
class DistroSpec:
    key: str  # the value users write in config (`distro: debian12`)
    family: Family
    os_ids: tuple[str, ...]  # /etc/os-release ID values this row accepts
    version_id: str  # /etc/os-release VERSION_ID major (prefix match)
    codename: str | None
    base_packages: tuple[str, ...]
    chrony_service: str
    chrony_conf: str
    chrony_driftfile: str
    sudo_group: str
    # apt: file that holds the distro's own package sources (rewritten when a mirror is set)
    apt_sources_path: str | None = None
    apt_sources_format: Literal["one-line", "deb822"] | None = None
    apt_mirror_suites: tuple[str, ...] = ()
    apt_components: tuple[str, ...] = ()
    apt_security_path: str | None = None  # e.g. "debian-security"; None: same archive
    # the distro's own security archive: added (gpunode-security.list) where a host's sources
    # have no <codename>-security suite and gpunode does not write them (no base.apt_mirror)
    apt_security_archive: str | None = None
    apt_keyring: str | None = None
    # automatic updates
    auto_update_packages: tuple[str, ...] = ()
    auto_update_timer: str | None = None  # dnf-automatic's timer; apt uses APT::Periodic


_APT_BASE = ("ca-certificates", "curl", "gnupg", "kmod", "pciutils", "chrony")
_DNF_BASE = ("ca-certificates", "curl", "gnupg2", "kmod", "pciutils", "chrony")

DISTROS: dict[str, DistroSpec] = {
    spec.key: spec
    for spec in (
        DistroSpec(
            key="debian12",
            family="apt",
            os_ids=("debian",),
            version_id="12",
            codename="bookworm",
            base_packages=_APT_BASE,
            chrony_service="chrony",
            chrony_conf="/etc/chrony/chrony.conf",
            chrony_driftfile="/var/lib/chrony/chrony.drift",
            sudo_group="sudo",
            apt_sources_path="/etc/apt/sources.list",
            apt_sources_format="one-line",
            apt_mirror_suites=("bookworm", "bookworm-updates"),
            apt_components=("main", "contrib", "non-free", "non-free-firmware"),
            apt_security_path="debian-security",
            apt_security_archive="http://deb.debian.org/debian-security",
            apt_keyring="/usr/share/keyrings/debian-archive-keyring.gpg",
            auto_update_packages=("unattended-upgrades",),
        ),
        DistroSpec(
            key="ubuntu2204",
            family="apt",
            os_ids=("ubuntu",),
            version_id="22.04",
            codename="jammy",
            base_packages=_APT_BASE,
            chrony_service="chrony",
            chrony_conf="/etc/chrony/chrony.conf",
            chrony_driftfile="/var/lib/chrony/chrony.drift",
            sudo_group="sudo",
            apt_sources_path="/etc/apt/sources.list",
            apt_sources_format="one-line",
            apt_mirror_suites=("jammy", "jammy-updates", "jammy-security"),
            apt_components=("main", "restricted", "universe", "multiverse"),
            apt_security_archive="http://security.ubuntu.com/ubuntu",
            apt_keyring="/usr/share/keyrings/ubuntu-archive-keyring.gpg",
            auto_update_packages=("unattended-upgrades",),
        ),
        DistroSpec(
            key="ubuntu2404",
            family="apt",
            os_ids=("ubuntu",),
            version_id="24.04",
            codename="noble",
            base_packages=_APT_BASE,
            chrony_service="chrony",
            chrony_conf="/etc/chrony/chrony.conf",
            chrony_driftfile="/var/lib/chrony/chrony.drift",
            sudo_group="sudo",
            apt_sources_path="/etc/apt/sources.list.d/ubuntu.sources",
            apt_sources_format="deb822",
            apt_mirror_suites=("noble", "noble-updates", "noble-security"),
            apt_components=("main", "restricted", "universe", "multiverse"),
            apt_security_archive="http://security.ubuntu.com/ubuntu",
            apt_keyring="/usr/share/keyrings/ubuntu-archive-keyring.gpg",
            auto_update_packages=("unattended-upgrades",),
        ),
        *(
            DistroSpec(
                key=key,
                family="dnf",
                os_ids=os_ids,
                version_id="9",
                codename=None,
                base_packages=_DNF_BASE,
                chrony_service="chronyd",
                chrony_conf="/etc/chrony.conf",
                chrony_driftfile="/var/lib/chrony/drift",
                sudo_group="wheel",
                auto_update_packages=("dnf-automatic",),
                auto_update_timer="dnf-automatic.timer",
            )
            for key, os_ids in (
                ("rhel9", ("rhel",)),
                ("rocky9", ("rocky",)),
                ("alma9", ("almalinux",)),
            )
        ),
    )
}


def get(key: str) -> DistroSpec:
    return DISTROS[key]
