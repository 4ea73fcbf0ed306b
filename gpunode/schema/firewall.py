"""``firewall:``: gpunode's nftables table (roles/firewall.py). Who may reach which port
comes from ``network:`` (gpunode/schema/network.py); the ruleset from gpunode/firewall.py.

On by default. A node that serves something on the network (SSH always; inference,
metrics, Nomad when configured) needs the CIDRs that may reach it in ``network:``, or
``firewall.enabled: false`` said explicitly (config load refuses anything else, and every
run prints the hosts whose firewall is off).

.. code:: yaml

    network:
      admin_cidrs: [192.0.2.0/28]        # SSH
      app_cidrs: [198.51.100.0/24]       # inference ports
      monitoring_cidrs: []               # metrics ports: closed to every address
    firewall:
      extra_input:
        - {name: node-api, proto: tcp, port: 8443, cidrs: [192.0.2.0/28]}
      egress:
        enabled: true                    # the output chain allows only what the node needs
        addresses: {proxy.example.com: [192.0.2.50/32]}
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator

from gpunode.schema.types import (
    Cidr,
    IfName,
    Model,
    NtpServer,
    Port,
    Rate,
    RuleName,
    listed_twice,
)


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


class OutputRule(Model):
    """One extra destination the node may connect to with `egress` on."""

    name: RuleName
    """The rule's name, unique in `egress.extra`; shows in the ruleset as a comment."""
    proto: Literal["tcp", "udp"] = "tcp"
    """The protocol."""
    port: Port
    """The destination port."""
    cidrs: list[Cidr] = Field(min_length=1)
    """The destinations, at least one."""


class Egress(Model):
    """The output chain as an allow-list (off by default: the node may connect anywhere).

    On: allowed are loopback, established/related, the ICMP/ICMPv6 that IP needs (errors,
    neighbour discovery, MLD), DHCP/DHCPv6 client requests, DNS to `dns_cidrs`, NTP (udp
    123) to `base.ntp_servers`, the package proxy `base.apt_proxy` (or, without a proxy, the
    mirrors: `base.apt_mirror`, `nvidia.mirror`, `cuda.container_toolkit_mirror`,
    `nomad.repo_url`), `vault.addr`, and `extra`. Everything else is dropped and counted in
    the named counter `egress_dropped` (`nft list counter inet gpunode egress_dropped`).

    nft rules hold addresses, not names, and gpunode does not resolve names for them (the
    controller's DNS may answer differently from the node's, and pools and CDNs rotate,
    which would change the ruleset on every run): a server given by name needs its CIDRs
    in `addresses` (checked at config load); one given by IP address needs nothing.
    Nomad servers, container registries and model downloads need `extra` rules.
    """

    enabled: bool = False
    """Drop every new outbound connection that is not on the list above."""
    dns_cidrs: list[Cidr] | None = None
    """Resolvers the node may query (udp and tcp 53); null: any address (the node's
    resolv.conf is not in the inventory). List your resolvers to close DNS as a way out."""
    addresses: dict[NtpServer, list[Cidr]] = Field(default_factory=dict)
    """The addresses of the servers named by DNS name in `base.ntp_servers`,
    `base.apt_proxy`, the mirror URLs and `vault.addr` (name -> CIDRs), e.g.
    `proxy.example.com: [192.0.2.50/32]`."""
    extra: list[OutputRule] = Field(default_factory=list)
    """Extra destinations, each rule name once."""

    @field_validator("extra")
    @classmethod
    def _unique_names(cls, rules: list[OutputRule]) -> list[OutputRule]:
        dupes = listed_twice(r.name for r in rules)
        if dupes:
            raise ValueError(f"rule name listed twice: {', '.join(dupes)} (allowed: each once)")
        return rules

    @field_validator("addresses")
    @classmethod
    def _some_cidrs(cls, addresses: dict[str, list[object]]) -> dict[str, list[object]]:
        empty = sorted(name for name, cidrs in addresses.items() if not cidrs)
        if empty:
            raise ValueError(
                f"no CIDR for {', '.join(empty)} (allowed: at least one, e.g. [192.0.2.50/32])"
            )
        return {name.lower(): cidrs for name, cidrs in addresses.items()}


class Firewall(Model):
    """gpunode's nftables table (roles/firewall.py).

    Input policy drop: allowed are established/related, loopback, rate-limited ICMP and the
    ICMPv6 that IPv6 needs, DHCPv6 replies (udp 547 -> 546 from link-local addresses), SSH
    (the connection's port) from network.admin_cidrs, the inference ports from
    network.app_cidrs, the metrics ports from network.monitoring_cidrs, the Nomad ports
    from network.cluster_cidrs, and extra_input. Output: everything, or with `egress` on
    only what the node needs.
    """

    enabled: bool = True
    """On unless an inventory says `false`. With it on, `network.admin_cidrs` must cover how
    the controller reaches each node, and each kind of service the node runs needs its
    `network:` key set (checked at config load); with it off, every run prints the hosts."""
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
    egress: Egress = Field(default_factory=Egress)
    """The output chain as an allow-list (off by default)."""

    @field_validator("extra_input")
    @classmethod
    def _unique_names(cls, rules: list[InputRule]) -> list[InputRule]:
        dupes = listed_twice(r.name for r in rules)
        if dupes:
            raise ValueError(f"rule name listed twice: {', '.join(dupes)} (allowed: each once)")
        return rules
