"""Monitoring and drift: exporters, drift schedule, provenance."""

from __future__ import annotations

from typing import TYPE_CHECKING

from gpunode.schema import Model

if TYPE_CHECKING:
    from gpunode.config import Connection, NodeConfig


class Monitoring(Model):
    """Exporters and the drift report's textfile directory."""


def check_host(where: str, config: NodeConfig, connection: Connection) -> list[str]:
    """Checks that need the merged config (and the host's connection); [] when fine."""
    return []


def metrics_ports(config: NodeConfig) -> list[tuple[str, int]]:
    """(protocol, port) of every metrics endpoint on the node; the firewall opens them
    to network.monitoring_cidrs."""
    return []
