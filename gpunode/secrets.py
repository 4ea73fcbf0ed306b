"""Secrets: the checks of ``secrets:`` against the rest of a node's config.

The sections are in gpunode/schema/vault.py, the Vault client in gpunode/clients/vault.py,
the leak-proof file operation in gpunode/operations/files.py.
"""

from __future__ import annotations

from gpunode.schema.node import Connection, NodeConfig


def check_host(where: str, config: NodeConfig, connection: Connection) -> list[str]:
    """Checks that need the merged config (and the host's connection); [] when fine."""
    problems = []
    vault = config.vault
    if config.secrets and not vault.addr:
        problems.append(
            f"{where}: vault.addr: not set but secrets are declared "
            f"({', '.join(config.secrets)}) (allowed: the Vault URL, e.g. https://vault:8200)"
        )
    if vault.client_key and not vault.client_cert:
        problems.append(f"{where}: vault.client_key: set without vault.client_cert")
    if vault.rotate_secret_id and (vault.auth != "approle" or not vault.secret_id_file):
        problems.append(
            f"{where}: vault.rotate_secret_id: needs vault.auth: approle and "
            "vault.secret_id_file, the file it rotates (allowed: both set, or false)"
        )
    dests: dict[str, str] = {}
    for name, secret in config.secrets.items():  # names: SecretName, checked by the schema
        for field_name in ("path", "key"):
            if getattr(secret, field_name) is None:
                problems.append(
                    f"{where}: secrets.{name}.{field_name}: required key is missing (allowed: "
                    + (
                        "the KV v2 path without data/, e.g. gpunode/llm)"
                        if field_name == "path"
                        else "the key inside the secret, e.g. api_key)"
                    )
                )
        dest = secret.dest_for(name)
        if dest in dests:
            problems.append(
                f"{where}: secrets.{name}.dest: {dest} is also the file of secret "
                f"{dests[dest]} (allowed: one file per secret)"
            )
        dests.setdefault(dest, name)
    return problems
