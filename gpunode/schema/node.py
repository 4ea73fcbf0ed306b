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

from pydantic import BaseModel, ConfigDict, Field, field_validator

from gpunode.schema.base import Base
from gpunode.schema.distros import DISTROS
from gpunode.schema.firewall import Firewall
from gpunode.schema.gpu import Gpu
from gpunode.schema.hardening import Hardening
from gpunode.schema.inference import Inference
from gpunode.schema.monitoring import Monitoring
from gpunode.schema.network import Network
from gpunode.schema.nomad import Nomad
from gpunode.schema.nvidia import Cuda, Nvidia
from gpunode.schema.types import GroupName, Model, UserName
from gpunode.schema.vault import Secret, Vault

RESERVED_GROUPS = frozenset({"all", "ungrouped"})  # pyinfra's own group names


class NodeConfig(Model):
    """Everything gpunode knows about one node, after merging the layers."""

    distro: Literal[tuple(DISTROS)] | None = None  # type: ignore[valid-type]
    base: Base = Field(default_factory=Base)
    network: Network = Field(default_factory=Network)
    nvidia: Nvidia = Field(default_factory=Nvidia)
    cuda: Cuda = Field(default_factory=Cuda)
    gpu: Gpu = Field(default_factory=Gpu)
    firewall: Firewall = Field(default_factory=Firewall)
    hardening: Hardening = Field(default_factory=Hardening)
    vault: Vault = Field(default_factory=Vault)
    secrets: dict[str, Secret] = Field(default_factory=dict)
    inference: Inference = Field(default_factory=Inference)
    nomad: Nomad = Field(default_factory=Nomad)
    monitoring: Monitoring = Field(default_factory=Monitoring)

    def to_json(self) -> dict[str, Any]:
        """pyinfra's JSON hook (``pyinfra INVENTORY debug-inventory``, ``--json``)."""
        return self.model_dump(mode="json")


class Connection(Model):
    address: str
    port: Annotated[int, Field(ge=1, le=65535)] = 22
    user: UserName = "root"
    key_file: str | None = None
    known_hosts_file: str | None = None
    strict_host_key_checking: Literal["yes", "no", "accept-new"] = "yes"
    ssh_config_file: str | None = None
    # New connections retried on a transient failure (refused, timed out, a dropped auth
    # exchange) before the host counts as unreachable
    connect_retries: Annotated[int, Field(ge=0, le=10)] = 2

    @field_validator("address")
    @classmethod
    def _address(cls, value: str) -> str:
        try:
            ipaddress.ip_address(value)
            return value
        except ValueError:
            pass
        label = r"[a-zA-Z0-9]([a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?"
        if len(value) > 253 or not re.fullmatch(rf"{label}(\.{label})*\.?", value):
            raise ValueError(
                f"{value!r} is not an IP address or DNS name (allowed: e.g. 192.0.2.10, "
                "2001:db8::10, gpu-01.example.com)"
            )
        return value

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
    connection: Connection
    groups: list[GroupName] = Field(default_factory=list)
    data: dict[str, Any] = Field(default_factory=dict)


class GroupEntry(Model):
    data: dict[str, Any] = Field(default_factory=dict)


class InventoryFile(Model):
    defaults: dict[str, Any] = Field(default_factory=dict)
    groups: dict[GroupName, GroupEntry] = Field(default_factory=dict)
    hosts: dict[str, HostEntry]


class Host(BaseModel):
    """One validated host: inventory name, groups, connection and merged node config."""

    model_config = ConfigDict(frozen=True)

    name: str
    groups: tuple[str, ...]
    connection: Connection
    config: NodeConfig


class Inventory(BaseModel):
    model_config = ConfigDict(frozen=True)

    source: str
    hosts: dict[str, Host]
    groups: dict[str, tuple[str, ...]]  # group -> host names, in inventory order

    def pyinfra_groups(self) -> dict[str, list[tuple[str, dict[str, Any]]]]:
        """Module-level groups for a pyinfra inventory file (``globals().update(...)``)."""
        out: dict[str, list[tuple[str, dict[str, Any]]]] = {}
        for group, names in self.groups.items():
            out[group] = [(name, host_data(self.hosts[name])) for name in names]
        return out


def host_data(host: Host) -> dict[str, Any]:
    return {**host.connection.pyinfra_data(), "gpunode": host.config}
