"""Inference services: runtime profiles, model artifacts, units."""

from __future__ import annotations

from typing import TYPE_CHECKING

from gpunode.schema import Model

if TYPE_CHECKING:
    from gpunode.config import Connection, NodeConfig


class Inference(Model):
    """The node's inference services."""


def check_host(where: str, config: NodeConfig, connection: Connection) -> list[str]:
    """Checks that need the merged config (and the host's connection); [] when fine."""
    return []


def app_ports(config: NodeConfig) -> list[tuple[str, int]]:
    """(protocol, port) of every inference endpoint on the node; the firewall opens them
    to network.app_cidrs."""
    return []
