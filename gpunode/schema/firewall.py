"""``firewall:``: gpunode's nftables table (roles/firewall.py). Who may reach which port
comes from ``network:`` (gpunode/schema/network.py); the ruleset from gpunode/firewall.py.

.. code:: yaml

    network:
      admin_cidrs: [192.0.2.0/28]        # SSH
      app_cidrs: [198.51.100.0/24]       # inference ports
    firewall:
      enabled: true
      extra_input:
        - {name: node-api, proto: tcp, port: 8443, cidrs: [192.0.2.0/28]}
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator

from gpunode.schema.types import Cidr, IfName, Model, Port, Rate, RuleName, listed_twice


class InputRule(Model):
    """One extra port open to some sources (besides SSH, inference, metrics, cluster)."""

    name: RuleName
    """The rule's name, unique in `extra_input`; shows in the ruleset as a comment."""
    proto: Literal["tcp", "udp"] = "tcp"
    """The protocol."""
    port: Port
    """The port opened; not the SSH port, which `network.admin_cidrs` controls."""
    cidrs: list[Cidr] = Field(min_length=1)
    """The sources that may reach it, at least one."""


class Firewall(Model):
    """gpunode's nftables table (roles/firewall.py).

    Input policy drop: allowed are established/related, loopback, rate-limited ICMP and the
    ICMPv6 that IPv6 needs, SSH (the connection's port) from network.admin_cidrs, the
    inference ports from network.app_cidrs, the metrics ports from network.monitoring_cidrs,
    the Nomad ports from network.cluster_cidrs, and extra_input.
    """

    enabled: bool = False
    """Off until an inventory turns it on: a drop-policy firewall needs admin_cidrs that
    match how the controller reaches each node (checked at config load)."""
    force_admin_cidrs: bool = False
    """Load the config even when no admin CIDR covers the address this controller reaches
    the host from (a NAT, a jump host): the anti-lockout rollback is then the only guard."""
    extra_input: list[InputRule] = Field(default_factory=list)
    """Extra ports, each rule name once."""
    containers: bool = False
    """The node runs containers (Docker, Podman, Nomad, Kubernetes): forwarding is on and
    the forward chain lets container traffic out and lets published ports (DNAT) in from
    the same CIDRs as the input chain; everything else forwarded is dropped. false: the
    node routes nothing (forward policy drop, no exceptions)."""
    container_interfaces: list[IfName] = Field(
        default_factory=lambda: ["docker0", "br-*", "cni*", "nomad", "podman*"]
    )
    """With `containers`: the container bridges whose traffic the forward chain lets out
    (a trailing `*` is a wildcard)."""
    icmp_rate: Rate = "10/second"
    """Echo requests (IPv4 and IPv6) above this rate are dropped."""
    log_drops: bool = True
    """Log dropped packets ("gpunode-drop" prefix in the kernel log)."""
    log_rate: Rate = "5/minute"
    """At most this many drop log lines."""
    rollback_seconds: Annotated[int, Field(ge=20, le=600)] = 60
    """Seconds after applying a new ruleset before the node restores the previous one by
    itself, unless a NEW SSH connection from the controller confirmed it in time."""

    @field_validator("extra_input")
    @classmethod
    def _unique_names(cls, rules: list[InputRule]) -> list[InputRule]:
        dupes = listed_twice(r.name for r in rules)
        if dupes:
            raise ValueError(f"rule name listed twice: {', '.join(dupes)} (allowed: each once)")
        return rules
