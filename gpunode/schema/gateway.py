"""``gateway:``: the inference front door, HAProxy in front of a node's inference services.

roles/gateway.py installs the distro's HAProxy and renders its whole configuration
(gpunode/gateway.py, templates/gateway/haproxy.cfg.j2): TLS with a certificate issued by
Vault's PKI secrets engine, a client lookup by the SHA-256 of the bearer key (the node
never holds a key in clear), per-client rate limits in a stick table, a route allow-list,
health-checked backends on 127.0.0.1, Prometheus metrics on their own port. Every default
is here, next to its field.

.. code:: yaml

    gateway:
      enabled: true
      port: 8443                      # opened to network.app_cidrs
      tls:
        role: gpunode-gateway         # pki/issue/gpunode-gateway
        ttl: 720h                     # renewed with a third left
      clients:
        alice:
          key: {path: gpunode/clients/alice, key: api_key}
          rate: 5                     # requests/s, sustained over 10 s
          burst: 10                   # requests in any one second
          concurrent: 2               # requests in flight
          models: [chat]              # served names it may use; [] = every model

A fronted service listens on 127.0.0.1 (its default then); the firewall opens only the
gateway's port to ``network.app_cidrs``.

A gateway host (or a group of them) may also front other nodes: ``upstreams`` names them
by inventory name. Their services are its backends too, one HAProxy backend per model name
(the nodes serving one model share its requests, each health-checked); on each upstream the
firewall opens those services' ports to the gateways' ``source_addresses`` only.

.. code:: yaml

    groups:
      gateways:                       # one or more gateway hosts
        data:
          gateway:
            enabled: true
            upstreams: [gpu-01, gpu-02]   # inventory names
            clients: {...}
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, ClassVar

from pydantic import Field, ValidationInfo, field_validator, model_validator

from gpunode.schema.types import (
    Duration,
    InventoryName,
    IpAddress,
    KvPath,
    Model,
    Name,
    SecretKey,
    ServedName,
    ServiceName,
    UnprivilegedPort,
    listed_twice,
    parse_duration_ns,
)

ROUTES = (
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/models",
)
"""The OpenAI-compatible routes a gateway may pass; everything else is 404 at the gateway."""

HEALTH_ROUTE = "/health"
"""Answered by the gateway itself, without a key: 200 while a backend is up, else 503."""

HAPROXY_DIR = "/etc/haproxy/gpunode"  # node path: maps, and tls/ for the certificate
MIN_TTL_S = 60


def duration_s(value: str) -> int:
    """Whole seconds of a Duration string (72h, 90m, 3600s)."""
    return parse_duration_ns(value) // 1_000_000_000


class ClientKey(Model):
    """Where a client's API key lives in Vault (KV v2). The controller reads it and gives
    the node its SHA-256 only."""

    mount: KvPath = "secret"
    """The KV v2 mount."""
    path: KvPath
    """The path in the mount, without data/ (e.g. gpunode/clients/alice)."""
    key: SecretKey = "api_key"
    """The key inside the secret."""

    def where(self) -> str:
        return f"{self.mount}/{self.path}#{self.key}"


class Client(Model):
    """One client of the gateway: its key, its limits and the models it may use."""

    key: ClientKey
    """Its API key in Vault; each client has its own path (keys are never shared)."""
    rate: Annotated[int, Field(ge=1, le=100_000)] = 10
    """Requests per second, sustained (counted over 10 s); above it: 429 with Retry-After."""
    burst: Annotated[int, Field(ge=1, le=100_000)] | None = None
    """Requests in any one second; default: 2 x rate. At least `rate`."""
    concurrent: Annotated[int, Field(ge=1, le=10_000)] = 4
    """Requests in flight at once; above it: 429."""
    models: list[ServedName] = Field(default_factory=list)
    """The served model names it may ask for (the `model` of a request); [] = every model
    the gateway serves. Another model: 403."""
    mtls: bool = False
    """Also require a TLS client certificate from the gateway's CA (`tls.mount`) whose CN is
    the client's name; without one: 403. The key is still required."""
    revoked: bool = False
    """true: its key is refused (401) from the next deploy on, the entry stays as a record."""

    @model_validator(mode="after")
    def _limits(self) -> Client:
        if self.burst is not None and self.burst < self.rate:
            raise ValueError(
                f"burst: {self.burst} is below rate {self.rate} (allowed: at least rate, "
                "or unset for 2 x rate)"
            )
        if listed_twice(self.models):
            raise ValueError("models: a model is listed twice (allowed: each once)")
        return self

    def effective_burst(self) -> int:
        return self.burst or 2 * self.rate


