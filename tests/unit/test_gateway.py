"""The gateway's config checks (gpunode/schema/gateway.py, gpunode/gateway.py), the ports it
opens (gpunode/inference.py, gpunode/monitoring.py, gpunode/firewall.py), the names of its
certificate, and its role (roles/gateway.py) on a fake host with a real OpenBao.

Config: every inventory is a real YAML file read by gpunode.config.load_file; a refused one
must name the file, the host and the key in one line of the error, with the words that say
why. Firewall: the nftables ruleset rendered for the node (gpunode.firewall.render_ruleset)
is parsed back into its accept rules.

The role: OpenBao (harness.start_bao) with KV v2, an AppRole holding the controller's
policy (KV read on the clients' keys and gpunode.clients.pki.CONTROLLER_POLICY) and a PKI
mount and role (gpunode.clients.pki.setup_pki); the node is pyinfra's ``@fake`` connector
(harness.RecordingFakeConnector) of a host loaded from the same kind of YAML file. Both the
dry run and the applied run go through gpunode.commands.run, the way gpunode's commands
plan and execute (harness.run_deploys names its host ``@fake/<name>`` without an
``ssh_hostname``, which the role would put in the certificate's names).
"""

from __future__ import annotations

import inspect
import logging
import os
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from harness import Bao, RecordingFakeConnector, start_bao, stop_bao
from pyinfra.api import FunctionCommand, State, StringCommand
from pyinfra.api.command import FileUploadCommand
from pyinfra.context import ctx_host, ctx_state

from gpunode import firewall, haproxy, inference, monitoring
from gpunode import gateway as front
from gpunode.clients.pki import controller_policy, setup_pki
from gpunode.clients.vault import VaultError, close_all
from gpunode.commands import run as gprun
from gpunode.commands.rollout import check_health
from gpunode.config import load_file
from gpunode.operations.gateway import _issue_and_write, install_config_command
from gpunode.schema.distros import DISTROS
from gpunode.schema.node import Host, Inventory, NodeConfig, host_data
from gpunode.schema.runtimes import PROFILES
from gpunode.schema.types import ConfigError
from roles.gateway import gateway as gateway_role

HOST = "gpu-01"
ADDRESS = "192.0.2.11"  # TEST-NET-1: the firewall's lock-out check skips it
NO_VAULT = "http://127.0.0.1:1"  # config checks only: never reached
CHAT, EMBED = 8080, 8081

Doc = dict[str, Any]
Edit = Callable[[Doc], None]


def inventory_doc() -> Doc:
    """A valid inventory: two llama.cpp services (chat, embed); the gateway (in the host's
    own data, so schema errors name the host) fronts chat only, with one client."""
    return {
        "defaults": {
            "distro": "debian12",
            "firewall": {"enabled": False},
            "vault": {"addr": NO_VAULT, "role_id": "r"},
            "inference": {
                "runtimes": {"llamacpp": {"method": "package", "package": "llama", "version": "1"}},
                "services": {
                    "chat": {
                        "runtime": "llamacpp",
                        "port": CHAT,
                        "model": {"uri": "file:///models/chat.gguf", "sha256": "a" * 64},
                    },
                    "embed": {
                        "runtime": "llamacpp",
                        "port": EMBED,
                        "model": {
                            "uri": "file:///models/embed.gguf",
                            "sha256": "b" * 64,
                            "served_name": "emb",
                        },
                    },
                },
            },
        },
        "hosts": {
            HOST: {
                "connection": {"address": ADDRESS},
                "data": {
                    "gateway": {
                        "enabled": True,
                        "services": ["chat"],
                        "clients": {
                            "alice": {"key": {"path": "gpunode/clients/alice"}, "models": ["chat"]}
                        },
                    }
                },
            }
        },
    }


def services(doc: Doc) -> dict[str, Any]:
    return doc["defaults"]["inference"]["services"]  # type: ignore[no-any-return]


def gw(doc: Doc) -> dict[str, Any]:
    return doc["hosts"][HOST]["data"]["gateway"]  # type: ignore[no-any-return]


def write(tmp_path: Path, doc: Doc) -> Path:
    path = tmp_path / "inv.yml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    return path


def load_doc(tmp_path: Path, doc: Doc) -> Inventory:
    return load_file(write(tmp_path, doc))


def config_of(tmp_path: Path, doc: Doc) -> NodeConfig:
    return load_doc(tmp_path, doc).hosts[HOST].config


def edited(*edits: Edit) -> Doc:
    doc = inventory_doc()
    for edit in edits:
        edit(doc)
    return doc


def refusal(tmp_path: Path, doc: Doc, key: str) -> str:
    """The one line of the load error about ``key`` (it names the file and the host)."""
    path = write(tmp_path, doc)
    with pytest.raises(ConfigError) as err:
        load_file(path)
    message = str(err.value)
    assert "Traceback" not in message
    start = f"{path}: host {HOST}: {key}: "
    lines = [line for line in message.splitlines() if line.startswith(start)]
    assert len(lines) == 1, f"no single line starting {start!r} in:\n{message}"
    return lines[0]


# --- the valid config, and where a fronted service listens --------------------------------


def test_a_valid_gateway_config_loads(tmp_path: Path) -> None:
    config = config_of(tmp_path, inventory_doc())
    gateway = config.gateway
    assert gateway.enabled and gateway.port == 8443 and gateway.metrics_port == 8405
    assert list(front.fronted(config)) == ["chat"]
    assert gateway.clients["alice"].key.where() == "secret/gpunode/clients/alice#api_key"
    assert gateway.clients["alice"].effective_burst() == 20  # 2 x the default rate
    assert front.warnings(config) == []


def test_a_fronted_service_listens_on_loopback_another_keeps_every_address(
    tmp_path: Path,
) -> None:
    listen = {
        n: s.listen for n, s in config_of(tmp_path, inventory_doc()).inference.services.items()
    }
    assert listen == {"chat": "127.0.0.1", "embed": "0.0.0.0"}  # noqa: S104


def test_every_service_is_fronted_when_gateway_services_is_empty(tmp_path: Path) -> None:
    config = config_of(tmp_path, edited(lambda d: gw(d).pop("services")))
    assert list(front.fronted(config)) == ["chat", "embed"]
    assert {s.listen for s in config.inference.services.values()} == {"127.0.0.1"}


