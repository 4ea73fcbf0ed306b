"""Every string the configuration takes, walked from the models, against hostile values.

The walk starts at InventoryFile and NodeConfig and reaches every field of every model, its
list items and its mapping keys, so a field added tomorrow is in it the day it is added. For
each string slot and each value of CORPUS (a newline, shell and systemd specials, a path
escape, a leading '-', quotes, template syntax, look-alike letters, a 100 kB value) the test
writes a valid inventory (BASE) with that value at that slot to a real file and loads it
through gpunode.config, and asserts a ConfigError that names the file and the key. A value a
field accepts on purpose must be in ACCEPTED, whose entries test_accepted_values_reach_the_
host_only_quoted proves safe by deploying them on pyinfra's fake connector (tests/unit/
harness.py): every command carries the value only inside one quoted shell token, and every
uploaded file holds it only where its format reads it as one value.
"""

from __future__ import annotations

import copy
import ipaddress
import json
import shlex
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import UnionType
from typing import Any, Literal

import pytest
import yaml
from harness import GPU, GPU2, GPU3, IMAGES, SHA_MODEL, SHA_TAR
from pydantic import BaseModel, Field

from gpunode.config import load_file
from gpunode.schema.node import InventoryFile, NodeConfig
from gpunode.schema.types import PATTERN_HELP, ConfigError, Model

# --- the walk -----------------------------------------------------------------------------

Step = tuple[str, Any]  # ("field", name) | ("item", 0) | ("key", None) | ("newkey", None)


@dataclass(frozen=True)
class Slot:
    label: str  # Model.field, Model.field[] (a list item) or Model.field{} (a mapping key)
    steps: tuple[Step, ...]
    kind: Literal["value", "item", "key"]
    default: Any  # a valid value the model gives it, or None

    def __str__(self) -> str:
        return self.label


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _takes_text(annotation: Any) -> bool:
    """A string (constrained or not), a Literal of strings, or a CIDR: YAML gives text."""
    if annotation is str:
        return True
    if typing.get_origin(annotation) is Literal:
        return any(isinstance(a, str) for a in typing.get_args(annotation))
    return annotation in (ipaddress.IPv4Network, ipaddress.IPv6Network)


