"""Gateway operations: HAProxy's configuration, which takes effect only once ``haproxy -c``
accepts it, and the TLS certificate issued by Vault's PKI secrets engine.

The certificate is issued only when a change is due, and only when the operation runs
(never in a dry run or a drift check, which only report it): the decision is made from the
certificate the node serves (:class:`~gpunode.facts.gateway.Certificate`, public) and the
CA Vault signs with; the new leaf, chain and private key go to the node through the
leak-proof private-file path (gpunode/operations/files.py), never printed, never diffed.
"""

from __future__ import annotations

import shlex
from datetime import UTC, datetime
from typing import Any

from pyinfra import host, logger
from pyinfra.api import FunctionCommand, operation

from gpunode import seal
from gpunode.certs import parse_certificate, renewal_reason, renewal_time
from gpunode.clients.pki import Issuer
from gpunode.clients.vault import VaultError
from gpunode.facts.files import PrivateFileState
from gpunode.facts.gateway import Certificate
from gpunode.operations.files import (
    MaskedBytes,
    _mode,
    _owner_and_mode,
    _write,
    checked_install,
)

HAPROXY = "haproxy"


def install_config_command(staged: str, dest: str) -> str:
    """Check the staged configuration with ``haproxy -c`` (the maps and certificate it names
    are already in place), then move it over the live one; on a refusal the staged file is
    removed, the live one stays and the command fails with HAProxy's reason."""
    s, d = shlex.quote(staged), shlex.quote(dest)
    refused = shlex.quote(f"gpunode: haproxy -c refused the new {dest}: it was not put in place")
    return "\n".join(
        [
            f"if ! {HAPROXY} -c -q -f {s}; then",
            f"  rm -f {s}",
            f"  echo {refused} >&2",
            "  exit 1",
            "fi",
            f"mv -f {s} {d}",
        ]
    )


@operation()
def haproxy_config(path: str, content: str):
    """
    Write HAProxy's configuration so that a configuration HAProxy refuses never lands: it is
    staged beside its destination (root, 0644), checked with ``haproxy -c`` and only then
    moved in place; nothing is written when the file already has this content, owner and
    mode. The running HAProxy is untouched (reload it when this changed).

    + path: the configuration file (``/etc/haproxy/haproxy.cfg``)
    + content: its text (rendered by gpunode.haproxy.render_config)

    .. code:: python

        haproxy_config(name="HAProxy configuration", path="/etc/haproxy/haproxy.cfg",
                       content=render_config(config))
    """
    yield from checked_install(path, content, "644", install_config_command)


@operation()
def certificate(
    path: str,
    issuer: Issuer,
    names: list[str],
    ips: list[str],
    ttl_s: int,
    user: str,
    group: str,
    mode: str,
):
    """
    Keep a certificate from Vault PKI in place: issued when missing, expired, within the
    last third of its lifetime, for other names or addresses, from another CA, or with
    another lifetime; otherwise only its owner and mode are kept. The file holds the leaf,
    the CA chain and the private key (HAProxy's ``crt`` format).

    + path: the PEM file on the node (its directory must exist)
    + issuer: the PKI role to issue from (``gpunode.clients.pki.Issuer``)
    + names: DNS names (the first is the CN); ips: IP SANs; ttl_s: lifetime in seconds
    + user, group, mode: the file's owner and mode (set before any byte is written)

    .. code:: python

        certificate(
            name="Gateway certificate", path="/etc/haproxy/gpunode/tls/gateway.pem",
            issuer=Issuer(session_for(config.vault), "pki", "gpunode-gateway"),
            names=["gpu-01.example.com"], ips=["192.0.2.11"], ttl_s=259200,
            user="haproxy", group="haproxy", mode="0600",
        )
    """
    want = _mode(mode)
    pem = host.get_fact(Certificate, path=path)
    try:
        current = parse_certificate(pem) if pem else None
    except ValueError:
        current = None
    ca_pem = issuer.ca_pem()
    seal.note_pki_ca(issuer.mount, issuer.role, ca_pem)
    reason = renewal_reason(
        current,
        names=names,
        ips=ips,
        ttl_s=ttl_s,
        ca_pem=ca_pem,
        current_pem=pem,
        now=datetime.now(UTC),
    )
    if reason is None and current is not None:
        seal.note_expiry(renewal_time(current).timestamp())  # the plan changes by itself then
    if reason is None:
        state = host.get_fact(PrivateFileState, path=path)
        if state is not None and state.get("type") == "file":
            yield from _owner_and_mode(path, state, user, group, want)
            return
        reason = "not a regular file"
    host.log(f"certificate {path}: {reason}: a new one is issued")
    args = (path, issuer, names, ips, ttl_s, user, group, want)
    yield FunctionCommand(_issue_and_write, args, {})


def _issue_and_write(
    state: Any,
    host: Any,
    path: str,
    issuer: Issuer,
    names: list[str],
    ips: list[str],
    ttl_s: int,
    user: str,
    group: str,
    mode: str,
) -> bool:
    """At execution: issue, then write through the private-file path. A Vault refusal
    fails the operation with Vault's message (it names no secret)."""
    try:
        issued = issuer.issue(names, ips, ttl_s)
    except VaultError as exc:
        host.log_styled(f"certificate {path}: {exc}", fg="red", log_func=logger.error)
        return False
    content = MaskedBytes(f"certificate {issued.serial}", issued.bundle())
    if not _write(state, host, path, content, user, group, mode):
        return False
    try:  # the seal written at the end of this run expires when this one is due
        seal.note_expiry(renewal_time(parse_certificate(issued.certificate)).timestamp())
    except ValueError:
        seal.note_expiry(0)
    return True
