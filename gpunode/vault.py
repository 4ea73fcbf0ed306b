"""Secrets from Vault (hvac): config sections and the controller-side client."""

from __future__ import annotations

from typing import TYPE_CHECKING

from gpunode.schema import Model

if TYPE_CHECKING:
    from gpunode.config import Connection, NodeConfig


class Vault(Model):
    """How the controller reaches Vault."""


class Secret(Model):
    """One secret: where it comes from in Vault and where it goes on the node."""


def check_host(where: str, config: NodeConfig, connection: Connection) -> list[str]:
    """Checks that need the merged config (and the host's connection); [] when fine."""
    return []