def _options(annotation: Any) -> list[Any]:
    """The annotation without Annotated[] and Optional[]: the types a value may have."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _options(typing.get_args(annotation)[0])
    if origin in (typing.Union, UnionType):
        return [o for a in typing.get_args(annotation) if a is not type(None) for o in _options(a)]
    return [annotation]


def walk(model: type[BaseModel], steps: tuple[Step, ...] = ()) -> Iterator[Slot]:
    for name, field in model.model_fields.items():
        if name in getattr(model, "RAW_LAYERS", ()):
            continue
        default = None if field.default_factory else field.default
        if field.default_factory is not None:
            default = field.default_factory()  # type: ignore[call-arg]
        yield from _walk(field.annotation, (*steps, ("field", name)), f"{model.__name__}.{name}",
                         "value", default)  # fmt: skip


def _walk(
    annotation: Any, steps: tuple[Step, ...], label: str, kind: Any, default: Any
) -> Iterator[Slot]:
    for option in _options(annotation):
        origin = typing.get_origin(option)
        if _is_model(option):
            yield from walk(option, steps)
        elif _takes_text(option):
            yield Slot(label, steps, kind, default)
        elif origin is list:
            item = default[0] if isinstance(default, list) and default else None
            yield from _walk(typing.get_args(option)[0], (*steps, ("item", 0)), f"{label}[]",
                             "item", item)  # fmt: skip
        elif origin is dict:
            key_type, value_type = typing.get_args(option)
            first = (
                next(iter(default.items()), (None, None))
                if isinstance(default, dict)
                else (None, None)
            )
            if any(_takes_text(o) for o in _options(key_type)):
                yield Slot(f"{label}{{key}}", (*steps, ("newkey", None)), "key", first[0])
            yield from _walk(value_type, (*steps, ("key", None)), f"{label}{{value}}", "value",
                             first[1])  # fmt: skip


def slots() -> list[Slot]:
    found: dict[tuple[Step, ...], Slot] = {}
    for slot in walk(InventoryFile):
        found.setdefault(slot.steps, slot)
    for slot in walk(NodeConfig, (("field", "defaults"),)):
        found.setdefault(slot.steps, slot)
    return list(found.values())


SLOTS = slots()


# --- a valid inventory with a value at every slot ----------------------------------------

LOCK = Path(__file__).resolve().parents[2] / "locks" / "runtimes" / "vllm-0.6.6.post1.txt"

BASE: dict[str, Any] = {
    "defaults": {
        "distro": "debian12",
        "base": {
            "hostname": "gpu-01",
            "apt_proxy": "http://proxy.example.com:3128",
            "apt_mirror": "http://mirror.example.com/debian",
            "packages": ["jq"],
            "admin_users": [
                {
                    "name": "alice",
                    "ssh_keys": ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAI alice@example.com"],
                }
            ],
        },
        "network": {
            "admin_cidrs": ["192.0.2.0/28"],
            "app_cidrs": ["198.51.100.0/24"],
            "monitoring_cidrs": ["192.0.2.16/28"],
            "cluster_cidrs": ["10.0.0.0/24"],
        },
        "nvidia": {
            "mirror": "https://mirror.example.com/nvidia",
            "version": "580.95.05",
            "module_signing": {
                "key_file": "/var/lib/shim-signed/mok/MOK.priv",
                "cert_file": "/var/lib/shim-signed/mok/MOK.der",
            },
        },
        "cuda": {"version": "13.0", "container_toolkit_mirror": "https://mirror.example.com/nct"},
        "gpu": {"model": "H100-SXM-80GB", "count": 8},
        "firewall": {
            "enabled": False,
            "extra_input": [{"name": "node-api", "port": 8443, "cidrs": ["192.0.2.0/28"]}],
            "egress": {
                "dns_cidrs": ["192.0.2.53/32"],
                "addresses": {"proxy.example.com": ["192.0.2.50/32"]},
                "extra": [{"name": "registry", "port": 443, "cidrs": ["192.0.2.60/32"]}],
            },
        },
        "hardening": {
            "sysctl": {"net.ipv4.tcp_timestamps": 0},
            "ssh": {"allow_groups": ["ops"], "permit_root_login": "prohibit-password"},
            "allow_modules": ["sctp"],
            "disable_modules": ["bluetooth"],
            "remote_logs": {"host": "logs.example.com", "ca_file": "~/pki/logs-ca.pem"},
        },
        "vault": {
            "addr": "https://vault.example.com:8200",
            "role_id": "0f5b1c2e-7c1d-4b1e-9f3a-2d4c6e8a0b1c",
            "namespace": "team-ml",
            "secret_id_file": "/etc/gpunode/vault-secret-id",
            "ca_cert": "/etc/ssl/vault-ca.pem",
            "client_cert": "/etc/ssl/vault-client.pem",
            "client_key": "/etc/ssl/vault-client-key.pem",
        },
        "secrets": {
            "chat_key": {
                "path": "gpunode/chat",
                "key": "api_key",
                "env": "VLLM_API_KEY",
                "dest": "/etc/gpunode/secrets/chat_key.env",
                "group": "gpunode-chat",
                "restart": [
                    {
                        "name": "gpunode-inference-chat.service",
                        "health_url": "http://127.0.0.1:8000/health",
                    }
                ],
            },
        },
        "inference": {
            "runtimes": {
                "vllm": {
                    "method": "pip",
                    "packages": ["vllm==0.6.6.post1"],
                    "index_url": "https://pypi.example.com/simple",
                    "binary": "bin/vllm",
                    "lock": str(LOCK),
                },
                "llamacpp": {"method": "package", "package": "llama-server", "version": "1.0-1"},
                "triton": {
                    "method": "artifact",
                    "artifact": {
                        "uri": "http://mirror.internal/triton.tar.gz",
                        "sha256": "e" * 64,
                        "format": "tar",
                    },
                },
            },
            "services": {
                "chat": {
                    "runtime": "vllm",
                    "port": 8000,
                    "model": {
                        "uri": "https://models.internal/llama-3-70b.tar",
                        "sha256": SHA_TAR,
                        "format": "tar",
                        "served_name": "llama-3-70b",
                        "subpath": "llama-3-70b",
                        "footprint": {"parameters": "70B", "dtype": "fp8"},
                    },
                    "gpus": [GPU, GPU2],
                    "tensor_parallel": 2,
                    "api_key_secret": "chat_key",
                    "extra_args": ["--enforce-eager"],
                },
                "vision": {
                    "runtime": "triton",
                    "port": 9000,
                    "model": {
                        "uri": "file:///mnt/models/repo.tar",
                        "sha256": SHA_TAR,
                        "format": "tar",
                    },
                    "gpus": [GPU3],
                },
                "embed": {
                    "runtime": "llamacpp",
                    "listen": "127.0.0.1",
                    "port": 8100,
                    "model": {
                        "uri": "file:///mnt/models/embed.gguf",
                        "sha256": SHA_MODEL,
                        "served_name": "embed-small",
                    },
                },
            },
        },
        "gateway": {
            "enabled": True,
            "services": ["embed"],
            "clients": {
                "alice": {
                    "key": {"mount": "secret", "path": "gpunode/clients/alice", "key": "api_key"},
                    "models": ["embed-small"],
                }
            },
            "tls": {"names": ["gpu-01.example.com"], "ip_sans": ["192.0.2.10"]},
            "upstreams": ["gpu-02"],
            "source_addresses": ["192.0.2.10"],
        },
        "nomad": {
            "enabled": True,
            "servers": ["10.0.0.10:4647"],
            "address": "https://nomad.example.com:4646",
            "repo_url": "https://mirror.example.com/hashicorp",
            "api_ca_file": "/etc/gpunode/nomad-ca.pem",
            "api_cert_file": "/etc/gpunode/nomad.pem",
            "api_key_file": "/etc/gpunode/nomad-key.pem",
            "vault_address": "https://vault.example.com:8200",
            "device_plugin": {
                "sha256": SHA_MODEL,
                "url": "https://mirror.example.com/nomad-device-nvidia.zip",
                "ignored_gpu_ids": [GPU3],
            },
            "jobs": {
                "chat": {
                    "gpu_memory_min": "16 GiB",
                    "gpu_model": "NVIDIA H100 80GB HBM3",
                    "image": IMAGES["vllm"],
                }
            },
            "images": dict(IMAGES),
        },
        "monitoring": {
            "drift": {
                "credentials": {"/etc/gpunode/controller/fleet_key": "/root/fleet_key"},
                "rotated_credentials": {"/var/lib/gpunode/controller/secret_id": "/root/secret_id"},
            }
        },
    },
    "groups": {"gpu_nodes": {"data": {"gpu": {"required": True}}}},
    "hosts": {
        "gpu-01": {
            "connection": {
                "address": "192.0.2.10",
                "key_file": "~/.ssh/gpunode_ed25519",
                "known_hosts_file": "~/.ssh/known_hosts.d/gpunode",
                "ssh_config_file": "/etc/gpunode/ssh_config",
            },
            "groups": ["gpu_nodes"],
        },
        "gpu-02": {  # an upstream of gpu-01's gateway
            "connection": {"address": "192.0.2.11"},
            "data": {
                "base": {"hostname": "gpu-02"},
                "gateway": {"enabled": False},
                "inference": {
                    "services": {
                        "embed": {  # as in defaults, on its own address
                            "runtime": "llamacpp",
                            "listen": "192.0.2.11",
                            "port": 8100,
                            "model": {
                                "uri": "file:///mnt/models/embed.gguf",
                                "sha256": SHA_MODEL,
                                "served_name": "embed-small",
                            },
                        }
                    }
                },
            },
        },
    },
}


def _concrete(doc: Any, steps: tuple[Step, ...]) -> list[Any] | None:
    """The slot's path in ``doc`` with placeholders resolved to a key or index that exists
    (the first one under which the rest of the path exists too); None when there is none."""
    if not steps:
        return []
    (kind, arg), rest = steps[0], steps[1:]
    if kind == "field":
        candidates = [arg]
    elif kind in ("key", "newkey"):
        candidates = list(doc) if isinstance(doc, dict) else []
    else:
        candidates = [0] if isinstance(doc, list) and doc else []
    for key in candidates:
        if kind == "newkey":
            return [key]
        if isinstance(doc, dict) and key not in doc:
            continue
        below = _concrete(doc[key], rest)
        if below is not None:
            return [key, *below]
    return None


def _longest(doc: Any, steps: tuple[Step, ...]) -> list[Any]:
    """The path to set: as much as exists in ``doc``, then the missing field names."""
    for cut in range(len(steps), -1, -1):
        found = _concrete(doc, steps[:cut])
        if found is not None:
            missing = steps[cut:]
            if all(kind == "field" for kind, _ in missing[:-1]) and missing[-1:] != (
                ("key", None),
            ):
                return found + [0 if kind == "item" else arg for kind, arg in missing]
    raise LookupError(f"no place in BASE for {steps}: add an entry above it")


def valid_value(slot: Slot) -> Any:
    """The base's value at the slot, or the model's default there; None when neither."""
    path = _concrete(BASE, slot.steps)
    if path is None:
        value = slot.default
    elif slot.kind == "key":
        value = path[-1]
    else:
        value = BASE
        for key in path:
            value = value[key]
    if isinstance(value, ipaddress.IPv4Network | ipaddress.IPv6Network):
        return str(value)
    return value if isinstance(value, str) else None


def with_value(slot: Slot, value: str, base: dict[str, Any] | None = None) -> dict[str, Any]:
    """``base`` (BASE) with ``value`` at the slot (for a mapping key: the key renamed to it)."""
    doc = copy.deepcopy(BASE if base is None else base)
    path = _longest(doc, slot.steps)
    here = doc
    for key, below in zip(path[:-1], path[1:], strict=True):
        if isinstance(here, dict) and key not in here:
            here[key] = [] if isinstance(below, int) else {}
        here = here[key]
    if slot.kind == "key":
        here[value] = here.pop(path[-1])
    elif isinstance(here, list) and len(here) == path[-1]:
        here.append(value)
    else:
        here[path[-1]] = value
    return doc


def write(doc: dict[str, Any], directory: Path, name: str = "inv.yml") -> Path:
    path = directory / name
    path.write_text(yaml.dump(doc, Dumper=yaml.CSafeDumper, sort_keys=False), encoding="utf-8")
    return path


# --- the hostile values -------------------------------------------------------------------

# id -> the hostile value made from a valid one (the valid value around it means a pattern
# that checks only the start, or only some characters, does not pass it)
CORPUS: dict[str, Callable[[str], str]] = {
    "newline": lambda v: v + "\nProxyCommand id",
    "carriage-return": lambda v: v + "\rx",
    "nul": lambda v: v + "\x00",
    "escape": lambda v: v + "\x1b[31m",
    "semicolon": lambda v: v + ";id",
    "ampersand": lambda v: v + "&id",
    "pipe": lambda v: v + "|id",
    "command-substitution": lambda v: v + "$(id)",
    "backticks": lambda v: v + "`id`",
    "dot-dot": lambda v: v + "/../../x",
    "leading-dot-dot": lambda v: "../" + v,
    "leading-dash": lambda v: "-" + v,
    "single-quote": lambda v: v + "'",
    "double-quote": lambda v: v + '"',
    "percent": lambda v: v + "%h",
    "jinja": lambda v: v + "{{ x }}",
    "dollar-brace": lambda v: v + "${x}",
    "space": lambda v: v + " x",
    "cyrillic-a": lambda v: v + "\u0430",
    "fullwidth-slash": lambda v: v + "\uff0fx",
    "line-separator": lambda v: v + "\u2028",
    "100kB": lambda v: v + "a" * 100_000,
}

# Values a field takes on purpose, each with the reason and the test that proves it reaches
# the node only as one quoted token or one escaped value: slot label -> corpus ids.
ACCEPTED: dict[str, frozenset[str]] = {
    # An authorized_keys comment is free text ("alice@laptop 2024", a path): written by
    # pyinfra's server.user_authorized_keys. Proof: test_ssh_key_comment_stays_one_token.
    "AdminUser.ssh_keys[]": frozenset({"space", "dot-dot"}),
    # Server flags by design (`--enforce-eager`, `--download-dir=../x`): one argv token of
    # ExecStart each. Proof: test_extra_args_are_one_exec_start_token.
    "Service.extra_args[]": frozenset({"leading-dash", "dot-dot", "leading-dot-dot"}),
    # NVML's names have spaces ("NVIDIA H100 80GB HBM3"); the value goes into the Nomad job's
    # JSON only (the controller's API call), never to a node. Proof:
    # test_gpu_model_is_a_json_string_only.
    "NomadJob.gpu_model": frozenset({"space"}),
    # OnCalendar= syntax has spaces and ".." ranges ("Mon..Fri *-*-* 10:00"). Proof:
    # test_schedule_is_one_on_calendar_value.
    "DriftTimer.schedule": frozenset({"space", "dot-dot", "leading-dot-dot"}),
    # A login banner is prose ("Authorized uses only; all activity is logged."): uploaded as
    # file content only, never in a command; /etc/issue doubles agetty's escape character.
    # Proof: test_banner_lines_are_file_content_only.
    "Hardening.banner[]": frozenset(
        {
            "semicolon",
            "ampersand",
            "pipe",
            "command-substitution",
            "backticks",
            "dot-dot",
            "leading-dot-dot",
            "single-quote",
            "double-quote",
            "percent",
            "jinja",
            "dollar-brace",
            "space",
        }
    ),
}


def key_path(slot: Slot, doc: dict[str, Any], field_only: bool = False) -> str:
    """How the loader names the slot: ``host gpu-01: connection.key_file`` or
    ``defaults: base.admin_users[0].name``; for a mapping key, the mapping's path. With
    ``field_only``, the field that holds a list item or mapping value (the control-character
    check names the field, and the item in its message)."""
    path = _longest(doc, slot.steps)
    if slot.kind == "key":
        path = path[:-1]
    if field_only:
        while len(path) > 1 and slot.steps[len(path) - 1][0] != "field":
            path = path[:-1]
    if path[0] == "hosts" and len(path) >= 2:
        where, rest = f"host {path[1]}", path[2:]
    elif path[0] == "groups" and len(path) >= 2:
        where, rest = f"group {path[1]}", path[2:]
    elif path[0] == "defaults":
        where, rest = "defaults", path[1:]
    else:
        where, rest = "inventory", path
    dotted = ""
    for part in rest:
        dotted += f"[{part}]" if isinstance(part, int) else (f".{part}" if dotted else part)
    return f"{where}: {dotted}" if dotted else where


def named(message: str, path: Path, slot: Slot) -> bool:
    """One line of the message names the file and the slot's key path."""
    if slot.kind == "key":  # "defaults: secrets.'bad;key'.(name): ...", "host 'x;y': (name)"
        mapping = key_path(slot, BASE)
        parent = {"inventory: hosts": "host ", "inventory: groups": "group "}.get(
            mapping, f"{mapping}."
        )
        return any(
            line.startswith(f"{path}: ")
            and ((parent in line and "(name)" in line) or f"{mapping}: key " in line)
            for line in message.splitlines()
        )
    wants = (f"{key_path(slot, BASE)}:", f"{key_path(slot, BASE, field_only=True)}:")
    return any(
        line.startswith(f"{path}: ") and any(want in line for want in wants)
        for line in message.splitlines()
    )