def test_without_the_gateway_services_keep_every_address(tmp_path: Path) -> None:
    config = config_of(tmp_path, edited(lambda d: gw(d).update(enabled=False)))
    assert front.fronted(config) == {}
    assert {s.listen for s in config.inference.services.values()} == {"0.0.0.0"}  # noqa: S104


def test_with_every_service_fronted_nomad_jobs_and_disabled_services_keep_their_listen() -> None:
    """gateway.services empty fronts every enabled systemd service: a Nomad job and a
    disabled service are not fronted, so they are not moved to loopback either."""

    def edit(doc: Doc) -> None:
        gw(doc).pop("services")
        gw(doc)["clients"]["alice"]["models"] = []
        _nomad_job(doc)  # chat runs as a Nomad job
        services(doc)["off"] = {**services(doc)["embed"], "port": 8090, "enabled": False}
        services(doc)["off"]["model"] = {**services(doc)["embed"]["model"], "served_name": "o"}

    doc = edited(edit)  # the node's merged settings (a Nomad job needs more to load whole)
    config = NodeConfig.model_validate({**doc["defaults"], **doc["hosts"][HOST]["data"]})
    assert list(front.fronted(config)) == ["embed"]
    listen = {n: s.listen for n, s in config.inference.services.items()}
    assert listen == {"chat": "0.0.0.0", "embed": "127.0.0.1", "off": "0.0.0.0"}  # noqa: S104


