"""A node, its connection, and an inventory: the top of gpunode's configuration schema.

:class:`NodeConfig` is everything gpunode knows about one node after the inventory's
layers are merged (``defaults`` < each group < the host's ``data``); each of its keys is
one module of this package. :class:`InventoryFile` is the YAML file as written;
:class:`Inventory` the validated result that gpunode/config.py builds from it.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SerializerFunctionWrapHandler,
    field_validator,
    model_serializer,
    model_validator,
)

from gpunode.schema.base import Base
from gpunode.schema.distros import DISTROS
from gpunode.schema.firewall import Firewall
from gpunode.schema.gateway import Gateway, RemoteServer
from gpunode.schema.gpu import Gpu
from gpunode.schema.hardening import Hardening
from gpunode.schema.inference import Inference
from gpunode.schema.monitoring import Monitoring
from gpunode.schema.network import Network
from gpunode.schema.nomad import Nomad
from gpunode.schema.nvidia import Cuda, Nvidia
from gpunode.schema.types import (
    ControllerPath,
    GroupName,
    InventoryName,
    Model,
    SecretName,
    UserName,
)
from gpunode.schema.vault import Secret, Vault

RESERVED_GROUPS = frozenset({"all", "ungrouped"})  # pyinfra's own group names


class NodeConfig(Model):
    """Everything gpunode knows about one node, after merging the layers."""

    distro: Literal[tuple(DISTROS)] | None = None  # type: ignore[valid-type]
    """The node's distro and version, a row of gpunode/schema/distros.py. A layer may leave it
    out, but every host must have one after merging (checked at config load)."""
    base: Base = Field(default_factory=Base)
    """What every node gets: hostname, package sources, admin users, journald, NTP and
    automatic updates."""
    network: Network = Field(default_factory=Network)
    """Who may reach the node: the CIDRs the firewall opens each kind of port to."""
    nvidia: Nvidia = Field(default_factory=Nvidia)
    """The NVIDIA driver."""
    cuda: Cuda = Field(default_factory=Cuda)
    """The CUDA toolkit, the NVIDIA Container Toolkit and DCGM."""
    gpu: Gpu = Field(default_factory=Gpu)
    """The GPUs the node declares."""
    firewall: Firewall = Field(default_factory=Firewall)
    """gpunode's nftables table."""
    hardening: Hardening = Field(default_factory=Hardening)
    """sshd, sysctl and OS hardening."""
    vault: Vault = Field(default_factory=Vault)
    """How the controller reaches Vault to read `secrets`."""
    secrets: dict[SecretName, Secret] = Field(default_factory=dict)
    """Secrets by name, read from Vault by the controller and written on the node as env files.
    A name is a-z, 0-9, '_' and '-', starting with a letter or digit, at most 63 characters
    (checked at config load): it names the env file."""
    inference: Inference = Field(default_factory=Inference)
    """The node's inference runtimes and services (systemd units)."""
    gateway: Gateway = Field(default_factory=Gateway)
    """The inference front door: HAProxy with TLS from Vault PKI, per-client keys and rate
    limits, a route allow-list, in front of the node's inference services."""
    nomad: Nomad = Field(default_factory=Nomad)
    """The Nomad client and the inference services it runs as jobs."""
    monitoring: Monitoring = Field(default_factory=Monitoring)
    """Exporters, the drift report's textfile directory and the controller's drift timer."""

    @model_validator(mode="before")
    @classmethod
    def _fronted_listen_on_loopback(cls, data: Any) -> Any:
        """A service the gateway fronts listens on 127.0.0.1 unless its `listen` is set (and
        then gpunode/gateway.py refuses anything but loopback)."""
        if not isinstance(data, dict):
            return data
        gateway, inference = data.get("gateway"), data.get("inference")
        if not (isinstance(gateway, dict) and gateway.get("enabled") is True):
            return data
        if not isinstance(inference, dict):
            return data
        services = inference.get("services")
        if not isinstance(services, dict):
            return data
        names = gateway.get("services")
        if not names:  # every enabled systemd service (gpunode.gateway.fronted)
            nomad = data.get("nomad")
            jobs = nomad.get("jobs") if isinstance(nomad, dict) else None
            names = [
                n
                for n, svc in services.items()
                if not (isinstance(svc, dict) and svc.get("enabled") is False)
                and not (isinstance(jobs, dict) and n in jobs)
            ]
        if not isinstance(names, list):
            return data
        patched = dict(services)
        for name in names:
            svc = services.get(name) if isinstance(name, str) else None
            if isinstance(svc, dict) and "listen" not in svc:
                patched[name] = {**svc, "listen": "127.0.0.1"}
        return {**data, "inference": {**inference, "services": patched}}

    # What the rest of the inventory says about this node (gpunode/gateway.py ``link``, at
    # load): never an inventory key, part of the node's data all the same (dumps, digests).
    _upstream_servers: tuple[RemoteServer, ...] = PrivateAttr(default=())
    _gateway_sources: tuple[tuple[str, tuple[str, ...]], ...] = PrivateAttr(default=())

    @property
    def upstream_servers(self) -> tuple[RemoteServer, ...]:
        """On a gateway host: the services of its `gateway.upstreams` it fronts."""
        return self._upstream_servers

    @property
    def gateway_sources(self) -> dict[str, tuple[str, ...]]:
        """On an upstream: service name -> the addresses of the gateways that front it (its
        port is open to them only)."""
        return dict(self._gateway_sources)

    def linked(
        self, servers: tuple[RemoteServer, ...], sources: dict[str, tuple[str, ...]]
    ) -> NodeConfig:
        """A copy that knows what the rest of the inventory says about this node."""
        copy = self.model_copy()
        copy._upstream_servers = servers
        copy._gateway_sources = tuple(sorted(sources.items()))
        return copy

    @model_serializer(mode="wrap")
    def _with_links(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        if self._upstream_servers or self._gateway_sources:
            data["links"] = {
                "upstream_servers": [vars(s).copy() for s in self._upstream_servers],
                "gateway_sources": {k: list(v) for k, v in self._gateway_sources},
            }
        return data

    def to_json(self) -> dict[str, Any]:
        """pyinfra's JSON hook (``pyinfra INVENTORY debug-inventory``, ``--json``)."""
        return self.model_dump(mode="json")


class Connection(Model):
    """How the controller reaches the host: pyinfra's SSH connection settings."""

    address: str
    """The host's IP address (IPv4 or IPv6) or DNS name, e.g. 192.0.2.10 or
    gpu-01.example.com, stored in one spelling (IP addresses as Python's ipaddress writes
    them, DNS names lowercase without a trailing dot). Each address and port once in an
    inventory."""
    port: Annotated[int, Field(ge=1, le=65535)] = 22
    """The SSH port (also the port the firewall opens to `network.admin_cidrs`)."""
    user: UserName = "root"
    """The user gpunode logs in as: root, or an admin user with sudo."""
    key_file: ControllerPath | None = None
    """The SSH private key file on the controller (pyinfra's `ssh_key`); unset: the SSH agent
    and the user's default keys."""
    known_hosts_file: ControllerPath | None = None
    """The known_hosts file on the controller that holds the host's key (pyinfra's
    `ssh_known_hosts_file`); unset: pyinfra's default, `~/.ssh/known_hosts`."""
    strict_host_key_checking: Literal["yes", "no", "accept-new"] = "yes"
    """yes: the host key must already be known; accept-new: an unknown host's key is added on
    first connection, a changed one refused; no: host keys are not checked."""
    ssh_config_file: ControllerPath | None = None
    """An OpenSSH client config file on the controller (e.g. for ProxyJump). With one set,
    config load does not check that `network.admin_cidrs` covers this controller's address."""
    connect_retries: Annotated[int, Field(ge=0, le=10)] = 2
    """New connections retried on a transient failure (refused, timed out, a dropped auth
    exchange) before the host counts as unreachable."""

    @field_validator("address")
    @classmethod
    def _address(cls, value: str) -> str:
        """One spelling per address: 2001:DB8:0::1 is 2001:db8::1, GPU-01.Example.com. is
        gpu-01.example.com, and 192.0.2.010 is refused."""
        try:
            address = ipaddress.ip_address(value)
        except ValueError:
            pass
        else:
            if getattr(address, "scope_id", None):
                raise ValueError(
                    f"{value!r} has a zone index (allowed: an address without %zone: ssh "
                    "reads '%' as one of its tokens)"
                )
            return str(address)
        label = r"[a-zA-Z0-9]([a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?"
        if len(value) > 253 or not re.fullmatch(rf"{label}(\.{label})*\.?", value):
            raise ValueError(
                f"{value!r} is not an IP address or DNS name (allowed: e.g. 192.0.2.10, "
                "2001:db8::10, gpu-01.example.com)"
            )
        name = value.lower().removesuffix(".")
        if name.rpartition(".")[2].isdigit():
            # 192.0.2.010, 2130706433: not a DNS name (no top-level domain is numeric), and
            # inet_aton would read it as another spelling of an IP address
            raise ValueError(
                f"{value!r} is neither an IP address nor a DNS name (allowed: an IPv4 address "
                "as four decimal numbers without leading zeros, e.g. 192.0.2.10, or a DNS name)"
            )
        return name

    def pyinfra_data(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "ssh_hostname": self.address,
            "ssh_port": self.port,
            "ssh_user": self.user,
            "ssh_strict_host_key_checking": self.strict_host_key_checking,
            "ssh_connect_retries": self.connect_retries,
        }
        if self.key_file:
            data["ssh_key"] = self.key_file
        if self.known_hosts_file:
            data["ssh_known_hosts_file"] = self.known_hosts_file
        if self.ssh_config_file:
            data["ssh_config_file"] = self.ssh_config_file
        return data


class HostEntry(Model):
    """One host of the inventory: how to reach it, its groups and its own settings."""

    RAW_LAYERS = frozenset({"data"})

    connection: Connection
    """How the controller reaches the host."""
    groups: list[GroupName] = Field(default_factory=list)
    """The groups the host is in (names defined under `groups:`), each once. Their data is
    merged in this order, after `defaults` and before the host's own `data`."""
    data: dict[str, Any] = Field(default_factory=dict)
    """The host's own node settings (the keys of the sections below), merged last."""


class GroupEntry(Model):
    """A group of hosts and the node settings they share."""

    RAW_LAYERS = frozenset({"data"})

    data: dict[str, Any] = Field(default_factory=dict)
    """Node settings (the keys of the sections below) for the group's hosts, merged over
    `defaults`."""


class InventoryFile(Model):
    """An inventory YAML file as written: three layers of node settings and the hosts.

    A host's settings are `defaults`, then each of its `groups` in the order listed, then its
    own `data`, deep-merged (mappings merge key by key, lists replace). Each layer alone must
    be valid node settings, and so must the merged result."""

    RAW_LAYERS = frozenset({"defaults"})

    defaults: dict[str, Any] = Field(default_factory=dict)
    """Node settings (the keys of the sections below) every host starts from."""
    groups: dict[GroupName, GroupEntry] = Field(default_factory=dict)
    """Groups by name; `all` and `ungrouped` are pyinfra's own and not allowed."""
    hosts: dict[InventoryName, HostEntry]
    """Hosts by inventory name: letters, digits, '.', '_' and '-', starting with a letter or
    digit. The name is also the host's default hostname (`base.hostname`), when it is a
    valid one."""


class Host(BaseModel):
    """One validated host: inventory name, groups, connection and merged node config."""

    model_config = ConfigDict(frozen=True, use_attribute_docstrings=True)

    name: str
    """The host's inventory name."""
    groups: tuple[str, ...]
    """The groups the host is in, in the order their data was merged."""
    connection: Connection
    """How the controller reaches the host."""
    config: NodeConfig
    """The node settings after merging defaults, the host's groups and its own data."""


class Inventory(BaseModel):
    """A validated inventory: every host with its merged config, and the groups."""

    model_config = ConfigDict(frozen=True, use_attribute_docstrings=True)

    source: str
    """The inventory file the hosts were read from."""
    hosts: dict[str, Host]
    """The hosts by inventory name, in inventory order."""
    groups: dict[str, tuple[str, ...]]
    """group -> host names, in inventory order (hosts in no group are in `ungrouped`)."""

    def pyinfra_groups(self) -> dict[str, list[tuple[str, dict[str, Any]]]]:
        """Module-level groups for a pyinfra inventory file (``globals().update(...)``)."""
        out: dict[str, list[tuple[str, dict[str, Any]]]] = {}
        for group, names in self.groups.items():
            out[group] = [(name, host_data(self.hosts[name])) for name in names]
        return out


def host_data(host: Host) -> dict[str, Any]:
    return {**host.connection.pyinfra_data(), "gpunode": host.config}