def _load(doc: dict[str, Any], directory: Path) -> str | None:
    """Write ``doc`` to a real file and load it: the ConfigError's message, or None."""
    path = write(doc, directory)
    try:
        load_file(path)
    except ConfigError as err:
        return str(err)
    return None


BATCH = 20  # slots per shared load: under the loader's 30 problems per layer


def outcomes(cid: str, directory: Path) -> dict[str, str | None]:
    """slot label -> the message of loading BASE with CORPUS[cid] at that slot (None: it
    loaded). Value slots share loads (one file with the value at up to BATCH slots: the
    loader reports every problem of a layer); a slot the shared message does not name is
    loaded on its own, and so is each mapping key."""
    make = CORPUS[cid]
    path = directory / "inv.yml"
    results: dict[str, str | None] = {}
    alone = [s for s in SLOTS if s.kind == "key"]
    shared = [s for s in SLOTS if s.kind != "key"]
    for start in range(0, len(shared), BATCH):
        batch = shared[start : start + BATCH]
        doc = BASE
        for slot in batch:
            doc = with_value(slot, make(valid_value(slot)), doc)
        message = _load(doc, directory) or ""
        for slot in batch:
            if named(message, path, slot):
                results[slot.label] = message
            else:
                alone.append(slot)
    for slot in alone:
        results[slot.label] = _load(with_value(slot, make(valid_value(slot))), directory)
    return results


