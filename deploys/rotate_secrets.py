"""Deploy only the secrets (all of them, or the one named by $GPUNODE_SECRET).

    pyinfra -y inventories/prod.py deploys/rotate_secrets.py

Picks up a version someone wrote in Vault (the latest, or the pinned one) and
restarts the services of the files that changed. `gpunode rotate` does the
same host by host, with health checks, after writing a new version.
"""

import os

from roles.secrets import secrets

secrets(only=os.environ.get("GPUNODE_SECRET") or None)
