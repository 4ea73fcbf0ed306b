"""The fleet's drift check as one periodic Nomad batch job, split into shards.

``gpunode drift INVENTORY DEPLOY --shard I/N`` checks only the hosts with
``int(sha256(host), 16) % N == I`` (gpunode/commands/drift.py). This module renders the
job that runs all N shards in parallel: one periodic batch job (``periodic``: cron in
UTC, ``prohibit_overlap``) with one task group of ``Count = N``; Nomad gives each
allocation its index in ``NOMAD_ALLOC_INDEX`` (0 to N-1), and the task's arguments say
``--shard ${NOMAD_ALLOC_INDEX}/N`` (Nomad interpolates it in the driver config). One
docker task, its image pinned by digest, runs gpunode from the deploy repository baked
into the image and writes its JSON and Prometheus reports into the allocation directory.

The fleet's SSH key and known_hosts reach the task only through two ``template`` blocks
that read Vault (KV v2) with the task's workload identity into its ``secrets/``
directory (mounted at ``/secrets`` by the docker driver, a tmpfs, mode 0400): the spec
holds Vault paths, never a value, and the task gets no Vault token (``DisableFile``,
no ``Env``). The inventory inside the image points every host at those two files
(:func:`check_inventory`). A run that fails (exit 1: an error; exit 2: drift found) is not
restarted or rescheduled: the next period runs again.

Every value in the job comes from a validated :class:`~gpunode.schema.nomad_drift.DriftJob`.

.. code:: python

    from gpunode.nomad_drift import load_settings, render_drift_job
    job = render_drift_job(load_settings("drift-job.yml"))   # json.dumps(job): the API payload

    # the command line: gpunode.nomad_drift.main(["--settings", "drift-job.yml"])
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, TextIO

import yaml
from pydantic import ValidationError

from gpunode.config import _format, decode_utf8, load_file
from gpunode.schema.node import Inventory
from gpunode.schema.nomad_drift import DriftJob, SecretRef
from gpunode.schema.types import ConfigError, parse_duration_ns

__all__ = [
    "KNOWN_HOSTS_FILE",
    "SSH_KEY_FILE",
    "check_inventory",
    "command",
    "load_settings",
    "main",
    "render_drift_job",
]

TASK = "drift"
GROUP = "shards"
# The task's secrets/ directory: a per-task tmpfs that the docker driver mounts at /secrets
# (NOMAD_SECRETS_DIR); template destinations are relative to the task directory.
SECRETS_DIR = "/secrets"
SSH_KEY_FILE = f"{SECRETS_DIR}/fleet_ssh_key"
KNOWN_HOSTS_FILE = f"{SECRETS_DIR}/known_hosts"
SHARD_INDEX = "${NOMAD_ALLOC_INDEX}"  # interpolated by Nomad, per allocation
KILL_TIMEOUT_NS = 30 * 10**9  # let a run that is stopped write its report
TIMEOUT_GRACE = "30s"  # coreutils timeout: KILL this long after TERM
MAX_SETTINGS_BYTES = 64 * 1024


def render_drift_job(settings: DriftJob) -> dict[str, Any]:
    """The periodic batch job (API JSON, ``POST /v1/jobs``) that checks the fleet in
    ``settings.shards`` parallel allocations."""
    n = settings.shards
    out = settings.output_dir
    args = [
        "drift",
        settings.inventory,
        settings.deploy,
        "--shard",
        f"{SHARD_INDEX}/{n}",
        "--json",
        f"{out}/drift-{SHARD_INDEX}.json",
        "--prometheus",
        f"{out}/gpunode_drift-{SHARD_INDEX}.prom",
    ]
    if settings.apply:
        args.append("--apply")
    program = settings.program or "gpunode"
    if settings.run_timeout is not None:
        seconds = max(1, parse_duration_ns(settings.run_timeout) // 10**9)
        command = "timeout"
        args = [f"--kill-after={TIMEOUT_GRACE}", f"{seconds}s", program, *args]
    else:
        command = program

    vault_templates = [
        _secret_template(settings.ssh_key, SSH_KEY_FILE, settings.uid),
        _secret_template(settings.known_hosts, KNOWN_HOSTS_FILE, settings.uid),
    ]
    task: dict[str, Any] = {
        "Name": TASK,
        "Driver": "docker",
        "Config": {
            "image": settings.image,
            "command": command,
            "args": args,
            "work_dir": settings.workdir,
            "cap_drop": ["ALL"],  # an SSH client needs no capability
            "security_opt": ["no-new-privileges"],
        },
        "Env": {
            "GPUNODE_CACHE_DIR": settings.cache_dir,
        },
        "Resources": {"CPU": settings.cpu_mhz, "MemoryMB": settings.memory_mb},
        "Vault": {
            "Role": settings.vault_role,
            "ChangeMode": "noop",  # the next period logs in afresh
            "Env": False,  # the run gets the files, never a Vault token
            "DisableFile": True,
        },
        "Templates": vault_templates,
        "KillTimeout": KILL_TIMEOUT_NS,
        "LogConfig": {"MaxFiles": 5, "MaxFileSizeMB": 10},
    }
    if settings.uid is not None:
        task["User"] = str(settings.uid)

    constraints = [{"LTarget": "${attr.kernel.name}", "Operand": "=", "RTarget": "linux"}]
    if settings.node_class is not None:
        constraints.append(
            {"LTarget": "${node.class}", "Operand": "=", "RTarget": settings.node_class}
        )
    group: dict[str, Any] = {
        "Name": GROUP,
        "Count": n,
        "Constraints": constraints,
        # a failed run is not retried: the next period checks again
        "RestartPolicy": {"Attempts": 0, "Mode": "fail"},
        "ReschedulePolicy": {"Attempts": 0, "Unlimited": False},
        "Tasks": [task],
    }
    return {
        "ID": settings.job_id,
        "Name": settings.job_id,
        "Type": "batch",
        "Region": settings.region,
        "Namespace": settings.namespace,
        "Datacenters": list(settings.datacenters),
        "Priority": settings.priority,
        "Periodic": {
            "Enabled": True,
            "SpecType": "cron",
            "Spec": settings.schedule,
            "ProhibitOverlap": True,
            "TimeZone": "UTC",
        },
        "Meta": {"gpunode_shards": str(n)},
        "TaskGroups": [group],
    }


def _secret_template(ref: SecretRef, dest: str, uid: int | None) -> dict[str, Any]:
    """One value from Vault KV v2 into a file in the task's secrets/ directory, by the task's
    workload identity; exactly one trailing newline (OpenSSH reads the key line by line)."""
    body = (
        f'{{{{ with secret "{ref.api_path()}" }}}}'
        f'{{{{ index .Data.data "{ref.key}" | trimSpace }}}}\n'
        "{{ end }}"
    )
    template: dict[str, Any] = {
        "DestPath": dest.lstrip("/"),  # relative to the task directory: secrets/...
        "EmbeddedTmpl": body,
        "ChangeMode": "noop",  # a rotated value is read by the next period's run
        "Perms": "0400",
        "ErrMissingKey": True,
    }
    if uid is not None:
        template.update(Uid=uid, Gid=uid)
    return template


def check_inventory(inventory: Inventory) -> list[str]:
    """What in the fleet inventory keeps it from running in the job: every host must use
    the job's key and known_hosts files and refuse unknown host keys (the known_hosts file
    is read-only in the task: nothing may be learned on first use)."""
    problems = []
    for name, host in inventory.hosts.items():
        c = host.connection
        where = f"{inventory.source}: host {name}: connection"
        if c.key_file != SSH_KEY_FILE:
            problems.append(
                f"{where}.key_file: {c.key_file!r} is not the job's key file "
                f"(allowed: {SSH_KEY_FILE}, written from Vault by the job's template)"
            )
        if c.known_hosts_file != KNOWN_HOSTS_FILE:
            problems.append(
                f"{where}.known_hosts_file: {c.known_hosts_file!r} is not the job's known_hosts "
                f"file (allowed: {KNOWN_HOSTS_FILE}, written from Vault by the job's template)"
            )
        if c.strict_host_key_checking != "yes":
            problems.append(
                f"{where}.strict_host_key_checking: {c.strict_host_key_checking!r} (allowed: "
                "yes: every host's key is in the known_hosts from Vault)"
            )
    return problems


# --- the settings file and the command line ----------------------------------------------


def load_settings(path: str | Path) -> DriftJob:
    """The job's settings from a YAML file (safe tags only, each key once, at most
    MAX_SETTINGS_BYTES); ConfigError naming the file, the key and what is allowed."""
    path = Path(path)
    try:
        with path.open("rb") as stream:
            raw = stream.read(MAX_SETTINGS_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the settings: {exc.strerror}") from None
    if len(raw) > MAX_SETTINGS_BYTES:
        raise ConfigError(
            f"{path}: the file is larger than {MAX_SETTINGS_BYTES} bytes (allowed: a settings "
            "file of at most that size)"
        )
    text = decode_utf8(path, raw)
    try:
        data = yaml.load(text, Loader=_SettingsLoader)  # noqa: S506 - a SafeLoader
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: YAML error: {exc}") from None
    except RecursionError:
        raise ConfigError(f"{path}: YAML error: nested too deeply") from None
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: the settings must be a mapping of keys (allowed keys: "
            f"{', '.join(DriftJob.model_fields)}), not {type(data).__name__}"
        )
    try:
        return DriftJob.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format(str(path), "drift job", exc, DriftJob)) from None


class _SettingsLoader(yaml.SafeLoader):
    """A SafeLoader that refuses a key written twice (PyYAML keeps the last silently) and a
    key that is not a string."""


def _construct_mapping(loader: _SettingsLoader, node: yaml.MappingNode, deep: bool = False) -> Any:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=deep)  # type: ignore[no-untyped-call]
        if not isinstance(key, str):
            raise yaml.constructor.ConstructorError(
                None, None, "a key is not a string (allowed: string keys)", key_node.start_mark
            )
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key[:40]!r} (allowed: each key once)",
                key_node.start_mark,
            )  # fmt: skip
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_SettingsLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
    _construct_mapping,  # type: ignore[arg-type]
)


def command(
    settings_path: str,
    inventory_path: str | None = None,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """``gpunode drift-job --settings FILE [--inventory FILE]``: print the job's JSON.
    With ``inventory_path`` (the fleet inventory that goes into the image), also check that
    it uses the job's key and known_hosts files. Exit status 0, or 1 with the problems on
    ``err``."""
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    try:
        settings = load_settings(settings_path)
        if inventory_path is not None:
            if Path(inventory_path).suffix not in (".yml", ".yaml"):
                raise ConfigError(
                    f"{inventory_path}: not an inventory YAML file (allowed: the .yml file "
                    "the image's inventory .py loads)"
                )
            problems = check_inventory(load_file(inventory_path))
            if problems:
                raise ConfigError("\n".join(problems))
    except ConfigError as exc:
        err.write(f"gpunode drift-job: {exc}\n")
        return 1
    out.write(json.dumps(render_drift_job(settings), indent=2) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="gpunode drift-job",
        description="Print the periodic Nomad job that checks the fleet for drift in shards.",
    )
    parser.add_argument("--settings", required=True, help="the job's settings (YAML)")
    parser.add_argument(
        "--inventory",
        help="the fleet inventory YAML baked into the image: check that every host uses the "
        "job's key and known_hosts files",
    )
    args = parser.parse_args(argv)
    return command(args.settings, args.inventory)


if __name__ == "__main__":
    sys.exit(main())
