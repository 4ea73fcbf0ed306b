"""The inference front door on a node: which services the gateway fronts, the ports it
opens, the names its certificate holds, and the checks of ``gateway:`` against the rest of
a node's config.

The section (every default) is gpunode/schema/gateway.py; HAProxy's configuration is
rendered by gpunode/haproxy.py; certificates come from gpunode/clients/pki.py; the role is
roles/gateway.py.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass

from gpunode.schema.gateway import HAPROXY_DIR, Client, RemoteServer, duration_s
from gpunode.schema.inference import Service
from gpunode.schema.node import Connection, Host, NodeConfig
from gpunode.schema.runtimes import PROFILES

# --- node paths (one place) ----------------------------------------------------------------
CONFIG_FILE = "/etc/haproxy/haproxy.cfg"
TLS_DIR = f"{HAPROXY_DIR}/tls"
CERT_FILE = f"{TLS_DIR}/gateway.pem"  # leaf certificate, CA chain, private key: 0600 haproxy
KEYS_MAP = f"{HAPROXY_DIR}/keys.map"  # <sha256 of a client's key> <client>
PROXY_USER = "haproxy"  # the Debian/Ubuntu/EL package's user and group
UNIT = "haproxy.service"

# The HAProxy each distro's own archive ships, and whether the gateway's configuration has
# run on it (tests/unit/test_haproxy.py and the lab use Debian 12's 2.6.12). On the others a
# deploy checks the configuration with `haproxy -c` before HAProxy reloads, and every run says
# it is untested there.
HAPROXY: dict[str, tuple[str, bool]] = {
    "debian12": ("2.6", True),
    "ubuntu2204": ("2.4", False),
    "ubuntu2404": ("2.8", False),
    "rhel9": ("2.4", False),
    "rocky9": ("2.4", False),
    "alma9": ("2.4", False),
}


def fronted(config: NodeConfig) -> dict[str, Service]:
    """The inference services the gateway fronts, by name ({} without a gateway)."""
    gw = config.gateway
    if not gw.enabled:
        return {}
    names = gw.services or [
        n for n, s in config.inference.services.items() if s.enabled and n not in config.nomad.jobs
    ]
    return {n: config.inference.services[n] for n in names if n in config.inference.services}


def served_name(name: str, svc: Service) -> str:
    """The model name clients ask for (the runtime's --alias / --served-model-name)."""
    return svc.model.served_name or name


@dataclass(frozen=True)
class Server:
    """One server of a gateway backend: a service of this node or of an upstream."""

    name: str  # the HAProxy server name: the service, or <host>-<service> on an upstream
    service: str  # the service's name in its node's inference.services
    address: str  # an IP address
    port: int
    runtime: str
    where: str  # the config key it comes from, for messages


def backends(config: NodeConfig) -> dict[str, list[Server]]:
    """The gateway's backends: served model name -> its servers, this node's own services
    first (on loopback), then its upstreams' in inventory order. Nodes that serve one model
    share its requests."""
    out: dict[str, list[Server]] = {}
    for name, svc in fronted(config).items():
        out.setdefault(served_name(name, svc), []).append(
            Server(name, name, svc.listen, svc.port, svc.runtime, f"inference.services.{name}")
        )
    for remote in config.upstream_servers:
        out.setdefault(remote.served, []).append(
            Server(
                f"{remote.host}-{remote.service}",
                remote.service,
                remote.address,
                remote.port,
                remote.runtime,
                f"gateway.upstreams: {remote.host}: inference.services.{remote.service}",
            )
        )
    return out


def active_clients(config: NodeConfig) -> dict[str, Client]:
    """The clients whose keys pass: every client not revoked."""
    return {n: c for n, c in config.gateway.clients.items() if not c.revoked}


def key_digest(key: str) -> str:
    """What the node holds for a client's key: its SHA-256, lowercase hex (HAProxy's
    ``sha2(256),hex,lower`` of the bearer token)."""
    return hashlib.sha256(key.encode()).hexdigest()


def app_ports(config: NodeConfig) -> list[tuple[str, int]]:
    """(protocol, port) the gateway opens to network.app_cidrs."""
    return [("tcp", config.gateway.port)] if config.gateway.enabled else []


def metrics_ports(config: NodeConfig) -> list[tuple[str, int]]:
    """(protocol, port) of the gateway's Prometheus endpoint (network.monitoring_cidrs)."""
    return [("tcp", config.gateway.metrics_port)] if config.gateway.enabled else []


def certificate_names(config: NodeConfig, host_name: str, address: str) -> list[str]:
    """DNS names of the gateway's certificate, the first being its CN."""
    if config.gateway.tls.names:
        return list(config.gateway.tls.names)
    names = [config.base.hostname or host_name.lower()]
    if not _is_ip(address) and address not in names:
        names.append(address)
    return names


def certificate_ips(config: NodeConfig, address: str) -> list[str]:
    """IP SANs of the gateway's certificate."""
    if config.gateway.tls.ip_sans:
        return list(config.gateway.tls.ip_sans)
    ips = [address] if _is_ip(address) else []
    listen = config.gateway.listen
    if not ipaddress.ip_address(listen).is_unspecified and listen not in ips:
        ips.append(listen)
    return ips


def ttl_s(config: NodeConfig) -> int:
    return duration_s(config.gateway.tls.ttl)


def _is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


# --- checks at config load -----------------------------------------------------------------


def check_host(where: str, config: NodeConfig, connection: Connection) -> list[str]:
    """Checks that need the merged config (and the host's connection); [] when fine."""
    gw = config.gateway
    if not gw.enabled:
        return []
    at = f"{where}: gateway"
    problems: list[str] = []
    services = config.inference.services
    for name in gw.services:
        svc = services.get(name)
        if svc is None:
            problems.append(
                f"{at}.services: {name} is not in inference.services (allowed: "
                f"{', '.join(services) or 'none declared'})"
            )
        elif name in config.nomad.jobs:
            problems.append(
                f"{at}.services: {name} runs as a Nomad job (nomad.jobs), the gateway fronts "
                "systemd services only (allowed: a service not in nomad.jobs)"
            )
        elif not svc.enabled:
            problems.append(f"{at}.services: {name} is not enabled (allowed: an enabled service)")
    front = fronted(config)
    if not front and not gw.upstreams:
        problems.append(
            f"{at}.enabled: no inference service to front (allowed: declare one under "
            "inference.services, name hosts in gateway.upstreams, or gateway.enabled: false)"
        )
    if not config.vault.addr:
        problems.append(
            f"{at}.tls: the certificate comes from Vault's PKI but vault.addr is not set "
            "(allowed: the Vault URL, e.g. https://vault:8200)"
        )
    if gw.port == gw.metrics_port:
        problems.append(
            f"{at}.metrics_port: {gw.port} is also gateway.port (allowed: another port)"
        )
    served: dict[str, str] = {}
    for name, svc in front.items():
        svc_at = f"{where}: inference.services.{name}"
        if not ipaddress.ip_address(svc.listen).is_loopback:
            problems.append(
                f"{svc_at}.listen: {svc.listen}, but the gateway fronts this service: it would "
                "be reachable both through the gateway and around it (allowed: 127.0.0.1, the "
                "default for a fronted service; or leave it out of gateway.services)"
            )
        if svc.api_key_secret:
            problems.append(
                f"{svc_at}.api_key_secret: the gateway checks every client's key; the backend "
                "gets no Authorization header (allowed: unset it)"
            )
        model = served_name(name, svc)
        if model in served:
            problems.append(
                f"{svc_at}.model.served_name: {model} is also served by {served[model]}: the "
                "gateway routes by model name (allowed: a name no other fronted service uses)"
            )
        served.setdefault(model, name)
        if PROFILES[svc.runtime].models_path != "/v1/models":
            problems.append(
                f"{svc_at}.runtime: {PROFILES[svc.runtime].title} has no OpenAI-compatible "
                "API, which is all the gateway passes (allowed: vllm or llamacpp)"
            )
    if not gw.upstreams:  # with upstreams: once their models are known (link)
        problems += _check_client_models(at, config, served)
    return problems


def _check_client_models(at: str, config: NodeConfig, served: Mapping[str, object]) -> list[str]:
    problems = []
    for cname, client in config.gateway.clients.items():
        for model in client.models:
            if served and model not in served:
                problems.append(
                    f"{at}.clients.{cname}.models: {model} is not a model the gateway serves "
                    f"(allowed: {', '.join(served)})"
                )
    return problems


def link(where: str, hosts: Mapping[str, Host]) -> tuple[list[str], dict[str, Host]]:
    """Gateways in front of other nodes (``gateway.upstreams``): check them against the
    whole inventory and give each host what the others say about it (the gateway its
    upstreams' services, each upstream the addresses its fronted ports open to). Returns
    (problems, hosts); the hosts are unchanged when there is no upstream anywhere."""
    problems: list[str] = []
    servers: dict[str, list[RemoteServer]] = {}
    sources: dict[str, dict[str, list[str]]] = {}
    for gname, ghost in hosts.items():
        gw = ghost.config.gateway
        if not (gw.enabled and gw.upstreams):
            continue
        at = f"{where}: host {gname}: gateway"
        froms = list(gw.source_addresses)
        if not froms and _is_ip(ghost.connection.address):
            froms = [ghost.connection.address]
        if not froms:
            problems.append(
                f"{at}.source_addresses: not set and connection.address "
                f"{ghost.connection.address} is not an IP address: the upstreams' firewalls "
                "need the addresses this gateway connects from (allowed: e.g. [192.0.2.10])"
            )
        for uname in gw.upstreams:
            upstream = hosts.get(uname)
            if upstream is None or uname == gname:
                allowed = ", ".join(h for h in hosts if h != gname) or "none"
                problems.append(
                    f"{at}.upstreams: {uname} is not another host of this inventory "
                    f"(allowed: {allowed})"
                )
                continue
            found, said = _upstream_servers(f"{at}.upstreams: {uname}", upstream)
            problems += said
            if not found and not said:
                problems.append(
                    f"{at}.upstreams: {uname} has no enabled systemd inference service with an "
                    "OpenAI-compatible API (vllm, llamacpp) to front (allowed: a host that has "
                    "one)"
                )
            servers.setdefault(gname, []).extend(found)
            for remote in found:
                known = sources.setdefault(uname, {}).setdefault(remote.service, [])
                known += [a for a in froms if a not in known]
    for gname in servers:  # servers of one model share one health check: every OpenAI-
        # compatible runtime answers the same one (tests/unit/test_gateway.py checks it)
        linked = hosts[gname].config.linked(tuple(servers[gname]), {})
        problems += _check_client_models(
            f"{where}: host {gname}: gateway", linked, backends(linked)
        )
    if problems or not servers:
        return problems, dict(hosts)
    out = {}
    for name, h in hosts.items():
        mine = tuple(servers.get(name, ()))
        theirs = {svc: tuple(addrs) for svc, addrs in sources.get(name, {}).items()}
        out[name] = (
            h.model_copy(update={"config": h.config.linked(mine, theirs)}) if mine or theirs else h
        )
    return problems, out


def _upstream_servers(at: str, upstream: Host) -> tuple[list[RemoteServer], list[str]]:
    """The services a gateway fronts on ``upstream``, and what is wrong with them."""
    config = upstream.config
    if config.gateway.enabled:
        return [], [
            f"{at}: runs a gateway of its own (gateway.enabled): a service has one front "
            "door (allowed: gateway.enabled: false on it, or leave it out of upstreams)"
        ]
    found, problems = [], []
    for name, svc in config.inference.services.items():
        if not svc.enabled or name in config.nomad.jobs:
            continue
        if PROFILES[svc.runtime].models_path != "/v1/models":
            continue  # no OpenAI-compatible API: not fronted, exposed as before
        svc_at = f"{at}: inference.services.{name}"
        listen = ipaddress.ip_address(svc.listen)
        address = svc.listen
        if listen.is_unspecified:
            address = upstream.connection.address
        if listen.is_loopback:
            problems.append(
                f"{svc_at}.listen: {svc.listen}, which a gateway on another host cannot reach "
                "(allowed: 0.0.0.0, or the address the gateway reaches it on)"
            )
            continue
        if not _is_ip(address):
            problems.append(
                f"{svc_at}.listen: {svc.listen} and connection.address {address} is a DNS name: "
                "the gateway needs an IP address to reach it (allowed: the service's address "
                "in listen, e.g. 192.0.2.10)"
            )
            continue
        if svc.api_key_secret:
            problems.append(
                f"{svc_at}.api_key_secret: the gateway checks every client's key; the backend "
                "gets no Authorization header (allowed: unset it)"
            )
            continue
        found.append(
            RemoteServer(
                host=upstream.name,
                service=name,
                address=address,
                port=svc.port,
                served=served_name(name, svc),
                runtime=svc.runtime,
            )
        )
    return found, problems


def warnings(config: NodeConfig) -> list[str]:
    """What every run prints about this node's gateway (gpunode/inventory.py's report)."""
    gw = config.gateway
    if not gw.enabled:
        return []
    found = []
    if not active_clients(config):
        found.append("gateway: no client (or every client revoked): every request gets 401")
    version, tested = HAPROXY.get(config.distro or "", ("?", False))
    if not tested:
        found.append(
            f"gateway: {config.distro} ships HAProxy {version}; the gateway's configuration is "
            "tested on Debian 12's HAProxy 2.6 only (a deploy checks it with haproxy -c before "
            "HAProxy reloads)"
        )
    return found
