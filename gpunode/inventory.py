"""Glue between gpunode's validated config and pyinfra inventory files.

An inventory file (``inventories/prod.py``) is three lines::

    from gpunode.inventory import from_yaml
    _gpunode = from_yaml(__file__)
    globals().update(_gpunode.pyinfra_groups())

It reads the YAML beside it (``prod.yml``), validates all of it and exposes one
pyinfra group per config group. Bad input stops pyinfra here, before it opens
any connection, with gpunode's message and exit status 2.
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path
from typing import Any, NoReturn

from pyinfra.api.exceptions import DeployError

from gpunode import firewall, gateway, inference
from gpunode.config import load, load_file
from gpunode.schema.distros import DISTROS, DistroSpec
from gpunode.schema.node import Inventory, NodeConfig
from gpunode.schema.types import ConfigError

EXIT_CONFIG = 2


def fail(exc: ConfigError) -> NoReturn:
    print(f"gpunode: invalid configuration\n{exc}", file=sys.stderr)
    raise SystemExit(EXIT_CONFIG)


# Warnings already printed in this process: each distinct one once per run.
_REPORTED: set[str] = set()


def report(inventory: Inventory) -> Inventory:
    """Print the loaded config's warnings to stderr (insecure transport settings, say), each
    distinct one once per run, naming its hosts. Every command that loads an inventory
    (pyinfra through inventories/*.py, every `gpunode` command) comes through here."""
    hosts: dict[str, list[str]] = {}
    for name, host in inventory.hosts.items():
        config = host.config
        for warning in (
            *config.vault.warnings(),
            *config.nomad.warnings(),
            *firewall.warnings(config),
            *inference.warnings(config),
            *gateway.warnings(config),
        ):
            hosts.setdefault(warning, []).append(name)
    for warning, names in hosts.items():
        line = f"gpunode: warning: {warning} (hosts: {', '.join(names)})"
        if line not in _REPORTED:
            _REPORTED.add(line)
            print(line, file=sys.stderr)
    return inventory


def yaml_path_for(inventory_py: str | Path) -> Path:
    path = Path(inventory_py)
    for suffix in (".yml", ".yaml"):
        candidate = path.with_suffix(suffix)
        if candidate.exists():
            return candidate
    return path.with_suffix(".yml")


def from_yaml(inventory_py: str | Path) -> Inventory:
    """Validate the YAML beside an inventory .py file; exit 2 with the message if it is bad."""
    try:
        return report(load_file(yaml_path_for(inventory_py)))
    except ConfigError as exc:
        fail(exc)


def from_dict(raw: Any, source: str) -> Inventory:
    try:
        return report(load(raw, source))
    except ConfigError as exc:
        fail(exc)


def load_inventory_file(path: str | Path) -> Inventory:
    """An Inventory from a YAML file, or from a gpunode inventory .py (its ``_gpunode``)."""
    path = Path(path)
    if path.suffix in (".yml", ".yaml"):
        return from_yaml(path)
    if not path.exists():
        fail(ConfigError(f"{path}: no such inventory file"))
    namespace = runpy.run_path(str(path))
    inventory = namespace.get("_gpunode")
    if not isinstance(inventory, Inventory):
        fail(
            ConfigError(
                f"{path}: not a gpunode inventory (allowed: a .yml file, or a .py file that sets "
                "_gpunode = gpunode.inventory.from_yaml(__file__))"
            )
        )
    return inventory


def node_config(host: Any) -> NodeConfig:
    """The validated NodeConfig of a pyinfra host; a clear error if it has none."""
    config = host.data.get("gpunode")
    if not isinstance(config, NodeConfig):
        raise ConfigError(
            f"host {host.name}: no gpunode config (allowed: inventories built with "
            "gpunode.inventory.from_yaml, see inventories/example.py)"
        )
    return config


def _check_upload_staging(host: Any) -> None:
    """Stop a role early, saying what to do, where uploads would be staged under sudo in a
    directory pyinfra looked up as root (``stage_uploads_as_login`` was not called)."""
    if host.state.config.TEMP_DIR or host.data.get("_temp_dir"):
        return
    if host.data.get("_sudo", host.state.config.SUDO):
        raise DeployError(
            f"host {host.name}: uploads with sudo need a staging directory the login can write "
            "(allowed: call gpunode.operations.server.stage_uploads_as_login() at the top of "
            "the deploy file, before any role, as deploys/gpu_node.py does; or set TEMP_DIR)"
        )


def node_and_distro(host: Any) -> tuple[NodeConfig, DistroSpec]:
    """The opening lines of every role: the host's NodeConfig and its distro's row
    (gpunode/schema/distros.py). Config loading guarantees that the distro is set."""
    _check_upload_staging(host)
    config = node_config(host)
    if config.distro is None:
        raise ConfigError(f"host {host.name}: distro: not set (allowed: {', '.join(DISTROS)})")
    return config, DISTROS[config.distro]