# --- the tests ----------------------------------------------------------------------------


def test_the_walk_finds_every_string_field() -> None:
    labels = {slot.label for slot in SLOTS}
    assert len(SLOTS) >= 150, len(SLOTS)
    assert {
        "Connection.key_file",
        "InventoryFile.hosts{key}",
        "AdminUser.ssh_keys[]",
        "Secret.dest",
        "NodeConfig.secrets{key}",
        "Nomad.images{value}",
        "Hardening.sysctl{key}",
        "Service.extra_args[]",
    } <= labels


def test_a_new_field_is_walked_the_day_it_is_added() -> None:
    class Inner(Model):
        text: str = "x"

    class Section(Model):
        name: str
        items: list[str] = Field(default_factory=list)
        by_name: dict[str, Inner] = Field(default_factory=dict)

    labels = {slot.label for slot in walk(Section)}
    assert labels == {
        "Section.name",
        "Section.items[]",
        "Section.by_name{key}",
        "Inner.text",
    }


def test_base_is_valid_and_has_a_value_for_every_slot(tmp_path: Path) -> None:
    assert _load(BASE, tmp_path) is None
    missing = [slot.label for slot in SLOTS if valid_value(slot) is None]
    assert not missing, f"add a valid value for these to BASE: {missing}"


def test_every_pattern_says_in_words_what_it_allows() -> None:
    patterns: dict[str, str] = {}
    for model in _models():
        for name, field in model.model_fields.items():
            for option in _annotated(field.annotation):
                for meta in option:
                    if getattr(meta, "pattern", None):
                        patterns[meta.pattern] = f"{model.__name__}.{name}"
    missing = {where: p for p, where in patterns.items() if p not in PATTERN_HELP}
    assert not missing, f"add these to PATTERN_HELP (gpunode/schema/types.py): {missing}"
    assert len(patterns) >= 30


