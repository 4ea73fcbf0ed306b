"""Host and network hardening: firewall, sshd, sysctl and OS controls as data."""

from __future__ import annotations

from typing import TYPE_CHECKING

from gpunode.schema import Model

if TYPE_CHECKING:
    from gpunode.config import Connection, NodeConfig


class Firewall(Model):
    """gpunode's nftables table (roles/firewall.py)."""


class Hardening(Model):
    """sshd, sysctl and OS hardening (roles/hardening.py)."""


def check_host(where: str, config: NodeConfig, connection: Connection) -> list[str]:
    """Checks that need the merged config (and the host's connection); [] when fine."""
    return []
