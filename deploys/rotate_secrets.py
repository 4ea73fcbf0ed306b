"""Deploy only the secrets: all of them, or one, at the latest (or pinned) version or a given one.

    pyinfra -y inventories/prod.py deploys/rotate_secrets.py
    pyinfra -y inventories/prod.py deploys/rotate_secrets.py --data gpunode_secret=llm_api_key
    pyinfra -y inventories/prod.py deploys/rotate_secrets.py \\
        --data gpunode_secret=llm_api_key --data gpunode_secret_version=7

Picks up a version someone wrote in Vault (the latest, or the pinned one) and
restarts the services of the files that changed. `gpunode rotate` does the
same host by host, with health checks, after writing a new version: it runs
this file with the host data ``gpunode_secret`` (the secret's name) and
``gpunode_secret_version`` (the KV version to deploy). ``$GPUNODE_SECRET`` names
the secret too when the host data does not. Names and version numbers only:
values come from Vault while the deploy runs, never from data or the environment.
"""

import os

from pyinfra import host

from gpunode.operations.server import stage_uploads_as_login
from gpunode.schema.types import ConfigError
from roles.hardening import file_integrity
from roles.secrets import secrets

stage_uploads_as_login()  # with sudo: in the login's own temporary directory

only = host.data.get("gpunode_secret") or os.environ.get("GPUNODE_SECRET") or None
version = host.data.get("gpunode_secret_version")
if version is not None and only is None:
    raise ConfigError(
        "gpunode_secret_version: set without gpunode_secret (allowed: both, to deploy one "
        "secret at one version)"
    )
secrets(only=only, versions={only: int(version)} if only and version is not None else None)
file_integrity()  # this run's changes into AIDE's database (none: nothing runs)