class Tls(Model):
    """The gateway's certificate, issued by Vault's PKI secrets engine through the
    controller's Vault login (`vault:`), renewed when less than a third of its lifetime is
    left, on a deploy and on the scheduled drift run."""

    mount: KvPath = "pki"
    """The PKI secrets engine's mount."""
    role: Name = "gpunode-gateway"
    """The PKI role (`<mount>/issue/<role>`); it must exist and allow the names below, and
    the controller's policy must allow `update` on its issue path (checked before anything
    is written)."""
    ttl: Duration = "720h"
    """The certificate's lifetime (at least 60s, at most the role's max_ttl). Renewed with a
    third of it left (10 days of 30); the expiry alert fires under 7 days, when renewals
    have failed for 3 days."""
    names: list[str] = Field(default_factory=list)
    """DNS names the certificate holds (the first is its CN); default: `base.hostname` (or
    the inventory name) and the connection address when it is a DNS name."""
    ip_sans: list[IpAddress] = Field(default_factory=list)
    """IP addresses the certificate holds; default: the connection address when it is an IP
    address, and `gateway.listen` when it is not a wildcard."""
    min_version: str = "TLSv1.2"
    """The oldest TLS version accepted: TLSv1.2 or TLSv1.3."""

    @field_validator("ttl")
    @classmethod
    def _ttl(cls, value: str) -> str:
        if duration_s(value) < MIN_TTL_S:
            raise ValueError(f"{value} is shorter than {MIN_TTL_S}s (allowed: 60s or more)")
        return value

    @field_validator("names")
    @classmethod
    def _names(cls, value: list[str]) -> list[str]:
        label = r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?"
        for name in value:
            if len(name) > 253 or not re.fullmatch(rf"{label}(\.{label})*", name):
                raise ValueError(
                    f"{name!r} is not a lowercase DNS name (allowed: e.g. gpu-01.example.com)"
                )
            if name.rpartition(".")[2].isdigit():  # 192.0.2.1: an address, not a name
                raise ValueError(
                    f"{name!r} reads as an IP address, not a DNS name (allowed: a DNS name; "
                    "addresses go in tls.ip_sans)"
                )
        if listed_twice(value):
            raise ValueError("a name is listed twice (allowed: each once)")
        return value

    @field_validator("min_version")
    @classmethod
    def _min_version(cls, value: str) -> str:
        if value not in ("TLSv1.2", "TLSv1.3"):
            raise ValueError(f"{value!r} (allowed: TLSv1.2 or TLSv1.3)")
        return value