def _models() -> set[type[BaseModel]]:
    found: set[type[BaseModel]] = set()

    def visit(annotation: Any) -> None:
        if _is_model(annotation):
            if annotation not in found:
                found.add(annotation)
                for field in annotation.model_fields.values():
                    visit(field.annotation)
            return
        for arg in typing.get_args(annotation):
            visit(arg)

    visit(InventoryFile)
    visit(NodeConfig)
    return found


def _annotated(annotation: Any) -> Iterator[tuple[Any, ...]]:
    """The metadata of every Annotated[] inside an annotation."""
    if typing.get_origin(annotation) is typing.Annotated:
        yield typing.get_args(annotation)[1:]
    for arg in typing.get_args(annotation):
        if not isinstance(arg, (str, int)):
            yield from _annotated(arg)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("hostile")


@pytest.mark.parametrize("cid", list(CORPUS))
def test_a_hostile_value_is_refused_naming_file_and_key(cid: str, workdir: Path) -> None:
    path = workdir / "inv.yml"
    wrong = []
    for slot in SLOTS:
        message = outcomes_for(cid, workdir)[slot.label]
        if cid in ACCEPTED.get(slot.label, ()):
            continue  # accepted on purpose, proven below; refusing it is fine too
        if message is None:
            wrong.append(f"{slot.label}: accepted")
        elif not named(message, path, slot):
            wrong.append(f"{slot.label}: refused, but no line names {path} and "
                         f"{key_path(slot, BASE)!r}: {message[:300]!r}")  # fmt: skip
        elif len(message) > 20_000 or any(c in message for c in "\x00\x1b\r"):
            wrong.append(f"{slot.label}: the message is not short, printable text")
    assert not wrong, "\n".join(wrong)


