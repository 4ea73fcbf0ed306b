"""Nomad: the checks of ``nomad:`` against the rest of a node's config and the ports the
client opens (the section is gpunode/schema/nomad.py; jobs are gpunode/nomad_jobs.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from gpunode import nomad_jobs
from gpunode.schema import distros
from gpunode.schema.node import Connection, NodeConfig
from gpunode.schema.nomad import HTTP_PORT, RPC_PORT, SERF_PORT
from gpunode.schema.types import DURATION_RE


def check_host(where: str, config: NodeConfig, connection: Connection) -> list[str]:
    """Checks that need the merged config (and the host's connection); [] when fine."""
    nomad = config.nomad
    problems: list[str] = []
    if not nomad.enabled:
        if nomad.jobs:
            problems.append(
                f"{where}: nomad.jobs: services are listed but nomad.enabled is false "
                "(allowed: set nomad.enabled: true, or empty the list)"
            )
        return problems
    if not nomad.servers:
        problems.append(
            f"{where}: nomad.servers: not set (allowed: a list of Nomad server RPC addresses, "
            "e.g. [10.0.0.10:4647])"
        )
    if nomad.device_plugin.enabled and nomad.device_plugin.sha256 is None:
        problems.append(
            f"{where}: nomad.device_plugin.sha256: not set (allowed: the sha256 of the "
            "nomad-device-nvidia release zip, 64 hex digits)"
        )
    policy = nomad.policy
    for field in (
        "min_healthy_time",
        "healthy_deadline",
        "progress_deadline",
        "restart_interval",
        "restart_delay",
        "reschedule_delay",
        "reschedule_max_delay",
        "check_interval",
        "check_timeout",
    ):
        if not re.match(DURATION_RE, getattr(policy, field)):
            problems.append(
                f"{where}: nomad.policy.{field}: {getattr(policy, field)!r} is not a duration "
                "(allowed: e.g. 30s, 5m, 1h30m)"
            )
    if nomad.jobs and config.distro is not None:
        problems += nomad_jobs.check_jobs(where, config)
    return problems


def cluster_ports(config: NodeConfig) -> list[tuple[str, int]]:
    """(protocol, port) the Nomad client listens on; the firewall opens them to
    network.cluster_cidrs. HTTP (4646) and RPC (4647); Serf (4648, tcp and udp) only
    with ``nomad.serf``: Nomad's docs say clients need not be reachable there."""
    if not config.nomad.enabled:
        return []
    ports = [("tcp", HTTP_PORT), ("tcp", RPC_PORT)]
    if config.nomad.serf:
        ports += [("tcp", SERF_PORT), ("udp", SERF_PORT)]
    return ports


# HashiCorp's package signing key, pinned: the primary keys <repo>/gpg must hold, exactly
# (apt trusts every key of a signed-by file; dnf imports every key of a gpgkey= file). The
# file is read with gpg on every run (gpunode/facts/keys.py); one holding anything else stops
# the run for that host before the repository file is written.
# "HashiCorp Security (HashiCorp Package Signing) <security+packaging@hashicorp.com>", used
# since 2023-01-23 for apt.releases.hashicorp.com and rpm.releases.hashicorp.com. Source:
# HashiCorp's install instructions ("The fingerprint must match 798A EC65 4E5C 1542 8C8E 42EE
# AA16 FCBC A621 E701, which can also be verified at https://www.hashicorp.com/security
# under 'Linux Package Checksum Verification'").
HASHICORP_KEY_FINGERPRINTS = ("798AEC654E5C15428C8E42EEAA16FCBCA621E701",)
HASHICORP_KEY = "gpg"  # <repo>/gpg, on both repositories


CONFIG_FILE = "nomad.hcl"


UNIT_FILE = "/etc/systemd/system/nomad.service"


STATE_DIR = "/var/lib/gpunode/nomad"


@dataclass(frozen=True)
class RepoSpec:
    """How a package family gets HashiCorp's repository and names a pinned version."""

    default_url: str
    repo_file: str
    template: str
    # where the pinned key is kept: apt's signed-by keyring; dnf's gpgkey=file:// (dnf
    # imports it from there, never from the network)
    keyring: str
    pin: str  # format of a pinned package: {version}

    def package(self, version: str) -> str:
        return self.pin.format(version=version)


REPO: dict[distros.Family, RepoSpec] = {
    "apt": RepoSpec(
        default_url="https://apt.releases.hashicorp.com",
        repo_file="/etc/apt/sources.list.d/hashicorp.list",
        template="hashicorp.list.j2",
        keyring="/usr/share/keyrings/hashicorp-archive-keyring.asc",
        pin="nomad={version}-1",
    ),
    "dnf": RepoSpec(
        default_url="https://rpm.releases.hashicorp.com",
        repo_file="/etc/yum.repos.d/hashicorp.repo",
        template="hashicorp.repo.j2",
        keyring="/etc/pki/rpm-gpg/RPM-GPG-KEY-gpunode-hashicorp",
        pin="nomad-{version}-1",
    ),
}


def plugin_dir(config: NodeConfig) -> str:
    return f"{config.nomad.data_dir}/plugins"
