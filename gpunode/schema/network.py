"""``network:``: who may reach the node (the firewall role opens ports to these CIDRs)."""

from __future__ import annotations

from pydantic import Field

from gpunode.schema.types import Cidr, Model


class Network(Model):
    """Who may reach the node. Used by the firewall role; validated here."""

    admin_cidrs: list[Cidr] = Field(default_factory=list)
    """Sources that may reach SSH. Required (non-empty) with `firewall.enabled`, and at
    config load one must cover the address this controller reaches the host from."""
    app_cidrs: list[Cidr] = Field(default_factory=list)
    """Sources that may reach the inference ports."""
    monitoring_cidrs: list[Cidr] = Field(default_factory=list)
    """Sources that may reach the metrics ports (node_exporter, dcgm-exporter, a runtime's
    own metrics port)."""
    cluster_cidrs: list[Cidr] = Field(default_factory=list)
    """Nomad servers and peers: sources that may reach the Nomad client's ports."""
