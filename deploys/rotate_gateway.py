"""Deploy only the gateway: every client's key at the latest version, or one client's at a
given one.

    pyinfra -y inventories/prod.py deploys/rotate_gateway.py
    pyinfra -y inventories/prod.py deploys/rotate_gateway.py \\
        --data gpunode_gateway_client=alice --data gpunode_gateway_client_version=7

Picks up a key someone wrote in Vault: the keys map (SHA-256 digests only) changes and
HAProxy reloads without dropping a connection. `gpunode rotate INV gateway.clients.<client>`
does the same host by host, with health checks, after writing a new version: it runs this
file with the host data ``gpunode_gateway_client`` (the client's name) and
``gpunode_gateway_client_version`` (the KV version of its key to deploy); the other clients'
keys stay at their latest version. Names and version numbers only: keys come from Vault
while the deploy runs (the controller's), and the node gets their digests.
"""

from pyinfra import host

from gpunode.gateway import active_clients
from gpunode.inventory import node_and_distro
from gpunode.operations.server import stage_uploads_as_login
from gpunode.schema.types import ConfigError
from roles.gateway import gateway
from roles.hardening import file_integrity

stage_uploads_as_login()  # with sudo: in the login's own temporary directory

client = host.data.get("gpunode_gateway_client") or None
version = host.data.get("gpunode_gateway_client_version")
if version is not None and client is None:
    raise ConfigError(
        "gpunode_gateway_client_version: set without gpunode_gateway_client (allowed: both, "
        "to deploy one client's key at one version)"
    )
if version is not None and not str(version).isdigit():
    raise ConfigError(
        "gpunode_gateway_client_version: not a version number (allowed: a KV version, e.g. 7)"
    )
config, _ = node_and_distro(host)
if client is not None and config.gateway.enabled and client not in active_clients(config):
    raise ConfigError(
        f"host {host.name}: gpunode_gateway_client: {str(client)[:64]!r} is not an active client "
        f"of this gateway (allowed: {', '.join(active_clients(config)) or 'none'})"
    )
gateway(versions={client: int(version)} if client and version is not None else None)
file_integrity()  # this run's changes into AIDE's database (none: nothing runs)