def test_rollout_asks_a_fronted_service_on_its_node(tmp_path: Path) -> None:
    """A service on loopback is health-checked over SSH on its node (curl to 127.0.0.1),
    one on every address from the controller (no SSH)."""
    inv = load_doc(tmp_path, inventory_doc())
    host = inv.hosts[HOST]
    asked: list[list[str]] = []

    def runner(argv: list[str]) -> subprocess.CompletedProcess[str]:
        asked.append(argv)
        return subprocess.CompletedProcess(argv, 0, "", "")

    chat = host.config.inference.services["chat"]
    assert check_health(host, chat, 3, runner) is None
    assert asked and asked[0][0] == "ssh" and asked[0][-2].endswith(f"@{ADDRESS}")
    assert f"curl -fsS -o /dev/null --max-time 5 http://127.0.0.1:{CHAT}/health" in asked[0][-1]

    def failing(argv: list[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(argv, 1, "", "")

    err = check_health(host, chat, 3, failing)
    assert err == f"http://127.0.0.1:{CHAT}/health on {HOST} not healthy after 3s"
    asked.clear()
    embed = host.config.inference.services["embed"]  # 0.0.0.0: asked from here
    assert check_health(host, embed, 0.2, runner) is not None  # nothing listens there
    assert asked == []


def test_an_explicit_loopback_listen_of_a_fronted_service_is_kept(tmp_path: Path) -> None:
    config = config_of(tmp_path, edited(lambda d: services(d)["chat"].update(listen="::1")))
    assert config.inference.services["chat"].listen == "::1"


# --- refused at config load: the checks that need the whole node ------------------------


def _no_vault(doc: Doc) -> None:
    del doc["defaults"]["vault"]


def _nomad_job(doc: Doc) -> None:
    doc["defaults"]["nomad"] = {
        "enabled": True,
        "servers": ["10.0.0.10:4647"],
        "jobs": {"chat": {}},
    }


def _triton(doc: Doc) -> None:
    doc["defaults"]["inference"]["runtimes"]["triton"] = {
        "method": "package",
        "package": "tritonserver",
        "version": "1",
    }
    services(doc)["vision"] = {
        "runtime": "triton",
        "port": 9000,
        "model": {"uri": "file:///models/repo.tar", "sha256": "c" * 64, "format": "tar"},
    }
    gw(doc)["services"] = ["vision"]
    gw(doc)["clients"]["alice"]["models"] = []


def _api_key(doc: Doc) -> None:
    doc["defaults"]["secrets"] = {
        "chat_key": {"path": "gpunode/chat", "key": "api_key", "env": "LLAMA_API_KEY"}
    }
    services(doc)["chat"]["api_key_secret"] = "chat_key"  # noqa: S105 - a secret's name


def _same_served_name(doc: Doc) -> None:
    services(doc)["embed"]["model"]["served_name"] = "chat"
    gw(doc)["services"] = ["chat", "embed"]


def _no_service(doc: Doc) -> None:
    doc["defaults"]["inference"]["services"] = {}
    gw(doc)["services"] = []


def _every_service_disabled(doc: Doc) -> None:
    for svc in services(doc).values():
        svc["enabled"] = False
    gw(doc)["services"] = []


def _ssh_port(doc: Doc) -> None:
    doc["hosts"][HOST]["connection"]["port"] = 2222
    gw(doc)["port"] = 2222


CHECKS: list[tuple[str, Edit, str, str]] = [
    (
        "fronted_listen_everywhere",
        lambda d: services(d)["chat"].update(listen="0.0.0.0"),  # noqa: S104
        "inference.services.chat.listen",
        "0.0.0.0, but the gateway fronts this service: it would be reachable both through "
        "the gateway and around it (allowed: 127.0.0.1",
    ),
    (
        "fronted_listen_on_an_address",
        lambda d: services(d)["chat"].update(listen="192.0.2.11"),
        "inference.services.chat.listen",
        "both through the gateway and around it",
    ),
    (
        "fronted_with_api_key_secret",
        _api_key,
        "inference.services.chat.api_key_secret",
        "the gateway checks every client's key; the backend gets no Authorization header "
        "(allowed: unset it)",
    ),
    (
        "unknown_service",
        lambda d: gw(d).update(services=["chat", "nope"]),
        "gateway.services",
        "nope is not in inference.services (allowed: chat, embed)",
    ),
    (
        "nomad_job",
        _nomad_job,
        "gateway.services",
        "chat runs as a Nomad job (nomad.jobs), the gateway fronts systemd services only",
    ),
    (
        "disabled_service",
        lambda d: services(d)["chat"].update(enabled=False),
        "gateway.services",
        "chat is not enabled (allowed: an enabled service)",
    ),
    (
        "no_service_at_all",
        _no_service,
        "gateway.enabled",
        "no inference service to front (allowed: declare one under inference.services, name hosts "
        "in gateway.upstreams, or gateway.enabled: false)",
    ),
    (
        "every_service_disabled",
        _every_service_disabled,
        "gateway.enabled",
        "no inference service to front",
    ),
    (
        "no_vault_addr",
        _no_vault,
        "gateway.tls",
        "the certificate comes from Vault's PKI but vault.addr is not set",
    ),
    (
        "metrics_port_is_the_port",
        lambda d: gw(d).update(port=8405),
        "gateway.metrics_port",
        "8405 is also gateway.port (allowed: another port)",
    ),
    (
        "port_of_a_fronted_service",
        lambda d: gw(d).update(port=CHAT),
        "gateway.port",
        f"{CHAT} is already used by inference.services.chat.port",
    ),
    (
        "port_of_another_service",
        lambda d: gw(d).update(port=EMBED),
        "gateway.port",
        f"{EMBED} is already used by inference.services.embed.port",
    ),
    (
        "port_of_node_exporter",
        lambda d: gw(d).update(port=9100),
        "gateway.port",
        "9100 is already used by monitoring.node_exporter_port",
    ),
    (
        "metrics_port_of_dcgm_exporter",
        lambda d: gw(d).update(metrics_port=9400),
        "gateway.metrics_port",
        "9400 is already used by monitoring.dcgm_exporter_port",
    ),
    ("port_of_ssh", _ssh_port, "gateway.port", "2222 is the SSH port (connection.port"),
    (
        "client_model_not_served",
        lambda d: gw(d)["clients"]["alice"].update(models=["emb"]),
        "gateway.clients.alice.models",
        "emb is not a model the gateway serves (allowed: chat)",
    ),
    (
        "two_fronted_services_one_served_name",
        _same_served_name,
        "inference.services.embed.model.served_name",
        "chat is also served by chat: the gateway routes by model name",
    ),
    (
        "triton_fronted",
        _triton,
        "inference.services.vision.runtime",
        "NVIDIA Triton Inference Server has no OpenAI-compatible API, which is all the gateway "
        "passes (allowed: vllm or llamacpp)",
    ),
]


@pytest.mark.parametrize(
    ("edit", "key", "says"), [c[1:] for c in CHECKS], ids=[c[0] for c in CHECKS]
)
def test_refused_at_load_naming_file_host_and_key(
    edit: Edit, key: str, says: str, tmp_path: Path
) -> None:
    line = refusal(tmp_path, edited(edit), key)
    assert says in line, line


def test_without_the_gateway_none_of_its_checks_apply(tmp_path: Path) -> None:
    """The same settings the checks refuse are fine with gateway.enabled: false."""
    doc = edited(
        lambda d: gw(d).update(enabled=False, port=CHAT, metrics_port=CHAT, services=["nope"]),
        lambda d: gw(d)["clients"]["alice"].update(models=["nope"]),
        _api_key,
    )
    config_of(tmp_path, doc)
    config_of(tmp_path, edited(lambda d: gw(d).update(enabled=False), _no_vault))


# --- refused by the schema: the gateway section alone -------------------------------------


def _client(**settings: Any) -> Edit:
    return lambda d: gw(d)["clients"]["alice"].update(settings)


def _tls(**settings: Any) -> Edit:
    return lambda d: gw(d).update(tls=settings)


def _shared_key(doc: Doc) -> None:
    gw(doc)["clients"]["bob"] = {"key": {"path": "gpunode/clients/alice"}}


SCHEMA: list[tuple[str, Edit, str, str]] = [
    (
        "two_clients_one_key",
        _shared_key,
        "gateway",
        "clients.bob.key: secret/gpunode/clients/alice#api_key is also the key of client alice",
    ),
    (
        "burst_below_rate",
        _client(rate=10, burst=5),
        "gateway.clients.alice",
        "burst: 5 is below rate 10 (allowed: at least rate",
    ),
    ("rate_zero", _client(rate=0), "gateway.clients.alice.rate", "0: Input should be greater"),
    (
        "rate_negative",
        _client(rate=-3),
        "gateway.clients.alice.rate",
        "(allowed: a number at least",
    ),
    ("burst_zero", _client(burst=0), "gateway.clients.alice.burst", "(allowed: a number at least"),
    (
        "concurrent_zero",
        _client(concurrent=0),
        "gateway.clients.alice.concurrent",
        "(allowed: a number at least 1)",
    ),
    (
        "client_model_twice",
        _client(models=["chat", "chat"]),
        "gateway.clients.alice",
        "models: a model is listed twice",
    ),
    (
        "route_outside_the_list",
        lambda d: gw(d).update(routes=["/v1/models", "/admin"]),
        "gateway.routes",
        "'/admin' is not an allowed route (allowed: /v1/chat/completions, /v1/completions, "
        "/v1/embeddings, /v1/models)",
    ),
    (
        "health_is_not_a_route",
        lambda d: gw(d).update(routes=["/health"]),
        "gateway.routes",
        "'/health' is not an allowed route",
    ),
    (
        "route_twice",
        lambda d: gw(d).update(routes=["/v1/models", "/v1/models"]),
        "gateway.routes",
        "a route is listed twice (allowed: each once)",
    ),
    (
        "no_route",
        lambda d: gw(d).update(routes=[]),
        "gateway.routes",
        "empty: no request could pass (allowed: at least one route)",
    ),
    (
        "service_twice",
        lambda d: gw(d).update(services=["chat", "chat"]),
        "gateway.services",
        "a service is listed twice",
    ),
    ("ttl_under_60s", _tls(ttl="59s"), "gateway.tls.ttl", "59s is shorter than 60s (allowed: 60s"),
    ("ttl_1m_minus_1ms", _tls(ttl="59s999ms"), "gateway.tls.ttl", "is shorter than 60s"),
    (
        "tls_name_uppercase",
        _tls(names=["GPU-01.example.com"]),
        "gateway.tls.names",
        "'GPU-01.example.com' is not a lowercase DNS name",
    ),
    (
        "tls_name_underscore",
        _tls(names=["gpu_01.example.com"]),
        "gateway.tls.names",
        "'gpu_01.example.com' is not a lowercase DNS name",
    ),
    (
        "tls_name_twice",
        _tls(names=["gpu-01.example.com", "gpu-01.example.com"]),
        "gateway.tls.names",
        "a name is listed twice",
    ),
    (
        "tls_name_that_is_an_address",
        _tls(names=["192.0.2.1"]),
        "gateway.tls.names",
        "reads as an IP address, not a DNS name",
    ),
    ("tls_ip_san_not_an_ip", _tls(ip_sans=["gpu-01"]), "gateway.tls.ip_sans[0]", "not an IP"),
    (
        "min_version_tls11",
        _tls(min_version="TLSv1.1"),
        "gateway.tls.min_version",
        "'TLSv1.1' (allowed: TLSv1.2 or TLSv1.3)",
    ),
    ("privileged_port", lambda d: gw(d).update(port=443), "gateway.port", "at least 1024"),
    ("listen_not_an_ip", lambda d: gw(d).update(listen="gpu-01"), "gateway.listen", "not an IP"),
    (
        "max_body_too_small",
        lambda d: gw(d).update(max_body=100),
        "gateway.max_body",
        "at least 1024",
    ),
    ("unknown_key", lambda d: gw(d).update(rate=5), "gateway.rate", "unknown key (allowed: "),
]


@pytest.mark.parametrize(
    ("edit", "key", "says"), [c[1:] for c in SCHEMA], ids=[c[0] for c in SCHEMA]
)
def test_schema_refuses_naming_file_host_and_key(
    edit: Edit, key: str, says: str, tmp_path: Path
) -> None:
    line = refusal(tmp_path, edited(edit), key)
    assert says in line, line


def test_burst_equal_to_rate_and_a_60s_ttl_are_allowed(tmp_path: Path) -> None:
    doc = edited(_client(rate=7, burst=7), _tls(ttl="1m", min_version="TLSv1.3"))
    config = config_of(tmp_path, doc)
    assert config.gateway.clients["alice"].effective_burst() == 7
    assert front.ttl_s(config) == 60


def test_warns_when_no_client_can_pass(tmp_path: Path) -> None:
    said = "gateway: no client (or every client revoked): every request gets 401"
    assert front.warnings(config_of(tmp_path, edited(lambda d: gw(d).pop("clients")))) == [said]
    revoked = config_of(tmp_path, edited(_client(revoked=True)))
    assert front.active_clients(revoked) == {}
    assert front.warnings(revoked) == [said]
    assert front.warnings(config_of(tmp_path, inventory_doc())) == []  # debian12, a client


@pytest.mark.parametrize("distro", ["ubuntu2204", "ubuntu2404", "rhel9", "rocky9", "alma9"])
def test_warns_on_distros_whose_haproxy_is_untested(distro: str, tmp_path: Path) -> None:
    config = config_of(tmp_path, edited(lambda d: d["defaults"].update(distro=distro)))
    version = front.HAPROXY[distro][0]
    assert front.warnings(config) == [
        f"gateway: {distro} ships HAProxy {version}; the gateway's configuration is tested on "
        "Debian 12's HAProxy 2.6 only (a deploy checks it with haproxy -c before HAProxy "
        "reloads)"
    ]


def test_every_distro_has_its_haproxy_listed() -> None:
    assert set(front.HAPROXY) == set(DISTROS)


# --- ports and the firewall ---------------------------------------------------------------

ADMIN, APPS, MONITORING = "192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24"


def _firewall_on(doc: Doc) -> None:
    doc["defaults"]["firewall"] = {"enabled": True}
    doc["defaults"]["network"] = {
        "admin_cidrs": [ADMIN],
        "app_cidrs": [APPS],
        "monitoring_cidrs": [MONITORING],
    }


RULE = re.compile(r'ip6? saddr \{ (.+) \} (tcp|udp) dport \{ (.+) \} accept comment "(.+)"')


def accepted(ruleset: str) -> dict[str, tuple[set[str], set[int]]]:
    """The input chain's accept rules by name: (source CIDRs, TCP ports)."""
    rules: dict[str, tuple[set[str], set[int]]] = {}
    for line in ruleset.splitlines():
        m = RULE.fullmatch(line.strip())
        if m and m[2] == "tcp":
            cidrs, ports = rules.setdefault(m[4], (set(), set()))
            cidrs.update(m[1].split(", "))
            ports.update(int(p) for p in m[3].split(", "))
    return rules


def test_the_gateway_port_replaces_the_fronted_services_port(tmp_path: Path) -> None:
    config = config_of(tmp_path, edited(_firewall_on))
    assert inference.app_ports(config) == [("tcp", EMBED), ("tcp", 8443)]
    assert ("tcp", 8405) in monitoring.metrics_ports(config)
    assert ("tcp", 8405) not in inference.app_ports(config)
    ruleset = firewall.render_ruleset(config, 22)
    rules = accepted(ruleset)
    assert rules["inference"] == ({APPS}, {EMBED, 8443})
    assert rules["metrics"] == ({MONITORING}, {8405, 9100, 9400})
    assert rules["ssh"] == ({ADMIN}, {22})
    assert all(CHAT not in ports for _, ports in rules.values()), ruleset
    assert not re.search(rf"\b{CHAT}\b", ruleset)


def test_without_the_gateway_the_services_ports_are_opened(tmp_path: Path) -> None:
    """The other side of the test above: it is the gateway that closes the chat port."""
    config = config_of(tmp_path, edited(_firewall_on, lambda d: gw(d).update(enabled=False)))
    assert inference.app_ports(config) == [("tcp", CHAT), ("tcp", EMBED)]
    assert ("tcp", 8405) not in monitoring.metrics_ports(config)
    rules = accepted(firewall.render_ruleset(config, 22))
    assert rules["inference"] == ({APPS}, {CHAT, EMBED})
    assert rules["metrics"] == ({MONITORING}, {9100, 9400})


def test_other_gateway_ports_are_opened(tmp_path: Path) -> None:
    config = config_of(
        tmp_path, edited(_firewall_on, lambda d: gw(d).update(port=18443, metrics_port=18405))
    )
    rules = accepted(firewall.render_ruleset(config, 22))
    assert rules["inference"][1] == {EMBED, 18443}
    assert 18405 in rules["metrics"][1] and 8405 not in rules["metrics"][1]


def test_the_firewall_needs_app_cidrs_for_the_gateway_port(tmp_path: Path) -> None:
    def no_app_cidrs(doc: Doc) -> None:
        del doc["defaults"]["network"]["app_cidrs"]

    line = refusal(tmp_path, edited(_firewall_on, no_app_cidrs), "network.app_cidrs")
    assert "tcp/8443" in line and f"tcp/{CHAT}" not in line, line


# --- the certificate's names and addresses ------------------------------------------------


def _connection(address: str) -> Edit:
    return lambda d: d["hosts"][HOST]["connection"].update(address=address)


@pytest.mark.parametrize(
    ("edits", "names", "ips"),
    [
        pytest.param((), [HOST], [ADDRESS], id="inventory_name_and_ip_address"),
        pytest.param(
            (lambda d: d["defaults"].update(base={"hostname": "node-a"}),),
            ["node-a"],
            [ADDRESS],
            id="base_hostname",
        ),
        pytest.param(
            (_connection("GPU-01.Example.COM."),),
            [HOST, "gpu-01.example.com"],
            [],
            id="dns_address_added_as_a_name",
        ),
        pytest.param(
            (_connection("gpu-01"),),
            [HOST],
            [],
            id="dns_address_that_is_the_hostname_once",
        ),
        pytest.param((_connection("2001:DB8:0::11"),), [HOST], ["2001:db8::11"], id="ipv6_address"),
        pytest.param(
            (lambda d: gw(d).update(listen="192.0.2.50"),),
            [HOST],
            [ADDRESS, "192.0.2.50"],
            id="specific_listen_added",
        ),
        pytest.param(
            (lambda d: gw(d).update(listen=ADDRESS),),
            [HOST],
            [ADDRESS],
            id="listen_that_is_the_address_once",
        ),
        pytest.param(
            (_connection("gpu-01.example.com"), lambda d: gw(d).update(listen="2001:db8::5")),
            [HOST, "gpu-01.example.com"],
            ["2001:db8::5"],
            id="dns_address_and_specific_listen",
        ),
        pytest.param((lambda d: gw(d).update(listen="::"),), [HOST], [ADDRESS], id="listen_any_v6"),
        pytest.param(
            (
                _connection("gpu-01.example.com"),
                lambda d: d["defaults"].update(base={"hostname": "node-a"}),
                _tls(names=["api.example.com", "gpu.example.com"], ip_sans=["198.51.100.7"]),
                lambda d: gw(d).update(listen="192.0.2.50"),
            ),
            ["api.example.com", "gpu.example.com"],
            ["198.51.100.7"],
            id="explicit_names_and_ip_sans_win",
        ),
        pytest.param(
            (_tls(names=["api.example.com"]),),
            ["api.example.com"],
            [ADDRESS],
            id="explicit_names_keep_default_ips",
        ),
    ],
)
def test_certificate_names_and_ips(
    edits: tuple[Edit, ...], names: list[str], ips: list[str], tmp_path: Path
) -> None:
    host = load_doc(tmp_path, edited(*edits)).hosts[HOST]
    address = host_data(host)["ssh_hostname"]  # what the role reads
    assert address == host.connection.address
    assert front.certificate_names(host.config, host.name, address) == names
    assert front.certificate_ips(host.config, address) == ips


def test_certificate_name_from_an_inventory_name_is_lowercase(tmp_path: Path) -> None:
    config = config_of(tmp_path, inventory_doc())
    assert front.certificate_names(config, "GPU-07", "gpu-07") == ["gpu-07"]
    assert front.certificate_names(config, "GPU-07", "gpu-07.example.com") == [
        "gpu-07",
        "gpu-07.example.com",
    ]


# --- the role on a fake Debian 12 host, with a real OpenBao ------------------------------

ROLE = "gpunode-gateway-test"
POLICY = 'path "secret/data/gpunode/clients/*" { capabilities = ["read"] }\n' + controller_policy()
KEY = "alice-key-Zq8vYp3LrT5wKd0m"  # a canary: its value must never show
DIGEST = front.key_digest(KEY)


@pytest.fixture(scope="module")
def bao(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bao]:
    server = start_bao(tmp_path_factory.mktemp("bao"))
    try:
        c = server.client()
        c.sys.enable_auth_method("approle", path="approle")
        c.sys.create_or_update_policy(ROLE, POLICY)
        c.auth.approle.create_or_update_approle(ROLE, token_policies=[ROLE])
        server.role_id = c.auth.approle.read_role_id(ROLE)["data"]["role_id"]
        setup_pki(c)
        c.secrets.kv.v2.create_or_update_secret("gpunode/clients/alice", {"api_key": KEY})
        yield server
    finally:
        stop_bao(server)


@pytest.fixture
def login(bao: Bao, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The controller's AppRole login: a fresh secret_id in $VAULT_SECRET_ID."""
    monkeypatch.setenv("VAULT_SECRET_ID", bao.secret_id(ROLE))
    close_all()
    yield
    close_all()


def role_doc(bao: Bao, *edits: Edit) -> Doc:
    def vault(doc: Doc) -> None:
        doc["defaults"]["vault"] = {"addr": bao.addr, "role_id": bao.role_id, "retries": 0}

    return edited(vault, *edits)


def certificates(bao: Bao) -> int:
    """Certificates the PKI mount has issued (its CA included)."""
    return len(bao.client().secrets.pki.list_certificates(mount_point="pki")["data"]["keys"])


def operation_arguments(state: State, host: Any) -> list[str]:
    """repr of the arguments every planned operation of ``host`` was called with."""
    out = []
    for op_hash, data in state.ops[host].items():
        found = inspect.getclosurevars(data.command_generator).nonlocals
        assert {"args", "kwargs"} <= set(found), "pyinfra changed: update this test"
        out.append(f"{op_hash} {found['args']!r} {found['kwargs']!r}")
    return out


def command_text(command: Any) -> str:
    if isinstance(command, StringCommand):
        return str(command.get_raw_value())
    if isinstance(command, FunctionCommand):
        return f"{command.function.__name__} {command.args!r} {command.kwargs!r}"
    if isinstance(command, FileUploadCommand):
        return f"upload {command.src!r} {command.dest!r}"
    return repr(command)


def assert_not_printed(
    capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture, expected: str
) -> None:
    """Neither the key nor its digest in anything printed or logged (``expected`` is: the
    capture works)."""
    out = capsys.readouterr()
    printed = "\n".join([out.out, out.err, caplog.text])
    assert expected in printed
    assert KEY not in printed and DIGEST not in printed


def role_host(tmp_path: Path, doc: Doc) -> Host:
    return load_doc(tmp_path, doc).hosts[HOST]


def plan(host: Host, dry: bool = True) -> gprun.Run:
    """The role planned on a fake host the way gpunode plans: a dry run (``pyinfra --dry``:
    with change detection, to be left unexecuted), or for ``execute`` (``pyinfra -y``)."""
    data = {**host_data(host), "fake_delay": 0, "fake_delay_jitter": 0}
    inventory = gprun.inventory_from([(host.name, data)])
    for each in inventory:
        each.connector_cls = RecordingFakeConnector
    return gprun.prepare(inventory, gateway_role, detect_changes=dry)


def connector_of(planned: gprun.Run) -> RecordingFakeConnector:
    connector = planned.host(HOST).connector
    assert isinstance(connector, RecordingFakeConnector)
    return connector


def by_name(planned: gprun.Run) -> dict[str, str]:
    """The role's operations: name (without the deploy's prefix) -> operation hash."""
    names = gprun._host_op_names(planned.state, planned.host(HOST))
    return {name.removeprefix("gpunode gateway | "): op_hash for op_hash, name in names.items()}


ROLE_OPERATIONS = (
    "HAProxy package",
    "Gateway directory",
    "Gateway TLS directory",
    "Gateway certificate",
    "Gateway client CA",
    "Gateway client keys (SHA-256)",
    "Gateway map",
    "HAProxy configuration",
    "HAProxy running",
)


def test_a_dry_run_plans_everything_and_issues_nothing(
    bao: Bao,
    login: None,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    before = certificates(bao)
    with plan(role_host(tmp_path, role_doc(bao))) as planned:
        result = planned.results()[HOST]
        assert result.ok, result.error
        state, host, ops = planned.state, planned.host(HOST), by_name(planned)
        assert set(ROLE_OPERATIONS) <= set(ops), sorted(ops)
        assert "gpunode gateway | Gateway certificate" in result.changes
        # what each operation would run, generated again the way execution does
        commands: list[Any] = []
        with ctx_state.use(state), ctx_host.use(host):
            for op_hash, data in state.ops[host].items():
                generated = list(data.command_generator())
                if op_hash == ops["Gateway certificate"]:
                    [issue] = generated
                commands += generated
        arguments = operation_arguments(state, host)
        connector = connector_of(planned)
    assert isinstance(issue, FunctionCommand) and issue.function is _issue_and_write
    assert issue.args[0] == front.CERT_FILE and issue.args[2:4] == ([HOST], [ADDRESS])
    assert certificates(bao) == before  # planned, never executed: nothing issued
    assert connector.uploads == []
    seen = "\n".join(
        [*ops, *arguments, *map(str, connector.executed_commands), *map(command_text, commands)]
    )
    assert "MaskedBytes('client key digests', *MASKED*)" in seen  # it is the right text
    assert KEY not in seen and DIGEST not in seen
    assert_not_printed(capsys, caplog, "a new one is issued")


def test_an_applied_run_issues_the_certificate_and_shows_no_key_or_digest(
    bao: Bao,
    login: None,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    before = certificates(bao)
    host_entry = role_host(tmp_path, role_doc(bao))
    config = host_entry.config
    with plan(host_entry, dry=False) as planned:
        result = planned.execute(all_or_nothing=True)[HOST]
        assert result.ok, result.error
        state, host, ops = planned.state, planned.host(HOST), by_name(planned)
        arguments = operation_arguments(state, host)
        connector = connector_of(planned)
    assert set(ROLE_OPERATIONS) <= set(ops), sorted(ops)
    assert "gpunode gateway | Gateway certificate" in result.executed
    assert certificates(bao) == before + 1  # executed once: one certificate
    commands = [str(c) for c in connector.executed_commands]
    staged = "/etc/haproxy/.haproxy.cfg.gpunode-new"  # checked, then moved in place
    assert install_config_command(staged, "/etc/haproxy/haproxy.cfg") in commands
    uploads = "\n".join(text for _, text in connector.uploads)
    assert haproxy.render_config(config) in [text for _, text in connector.uploads]
    assert f"{DIGEST} alice\n" in uploads  # the node gets the digest, in its file only
    assert "BEGIN CERTIFICATE" in uploads and "PRIVATE KEY-----" in uploads
    assert KEY not in uploads  # the node never holds a key
    seen = "\n".join([*ops, *arguments, *commands])
    assert "MaskedBytes('client key digests', *MASKED*)" in seen
    assert KEY not in seen and DIGEST not in seen
    assert_not_printed(capsys, caplog, "a new one is issued")


@pytest.mark.parametrize(
    ("edit", "says"),
    [
        pytest.param(
            lambda d: gw(d)["clients"].update(bob={"key": {"path": "gpunode/clients/bob"}}),
            "gateway.clients.bob.key",
            id="missing_secret",
        ),
        pytest.param(
            lambda d: gw(d)["clients"]["alice"]["key"].update(key="other"),
            "gateway.clients.alice.key",
            id="missing_key_in_the_secret",
        ),
    ],
)
def test_a_vault_problem_stops_the_run_before_any_operation(
    edit: Edit, says: str, bao: Bao, login: None, tmp_path: Path
) -> None:
    before = certificates(bao)
    with plan(role_host(tmp_path, role_doc(bao, edit))) as planned:
        result = planned.results()[HOST]
        ops = planned.state.ops.get(planned.host(HOST), {})
        recorded = list(connector_of(planned).executed_commands)
    assert isinstance(result.exception, VaultError), result
    assert result.error is not None and says in result.error, result.error
    assert f"host {HOST}" in result.error
    assert KEY not in result.error
    assert result.planned == 0 and not ops
    assert recorded == []  # not even a fact was read
    assert certificates(bao) == before


def test_a_disabled_gateway_plans_nothing_and_never_asks_vault(tmp_path: Path) -> None:
    host = role_host(tmp_path, edited(lambda d: gw(d).update(enabled=False)))
    with plan(host) as planned:  # vault.addr is unreachable: asking it would fail
        result = planned.results()[HOST]
    assert result.ok and result.planned == 0, result


# --- the configuration lands only once haproxy -c accepts it ---------------------------------


@pytest.mark.parametrize("valid", [True, False])
def test_a_refused_configuration_never_replaces_the_live_one(valid: bool, tmp_path: Path) -> None:
    """The install script run by sh with the real haproxy: a valid staged file replaces the
    live one; a refused one is removed and the live one stays, with HAProxy's reason."""
    if shutil.which("haproxy") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("haproxy is not installed (make deps installs it)")
        pytest.skip("haproxy is not installed")
    good = (
        "defaults\n    mode http\n    timeout client 5s\n    timeout server 5s\n"
        "    timeout connect 5s\nfrontend f\n    bind 127.0.0.1:18999\n"
        "    http-request return status 200\n"
    )
    old = good.replace("status 200", "status 204")
    live, staged = tmp_path / "haproxy.cfg", tmp_path / ".haproxy.cfg.gpunode-new"
    live.write_text(old)
    staged.write_text(good if valid else good.replace("mode http", "mode nonsense"))
    proc = subprocess.run(
        ["sh", "-c", install_config_command(str(staged), str(live))],
        capture_output=True,
        text=True,
        check=False,
    )
    assert not staged.exists()
    if valid:
        assert proc.returncode == 0, proc.stderr
        assert live.read_text() == good
    else:
        assert proc.returncode == 1
        assert live.read_text() == old
        assert "refused the new" in proc.stderr and "it was not put in place" in proc.stderr


# --- a gateway host in front of other nodes (gateway.upstreams) -----------------------------

GW1, GW2, UP1, UP2 = "192.0.2.31", "192.0.2.32", "192.0.2.41", "192.0.2.42"


def fleet_doc() -> Doc:
    """Two gateway hosts (the ``gateways`` group, no service of their own) in front of two
    nodes that each serve chat (llama.cpp on port CHAT) and run no gateway; firewall on."""
    doc = inventory_doc()
    _firewall_on(doc)
    chat = services(doc)["chat"]
    doc["defaults"]["inference"]["services"] = {}
    doc["groups"] = {
        "gateways": {
            "data": {
                "gateway": {
                    "enabled": True,
                    "upstreams": ["gpu-01", "gpu-02"],
                    "clients": {
                        "alice": {"key": {"path": "gpunode/clients/alice"}, "models": ["chat"]}
                    },
                }
            }
        },
        "nodes": {"data": {"inference": {"services": {"chat": chat}}}},
    }
    doc["hosts"] = {
        "gw-01": {"connection": {"address": GW1}, "groups": ["gateways"]},
        "gw-02": {"connection": {"address": GW2}, "groups": ["gateways"]},
        "gpu-01": {"connection": {"address": UP1}, "groups": ["nodes"]},
        "gpu-02": {"connection": {"address": UP2}, "groups": ["nodes"]},
    }
    return doc


def fleet_refusal(tmp_path: Path, doc: Doc, says: str) -> str:
    with pytest.raises(ConfigError) as err:
        load_doc(tmp_path, doc)
    lines = [line for line in str(err.value).splitlines() if says in line]
    assert lines, str(err.value)
    assert str(tmp_path / "inv.yml") in lines[0]
    return lines[0]


def test_a_gateway_host_fronts_its_upstreams_services(tmp_path: Path) -> None:
    inv = load_doc(tmp_path, fleet_doc())
    config = inv.hosts["gw-01"].config
    assert [(s.host, s.service, s.address, s.port, s.served) for s in config.upstream_servers] == [
        ("gpu-01", "chat", UP1, CHAT, "chat"),
        ("gpu-02", "chat", UP2, CHAT, "chat"),
    ]
    text = haproxy.render_config(config)
    assert text.count("\nbackend be_") == 1  # one model: one backend, both nodes in it
    assert f"server gpu-01-chat {UP1}:{CHAT} check" in text
    assert f"server gpu-02-chat {UP2}:{CHAT} check" in text
    assert "balance leastconn" in text
    # The gateway hosts open only the gateway's port to the clients.
    rules = accepted(firewall.render_ruleset(config, 22))
    assert rules["inference"] == ({APPS}, {8443})
    assert "gateway" not in rules


def test_on_an_upstream_the_fronted_port_is_open_to_the_gateways_only(tmp_path: Path) -> None:
    inv = load_doc(tmp_path, fleet_doc())
    config = inv.hosts["gpu-01"].config
    assert config.gateway_sources == {"chat": (GW1, GW2)}
    assert inference.app_ports(config) == []
    ruleset = firewall.render_ruleset(config, 22)
    rules = accepted(ruleset)
    assert rules["gateway"] == ({f"{GW1}/32", f"{GW2}/32"}, {CHAT})
    assert "inference" not in rules  # not to network.app_cidrs
    assert [r for r in rules if CHAT in rules[r][1]] == ["gateway"], ruleset
    # No warning that app_cidrs reach its unguarded routes: only the gateways do.
    assert inference.warnings(config) == []


def test_without_the_gateways_the_upstreams_port_is_open_to_the_clients(tmp_path: Path) -> None:
    """The other side of the test above: it is the gateways that close the port."""
    doc = fleet_doc()
    doc["groups"]["gateways"]["data"]["gateway"]["enabled"] = False
    config = load_doc(tmp_path, doc).hosts["gpu-01"].config
    assert config.gateway_sources == {}
    rules = accepted(firewall.render_ruleset(config, 22))
    assert rules["inference"] == ({APPS}, {CHAT})
    assert "gateway" not in rules


def test_a_gateway_with_egress_on_may_reach_its_upstreams(tmp_path: Path) -> None:
    doc = fleet_doc()
    doc["groups"]["gateways"]["data"]["firewall"] = {"egress": {"enabled": True, "dns_cidrs": []}}
    doc["groups"]["gateways"]["data"]["base"] = {
        "apt_proxy": "http://192.0.2.5:3128",
        "ntp_servers": ["192.0.2.6"],
    }
    config = load_doc(tmp_path, doc).hosts["gw-01"].config
    out = {r.name: r for r in firewall.egress_rules(config)}
    assert out["gateway.upstreams"].ports == (CHAT,)
    assert set(out["gateway.upstreams"].v4) == {f"{UP1}/32", f"{UP2}/32"}


def test_what_the_others_say_is_part_of_the_nodes_data(tmp_path: Path) -> None:
    """The links are in the host's dumped data (what the seal's input digest and pyinfra's
    --json see): moving a gateway changes its upstreams' data, not only its own."""
    first = load_doc(tmp_path, fleet_doc()).hosts["gpu-01"].config.model_dump(mode="json")
    doc = fleet_doc()
    doc["hosts"]["gw-02"]["connection"]["address"] = "192.0.2.33"
    second = load_doc(tmp_path, doc).hosts["gpu-01"].config.model_dump(mode="json")
    assert first["links"]["gateway_sources"] == {"chat": [GW1, GW2]}
    assert second["links"]["gateway_sources"] == {"chat": [GW1, "192.0.2.33"]}
    plain = inventory_doc()
    assert "links" not in load_doc(tmp_path, plain).hosts[HOST].config.model_dump()


def test_links_cannot_be_set_from_an_inventory(tmp_path: Path) -> None:
    doc = fleet_doc()
    doc["hosts"]["gpu-01"]["data"] = {"links": {"gateway_sources": {"chat": ["0.0.0.0"]}}}  # noqa: S104
    with pytest.raises(ConfigError) as err:
        load_doc(tmp_path, doc)
    assert "links" in str(err.value) and "Traceback" not in str(err.value)


def _set(path: str, value: Any) -> Edit:
    """Set a dotted path of the doc (``hosts.gpu-01.data.gateway.enabled``)."""

    def edit(doc: Doc) -> None:
        *parents, last = path.split(".")
        node = doc
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value

    return edit


def _gpu01_chat(**changes: Any) -> Edit:
    def edit(doc: Doc) -> None:
        chat = dict(doc["groups"]["nodes"]["data"]["inference"]["services"]["chat"], **changes)
        doc["hosts"]["gpu-01"]["data"] = {"inference": {"services": {"chat": chat}}}

    return edit


FLEET_REFUSALS = [
    (
        "unknown",
        _set("groups.gateways.data.gateway.upstreams", ["gpu-09"]),
        "host gw-01: gateway.upstreams: gpu-09 is not another host of this inventory "
        "(allowed: gw-02, gpu-01, gpu-02)",
    ),
    (
        "itself",
        _set("hosts.gw-01.data", {"gateway": {"upstreams": ["gw-01"]}}),
        "host gw-01: gateway.upstreams: gw-01 is not another host of this inventory",
    ),
    (
        "own_gateway",
        _set("hosts.gpu-01.data", {"gateway": {"enabled": True}}),
        "host gw-01: gateway.upstreams: gpu-01: runs a gateway of its own (gateway.enabled)",
    ),
    (
        "loopback",
        _gpu01_chat(listen="127.0.0.1"),
        "host gw-01: gateway.upstreams: gpu-01: inference.services.chat.listen: 127.0.0.1, "
        "which a gateway on another host cannot reach",
    ),
    (
        "dns_name",
        _set("hosts.gpu-01.connection.address", "gpu-01.example.com"),
        "host gw-01: gateway.upstreams: gpu-01: inference.services.chat.listen: 0.0.0.0 and "
        "connection.address gpu-01.example.com is a DNS name",
    ),
    (
        "api_key",
        lambda d: (
            _gpu01_chat(api_key_secret="chat_key")(d),  # noqa: S106 (a name)
            d["hosts"]["gpu-01"]["data"].update(
                secrets={"chat_key": {"path": "gpunode/chat", "key": "k", "env": "LLAMA_API_KEY"}}
            ),
        ),
        "host gw-01: gateway.upstreams: gpu-01: inference.services.chat.api_key_secret: the "
        "gateway checks every client's key",
    ),
    (
        "nothing_to_front",
        _gpu01_chat(enabled=False),
        "host gw-01: gateway.upstreams: gpu-01 has no enabled systemd inference service",
    ),
    (
        "gateway_dns_name",
        _set("hosts.gw-01.connection.address", "gw-01.example.com"),
        "host gw-01: gateway.source_addresses: not set and connection.address "
        "gw-01.example.com is not an IP address",
    ),
    (
        "client_model",
        _set("groups.gateways.data.gateway.clients.alice.models", ["mistral"]),
        "host gw-01: gateway.clients.alice.models: mistral is not a model the gateway serves "
        "(allowed: chat)",
    ),
    (
        "listed_twice",
        _set("groups.gateways.data.gateway.upstreams", ["gpu-01", "gpu-01"]),
        "gateway.upstreams: a host is listed twice",
    ),
]


@pytest.mark.parametrize(
    ("edit", "says"), [c[1:] for c in FLEET_REFUSALS], ids=[c[0] for c in FLEET_REFUSALS]
)
def test_a_bad_upstream_is_refused_at_load(edit: Edit, says: str, tmp_path: Path) -> None:
    doc = fleet_doc()
    edit(doc)
    fleet_refusal(tmp_path, doc, says)


def test_a_gateway_on_a_dns_name_may_give_its_source_addresses(tmp_path: Path) -> None:
    doc = fleet_doc()
    doc["hosts"]["gw-01"]["connection"]["address"] = "gw-01.example.com"
    doc["hosts"]["gw-01"]["data"] = {"gateway": {"source_addresses": ["10.0.0.31"]}}
    config = load_doc(tmp_path, doc).hosts["gpu-01"].config
    assert config.gateway_sources == {"chat": ("10.0.0.31", GW2)}


def test_an_upstream_listening_on_one_address_is_reached_there(tmp_path: Path) -> None:
    doc = fleet_doc()
    _gpu01_chat(listen="10.0.0.41")(doc)
    servers = load_doc(tmp_path, doc).hosts["gw-01"].config.upstream_servers
    assert [(s.host, s.address) for s in servers] == [("gpu-01", "10.0.0.41"), ("gpu-02", UP2)]


def test_every_openai_compatible_runtime_answers_one_health_check() -> None:
    """A backend holds the servers of one model, from any node and runtime, under one
    health check (gpunode.gateway.link relies on it)."""
    openai = {p.health_path for p in PROFILES.values() if p.models_path == "/v1/models"}
    assert len(openai) == 1 and len([p for p in PROFILES.values() if p.models_path]) >= 2


def test_rollout_asks_a_service_fronted_from_another_host_on_its_node(tmp_path: Path) -> None:
    """Its port lets only the gateways in, so the controller asks over SSH, on loopback;
    without the gateways it is asked from here, as before."""
    asked: list[list[str]] = []

    def runner(argv: list[str]) -> subprocess.CompletedProcess[str]:
        asked.append(argv)
        return subprocess.CompletedProcess(argv, 0, "", "")

    host = load_doc(tmp_path, fleet_doc()).hosts["gpu-01"]
    assert check_health(host, host.config.inference.services["chat"], 3, runner) is None
    assert asked and asked[0][0] == "ssh" and asked[0][-2].endswith(f"@{UP1}")
    assert f"http://127.0.0.1:{CHAT}/health" in asked[0][-1]
    doc = fleet_doc()
    doc["groups"]["gateways"]["data"]["gateway"]["enabled"] = False
    asked.clear()
    host = load_doc(tmp_path, doc).hosts["gpu-01"]
    assert check_health(host, host.config.inference.services["chat"], 0.2, runner) is not None
    assert asked == []  # asked from here (TEST-NET: nothing answers)
