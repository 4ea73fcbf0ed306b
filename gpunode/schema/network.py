"""``network:``: who may reach the node (the firewall role opens ports to these CIDRs)."""

from __future__ import annotations

from pydantic import Field

from gpunode.schema.types import Cidr, Model


class Network(Model):
    """Who may reach the node. Used by the firewall role; validated here."""

    admin_cidrs: list[Cidr] = Field(default_factory=list)  # SSH
    app_cidrs: list[Cidr] = Field(default_factory=list)  # inference ports
    monitoring_cidrs: list[Cidr] = Field(default_factory=list)  # metrics ports
    cluster_cidrs: list[Cidr] = Field(default_factory=list)  # Nomad servers and peers
