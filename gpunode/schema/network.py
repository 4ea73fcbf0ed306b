"""``network:``: who may reach the node (the firewall role opens ports to these CIDRs).

With the firewall on (the default), a key whose ports the node serves must be set:
`admin_cidrs` always (SSH), `app_cidrs` with inference services, `monitoring_cidrs` with
exporters (node_exporter is on by default), `cluster_cidrs` with Nomad. `[]` is a choice
too: those ports are closed to every address.
"""

from __future__ import annotations

from pydantic import Field

from gpunode.schema.types import Cidr, Model


class Network(Model):
    """Who may reach the node. Used by the firewall role; validated here."""

    admin_cidrs: list[Cidr] = Field(default_factory=list)
    """Sources that may reach SSH. Required (non-empty) with `firewall.enabled`, and at
    config load one must cover the address this controller reaches the host from."""
    app_cidrs: list[Cidr] = Field(default_factory=list)
    """Sources that may reach the inference ports. Required (`[]`: nobody) with
    `firewall.enabled` when the node runs an inference service."""
    monitoring_cidrs: list[Cidr] = Field(default_factory=list)
    """Sources that may reach the metrics ports (node_exporter, dcgm-exporter, and a
    runtime's own metrics port such as Triton's; vLLM and llama.cpp serve /metrics on their
    API port, reached from `app_cidrs`). Required
    (`[]`: nobody) with `firewall.enabled` when an exporter is on (node_exporter is by
    default)."""
    cluster_cidrs: list[Cidr] = Field(default_factory=list)
    """Nomad servers and peers: sources that may reach the Nomad client's ports. Required
    (`[]`: nobody) with `firewall.enabled` when `nomad.enabled`."""