class Gateway(Model):
    """HAProxy in front of the node's inference services."""

    OPTIONS: ClassVar[frozenset[str]] = frozenset()

    enabled: bool = False
    """Put the gateway in front of the node's services."""
    listen: IpAddress = "0.0.0.0"  # noqa: S104
    """The address the TLS listener binds (0.0.0.0 or :: for every address)."""
    port: UnprivilegedPort = 8443
    """The TLS port; the firewall opens it to `network.app_cidrs` (and no fronted service's
    own port)."""
    metrics_port: UnprivilegedPort = 8405
    """HAProxy's Prometheus endpoint (`/metrics`); opened to `network.monitoring_cidrs`."""
    services: list[ServiceName] = Field(default_factory=list)
    """The inference services it fronts (names in `inference.services`); [] = every
    enabled systemd service of the node. A fronted service listens on 127.0.0.1."""
    routes: list[str] = Field(default_factory=lambda: list(ROUTES))
    """The routes that pass (a subset of /v1/chat/completions, /v1/completions,
    /v1/embeddings, /v1/models); `/health` is always answered by the gateway itself."""
    clients: dict[Name, Client] = Field(default_factory=dict)
    """Clients by name (it appears in the logs and metrics, never the key)."""
    tls: Tls = Field(default_factory=Tls)
    """The certificate."""
    max_body: Annotated[int, Field(ge=1024, le=16 * 1024 * 1024)] = 262_144
    """Largest request body in bytes (413 above it; a POST needs a Content-Length, 411
    without). HAProxy's buffer is sized to hold it: memory per connection is about twice
    this."""
    maxconn: Annotated[int, Field(ge=16, le=100_000)] = 1000
    """Connections at once, all clients together."""
    request_timeout: Annotated[int, Field(ge=1, le=600)] = 10
    """Seconds a client has to send a whole request (headers and body): slow clients are
    cut off (408)."""
    client_timeout: Annotated[int, Field(ge=1, le=3600)] = 60
    """Seconds of client inactivity before the connection is closed."""
    server_timeout: Annotated[int, Field(ge=1, le=3600)] = 300
    """Seconds the backend has to answer (a long generation); then 504."""
    connect_timeout: Annotated[int, Field(ge=1, le=60)] = 5
    """Seconds to connect to a backend."""
    upstreams: list[InventoryName] = Field(default_factory=list)
    """Other hosts of the inventory whose inference services this gateway also fronts (by
    inventory name): each enabled systemd service with an OpenAI-compatible API on them is a
    backend, reached at its `listen` address (the host's connection address when that is a
    wildcard) in plain HTTP. On an upstream the firewall opens those ports to the gateways'
    `source_addresses` only, never to `network.app_cidrs`. An upstream runs no gateway of its
    own. []: this node's own services only."""
    source_addresses: list[IpAddress] = Field(default_factory=list)
    """The addresses this gateway connects to its upstreams from (what their firewalls
    let in); default: its connection address, which must then be an IP address."""

    @field_validator("routes")
    @classmethod
    def _routes(cls, value: list[str]) -> list[str]:
        for route in value:
            if route not in ROUTES:
                raise ValueError(
                    f"{route!r} is not an allowed route (allowed: {', '.join(ROUTES)})"
                )
        if listed_twice(value):
            raise ValueError("a route is listed twice (allowed: each once)")
        if not value:
            raise ValueError("empty: no request could pass (allowed: at least one route)")
        return value

    @field_validator("services", "upstreams", "source_addresses")
    @classmethod
    def _once(cls, value: list[str], info: ValidationInfo) -> list[str]:
        if listed_twice(value):
            kind = {"services": "service", "upstreams": "host"}.get(info.field_name or "")
            raise ValueError(
                f"{'an' if kind is None else 'a'} {kind or 'address'} is listed "
                "twice (allowed: each once)"
            )
        return value

    @model_validator(mode="after")
    def _one_key_per_client(self) -> Gateway:
        seen: dict[str, str] = {}
        for name, client in self.clients.items():
            where = client.key.where()
            if where in seen:
                raise ValueError(
                    f"clients.{name}.key: {where} is also the key of client {seen[where]} "
                    "(allowed: one Vault key per client, so revoking one touches no other)"
                )
            seen[where] = name
        return self


@dataclass(frozen=True)
class RemoteServer:
    """A service on an upstream that a gateway fronts. gpunode/gateway.py ``link`` derives
    it from the whole inventory at load; it is never an inventory key."""

    host: str
    """The upstream's inventory name."""
    service: str
    """The service's name in the upstream's `inference.services`."""
    address: str
    """Where the gateway connects: the service's listen address, or the upstream's
    connection address when it listens on a wildcard."""
    port: int
    served: str
    """The model name clients ask for."""
    runtime: str
