"""``gpunode nomad render|plan|run``: the inventory's inference services as Nomad jobs,
planned and submitted through Nomad's HTTP API (gpunode/clients/nomad.py)."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from typing import Any, TextIO

from gpunode.clients.nomad import DeploymentFailed, NomadClient, NomadError, submit
from gpunode.clients.vault import Session, VaultError
from gpunode.inventory import load_inventory_file
from gpunode.nomad_jobs import render_job
from gpunode.schema.node import Inventory, NodeConfig
from gpunode.schema.vault import Secret

# --- from an inventory: what `gpunode nomad render|plan|run` does ----------------------------


def acl_token(config: NodeConfig, environ: Mapping[str, str]) -> str | None:
    """The Nomad ACL token: ``$NOMAD_TOKEN`` if set, else read from Vault (KV v2 at
    ``nomad.acl_token_vault``) with the controller's Vault login (``vault:`` section)."""
    if environ.get("NOMAD_TOKEN"):
        return environ["NOMAD_TOKEN"]
    if config.vault.addr is None:
        return None
    ref = config.nomad.acl_token_vault
    session = Session(config.vault, dict(environ))
    try:
        secret = Secret(mount=ref.mount, path=ref.path, key=ref.key)
        return session.read("nomad_acl_token", secret).value
    finally:
        session.close()


def client_for(config: NodeConfig, environ: Mapping[str, str]) -> NomadClient:
    nomad = config.nomad
    address = nomad.address or environ.get("NOMAD_ADDR")
    if not address:
        raise NomadError(
            "nomad.address: not set and no $NOMAD_ADDR (allowed: the Nomad HTTP API URL, "
            "e.g. https://nomad.example.com:4646)"
        )
    return NomadClient(
        address,
        token=acl_token(config, environ),
        ca_file=nomad.api_ca_file or environ.get("NOMAD_CACERT"),
        cert_file=nomad.api_cert_file or environ.get("NOMAD_CLIENT_CERT"),
        key_file=nomad.api_key_file or environ.get("NOMAD_CLIENT_KEY"),
        namespace=nomad.namespace,
        region=nomad.region,
        insecure_http=nomad.insecure_http,
    )


def inventory_jobs(inventory: Inventory, limit: list[str] | None = None) -> dict[str, Any]:
    """job ID -> (job, host it was rendered from), for every host (or those in ``limit``,
    hosts or groups). The same job from two hosts must be the same spec."""
    names = set(inventory.hosts)
    if limit:
        names = {h for item in limit for h in inventory.groups.get(item, (item,))} & names
        if not names:
            raise NomadError(f"--limit {' '.join(limit)}: no such host or group")
    jobs: dict[str, tuple[dict[str, Any], str]] = {}
    for hname, host in inventory.hosts.items():
        if hname not in names:
            continue
        for service in host.config.nomad.jobs:
            job = render_job(host.config, service)
            seen = jobs.get(job["ID"])
            if seen is not None and seen[0] != job:
                raise NomadError(
                    f"job {job['ID']}: hosts {seen[1]} and {hname} render different specs for "
                    "the same service (allowed: one definition, e.g. set it in a group)"
                )
            jobs.setdefault(job["ID"], (job, hname))
    return jobs


def command(
    action: str,
    inventory_path: str,
    limit: list[str] | None = None,
    wait: bool = True,
    timeout: float = 900.0,
    environ: Mapping[str, str] | None = None,
    out: TextIO | None = None,
) -> int:
    """``gpunode nomad render|plan|run``. Exit status: 0 done (plan: nothing to change),
    2 (plan only) changes pending, 1 an error or a failed deployment."""

    environ = os.environ if environ is None else environ
    out = sys.stdout if out is None else out
    inventory = load_inventory_file(inventory_path)
    try:
        jobs = inventory_jobs(inventory, limit)
        if action == "render":
            rendered = [job for job, _ in jobs.values()]
            out.write(json.dumps(rendered[0] if len(rendered) == 1 else rendered, indent=2) + "\n")
            return 0
        if not jobs:
            out.write("no inference service is listed in nomad.jobs\n")
            return 0
        status = 0
        clients: dict[str, NomadClient] = {}
        for job_id, (job, hname) in jobs.items():
            config = inventory.hosts[hname].config
            key = config.nomad.model_dump_json(include={"address", "namespace", "region"})
            if key not in clients:
                clients[key] = client_for(config, environ)
            nomad = clients[key]
            if action == "plan":
                plan = nomad.plan(job)
                out.write(plan.summary() + "\n")
                if plan.warnings:
                    out.write(f"job {job_id}: warnings: {plan.warnings}\n")
                if plan.changed:
                    status = max(status, 2)
                continue
            try:
                result = submit(nomad, job, wait=wait, timeout=timeout)
            except DeploymentFailed as exc:
                out.write(f"{exc}\n")
                status = 1
                continue
            out.write(result.summary() + "\n")
        return status
    except (NomadError, VaultError) as exc:
        sys.stderr.write(f"gpunode nomad {action}: {exc}\n")
        return 1
