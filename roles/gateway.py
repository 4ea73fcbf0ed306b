"""Gateway role: HAProxy in front of the node's inference services (the front door).

Everything it reads is ``NodeConfig.gateway`` (gpunode/schema/gateway.py, where every
default is documented); the configuration is rendered by gpunode/haproxy.py. While the
deploy file runs, before any operation is added, the controller reads every active
client's key from Vault and checks that the PKI role can issue the certificate (role,
policy, TTL): any Vault problem stops the run naming the key, before anything is written.

* the distro's ``haproxy`` package; its whole ``haproxy.cfg`` is gpunode's;
* the certificate (leaf, chain, key; 0600 haproxy) issued through Vault PKI when one is
  due (gpunode/operations/gateway.py), and a timer that exports its expiry for the alert;
* the client map holds the SHA-256 of each key, never a key, written like a secret;
* the configuration lands only once ``haproxy -c`` accepts it; a changed config, map or
  certificate reloads HAProxy (master-worker: old connections finish, no request is dropped).

A node without ``gateway.enabled`` gets no operation at all.

.. code:: python

    from roles.gateway import gateway
    gateway()
"""

from __future__ import annotations

import io

from pyinfra import host
from pyinfra.api import deploy
from pyinfra.facts.deb import DebPackages
from pyinfra.operations import apt, dnf, files, systemd

from gpunode import gateway as front
from gpunode import haproxy
from gpunode.clients.pki import Issuer
from gpunode.clients.vault import VaultError, session_for
from gpunode.inventory import node_and_distro
from gpunode.operations.files import MaskedBytes, private_file
from gpunode.operations.gateway import certificate, haproxy_config
from gpunode.operations.packages import apt_update
from gpunode.paths import template
from gpunode.provenance import record
from gpunode.schema.gateway import HAPROXY_DIR
from gpunode.schema.vault import Secret

PACKAGES = ["haproxy", "openssl"]  # openssl: the certificate fact and the expiry timer
CERT_UNITS = ("gpunode-gateway-cert.service", "gpunode-gateway-cert.timer")


@deploy("gpunode gateway")
def gateway(versions: dict[str, int] | None = None) -> None:
    """
    + versions: client name -> KV version of its key to deploy instead of the latest
      (`gpunode rotate` rolls a new key out host by host, and back on failure)
    """
    config, spec = node_and_distro(host)
    gw = config.gateway
    if not gw.enabled:
        return
    where = f"host {host.name}: gateway"
    session = session_for(config.vault)
    # Vault first: every key and the PKI role, before any operation is added.
    digests: dict[str, str] = {}
    deployed: dict[str, int] = {}
    for name, client in front.active_clients(config).items():
        key = Secret(mount=client.key.mount, path=client.key.path, key=client.key.key)
        try:
            value = session.read(
                f"gateway.clients.{name}.key", key, version=(versions or {}).get(name)
            )
        except VaultError as exc:
            raise VaultError(f"host {host.name}: {exc}") from None
        if not value.value:
            raise VaultError(
                f"{where}.clients.{name}.key: {client.key.where()} (version {value.version}) "
                "is empty (allowed: a non-empty key)"
            )
        digests[name] = front.key_digest(value.value)
        deployed[name] = value.version
    address = host.data.get("ssh_hostname") or host.name
    names = front.certificate_names(config, host.name, address)
    ips = front.certificate_ips(config, address)
    issuer = Issuer(session, gw.tls.mount, gw.tls.role)
    issuer.check(names, ips, front.ttl_s(config), f"{where}.tls")

    if spec.family == "apt":
        if not set(PACKAGES) <= set(host.get_fact(DebPackages)):
            apt_update(name="Refresh apt package lists (HAProxy)")
        apt.packages(name="HAProxy package", packages=PACKAGES, no_recommends=True)
    else:
        dnf.packages(name="HAProxy package", packages=PACKAGES)
    files.directory(
        name="Gateway directory",
        path=HAPROXY_DIR,
        user="root",
        group=front.PROXY_USER,
        mode="0750",
    )
    files.directory(
        name="Gateway TLS directory",
        path=front.TLS_DIR,
        user=front.PROXY_USER,
        group=front.PROXY_USER,
        mode="0700",
    )
    cert = certificate(
        name="Gateway certificate",
        path=front.CERT_FILE,
        issuer=issuer,
        names=names,
        ips=ips,
        ttl_s=front.ttl_s(config),
        user=front.PROXY_USER,
        group=front.PROXY_USER,
        mode="0600",
    )
    changed = [cert]
    changed.append(
        files.put(  # public: the CA that mTLS clients' certificates must come from
            name="Gateway client CA",
            src=io.StringIO(issuer.ca_pem()),
            dest=haproxy.NODE.client_ca_file,
            user="root",
            group=front.PROXY_USER,
            mode="0644",
        )
    )
    for path, text in haproxy.map_files(config, digests).items():
        if path == front.KEYS_MAP:  # digests of keys: kept like a secret, never diffed
            changed.append(
                private_file(
                    name="Gateway client keys (SHA-256)",
                    path=path,
                    content=MaskedBytes("client key digests", text.encode()),
                    user="root",
                    group=front.PROXY_USER,
                    mode="0640",
                )
            )
        else:
            changed.append(
                files.put(
                    name="Gateway map",
                    src=io.StringIO(text),
                    dest=path,
                    user="root",
                    group=front.PROXY_USER,
                    mode="0640",
                )
            )
    changed.append(
        haproxy_config(
            name="HAProxy configuration",
            path=front.CONFIG_FILE,
            content=haproxy.render_config(config),
        )
    )

    def _changed() -> bool:
        return any(op.did_change() for op in changed)

    systemd.service(
        name="HAProxy running",
        service=front.UNIT,
        running=True,
        enabled=True,
        reloaded=True,
        _if=_changed,
    )
    systemd.service(name="HAProxy enabled", service=front.UNIT, running=True, enabled=True)

    units = [
        files.template(
            name="Gateway certificate expiry unit",
            src=template("gateway", unit),
            dest=f"/etc/systemd/system/{unit}",
            mode="0644",
            cert_file=front.CERT_FILE,
            textfile_dir=config.monitoring.textfile_dir,
            user="root",
            group="root",
        )
        for unit in CERT_UNITS
    ]
    systemd.daemon_reload(
        name="systemd daemon-reload (gateway)", _if=lambda: any(u.did_change() for u in units)
    )
    systemd.service(
        name="Gateway certificate expiry timer",
        service=CERT_UNITS[1],
        running=True,
        enabled=True,
    )
    systemd.service(
        name="Gateway certificate expiry now",
        service=CERT_UNITS[0],
        running=True,
        _if=cert.did_change,
    )
    record("gateway", {"clients": deployed})