_OUTCOMES: dict[str, dict[str, str | None]] = {}


def outcomes_for(cid: str, directory: Path) -> dict[str, str | None]:
    if cid not in _OUTCOMES:
        _OUTCOMES[cid] = outcomes(cid, directory)
    return _OUTCOMES[cid]


def test_accepted_entries_are_slots_and_corpus_ids() -> None:
    labels = {slot.label for slot in SLOTS}
    assert set(ACCEPTED) <= labels
    assert all(ids <= set(CORPUS) for ids in ACCEPTED.values())


# --- the accepted values reach the node only as one token ---------------------------------


def _accepted_values(label: str) -> list[str]:
    slot = next(s for s in SLOTS if s.label == label)
    return [CORPUS[cid](valid_value(slot)) for cid in sorted(ACCEPTED[label])]


def _config(label: str, value: str, directory: Path) -> NodeConfig:
    slot = next(s for s in SLOTS if s.label == label)
    doc = with_value(slot, value)
    doc["defaults"]["distro"] = "debian12"
    return load_file(write(doc, directory)).hosts["gpu-01"].config


@pytest.mark.parametrize("value", _accepted_values("AdminUser.ssh_keys[]"))
def test_ssh_key_comment_stays_one_token(value: str) -> None:
    """The base role on the fake host: the key reaches the node only as one line of
    authorized_keys (an uploaded file), in no command."""
    from test_base_role import KEYS_FILE, node_config, run_base

    run = run_base(node_config("debian12", admin_users=[{"name": "alice", "ssh_keys": [value]}]),
                   "debian12")  # fmt: skip
    assert not run.failed
    comment = value.split(" ", 2)[2]
    assert not [c for c in run.commands if comment in c]
    for path, text in run.uploads:
        if comment in text:
            assert path == KEYS_FILE
            assert value in text.splitlines()


