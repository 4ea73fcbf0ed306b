"""Inference as Nomad jobs: client role config, job specs, API client."""

from __future__ import annotations

from typing import TYPE_CHECKING

from gpunode.schema import Model

if TYPE_CHECKING:
    from gpunode.config import Connection, NodeConfig


class Nomad(Model):
    """Nomad client settings."""


def check_host(where: str, config: NodeConfig, connection: Connection) -> list[str]:
    """Checks that need the merged config (and the host's connection); [] when fine."""
    return []


def cluster_ports(config: NodeConfig) -> list[tuple[str, int]]:
    """(protocol, port) the Nomad client listens on; the firewall opens them to
    network.cluster_cidrs."""
    return []
