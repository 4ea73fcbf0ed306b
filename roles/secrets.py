"""Secrets role: each declared Vault secret as an env file on the node.

For every entry of ``NodeConfig.secrets`` (gpunode/schema/vault.py, where every
default is documented) the controller reads the value from Vault while this
deploy runs, before any operation for the host is added: any Vault problem
(unreachable, sealed, permission denied, path or key missing, an empty value) stops
the whole run with a message naming the secret, before anything is written anywhere.
The file is written by :func:`gpunode.operations.files.secret_file` (atomic, owner
and mode first, never printed), and the services listed under ``restart`` are
restarted only when their file changed. Versions (never values) are recorded
for provenance.

.. code:: python

    from roles.secrets import secrets
    secrets()
"""

from __future__ import annotations

from pyinfra import host
from pyinfra.api import deploy
from pyinfra.operations import files, server, systemd

from gpunode.clients.vault import SecretValue, VaultError, session_for
from gpunode.inventory import node_config
from gpunode.operations.files import secret_file
from gpunode.provenance import record
from gpunode.schema.vault import SECRETS_DIR


@deploy("gpunode secrets")
def secrets(only: str | None = None, versions: dict[str, int] | None = None) -> None:
    """
    + only: deploy just this secret (rotation)
    + versions: secret name -> KV version to deploy instead of the pinned or latest one
    """
    config = node_config(host)
    wanted = {n: s for n, s in config.secrets.items() if only is None or n == only}
    if not wanted:
        return
    session = session_for(config.vault)
    # Every value first: a Vault error stops the run before any op is added.
    values: dict[str, SecretValue] = {
        name: session.read(name, secret, version=(versions or {}).get(name))
        for name, secret in wanted.items()
    }
    for name, value in values.items():
        if not value.value:  # a service would run without its key
            raise VaultError(
                f"host {host.name}: secret {name} ({wanted[name].where()} version "
                f"{value.version}): the value in Vault is empty (allowed: a non-empty value)"
            )
    if any(s.dest_for(n).startswith(SECRETS_DIR + "/") for n, s in wanted.items()):
        files.directory(
            name="Secrets directory", path=SECRETS_DIR, user="root", group="root", mode="0750"
        )
    for name, secret in wanted.items():
        if secret.group != "root":
            # e.g. the group of the service that reads it (root:gpunode-chat 0640), which
            # the inference role would create only later in the deploy
            server.group(name="Secret file group", group=secret.group, system=True)
        changed = secret_file(
            name="Secret file",
            path=secret.dest_for(name),
            secret=values[name],
            env=secret.env_name(),
            user=secret.owner,
            group=secret.group,
            mode=secret.mode,
        )
        for service in secret.restart:
            systemd.service(
                name="Restart a service whose secret changed",
                service=service.name,
                restarted=True,
                _if=changed.did_change,
            )
    record("secrets", {name: value.version for name, value in values.items()})