@pytest.mark.parametrize("value", _accepted_values("Hardening.banner[]"))
def test_banner_lines_are_file_content_only(value: str, tmp_path: Path) -> None:
    """The hardening role on the fake host: the line is in no command, and is one line of
    /etc/issue.net and of /etc/issue (there with each backslash doubled for agetty)."""
    from test_hardening import fresh_responses, load_one, run_roles

    from gpunode import hardening

    config = load_one({"distro": "debian12", "hardening": {"banner": [value, "a\\l"]}})
    run = run_roles(config, "debian12", fresh_responses("debian12"))
    assert not run.failed
    assert not [c for c in run.commands if value in c]
    assert run.files[hardening.ISSUE_NET_FILE].splitlines() == [value, "a\\l"]
    assert run.files[hardening.ISSUE_FILE].splitlines() == [value, "a\\\\l"]


@pytest.mark.parametrize("value", _accepted_values("Service.extra_args[]"))
def test_extra_args_are_one_exec_start_token(value: str, tmp_path: Path) -> None:
    """The unit the inference role uploads: the argument is one token of ExecStart= (the
    characters ExtraArg allows have no meaning to systemd's or a shell's splitting)."""
    from gpunode.inference import Installed, render_unit, render_values

    config = _config("Service.extra_args[]", value, tmp_path)
    svc = config.inference.services["chat"]
    values = render_values("chat", svc, config, Installed("/opt/vllm/bin/vllm", None, "v", []))
    unit = render_unit(values, ["/dev/nvidia0"])
    [line] = [line for line in unit.splitlines() if value in line]
    assert line.startswith("ExecStart=")
    assert shlex.split(line.removeprefix("ExecStart="))[-1] == value


@pytest.mark.parametrize("value", _accepted_values("NomadJob.gpu_model"))
def test_gpu_model_is_a_json_string_only(value: str, tmp_path: Path) -> None:
    """The value is one JSON string of the job the controller submits to Nomad's API."""
    from gpunode.nomad_jobs import render_job

    config = _config("NomadJob.gpu_model", value, tmp_path)
    job = render_job(config, "chat")
    text = json.dumps(job)
    assert text.count(json.dumps(value)) == 1  # one JSON string, escaped by json.dumps
    assert {"LTarget": "${device.model}", "Operand": "=", "RTarget": value} in _dicts(job)


def _dicts(value: Any) -> Iterator[dict[str, Any]]:
    if isinstance(value, dict):
        yield value
        for item in value.values():
            yield from _dicts(item)
    elif isinstance(value, list):
        for item in value:
            yield from _dicts(item)


@pytest.mark.parametrize("value", _accepted_values("DriftTimer.schedule"))
def test_schedule_is_one_on_calendar_value(value: str, tmp_path: Path) -> None:
    """The controller role renders the timer with this template: the value is the whole
    OnCalendar= setting, on its own line, and nowhere else."""
    import jinja2

    from gpunode.paths import TEMPLATES

    config = _config("DriftTimer.schedule", value, tmp_path)
    drift = config.monitoring.drift
    template = jinja2.Template((TEMPLATES / "controller" / "gpunode-drift.timer.j2").read_text())
    text = template.render(schedule=drift.schedule, randomized_delay=drift.randomized_delay)
    assert [line for line in text.splitlines() if value in line] == [f"OnCalendar={value}"]
