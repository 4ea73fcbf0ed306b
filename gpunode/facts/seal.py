"""Seal facts: what the drift seal on a node says, and what the seal keeps for each fact a
deploy read (gpunode/seal.py explains the seal; gpunode/sealcheck.py runs on the node)."""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import gevent
from gevent.event import AsyncResult
from pyinfra.api import FactBase
from pyinfra.api.host import Host
from pyinfra.context import ctx_host
from pyinfra.facts import deb, files, rpm, server, systemd

from gpunode import pipeline, seal
from gpunode.clients.pki import Issuer
from gpunode.clients.vault import VaultError, session_for
from gpunode.facts.files import FileDigest, PrivateFileState
from gpunode.facts.gateway import Certificate
from gpunode.facts.nvidia import GpuProbe
from gpunode.inventory import node_config
from gpunode.pipeline import FactRead
from gpunode.probe import FACT_COMMAND, PROBE_PATH
from gpunode.schema.vault import Secret
from gpunode.seal import SCRIPT_PATH as SCRIPT

SEAL_SWITCH = "GPUNODE_SEAL"  # "0": every deploy and drift check plans every host


class SealCheck(FactBase):
    """
    ``gpunode-seal check`` on the node: the seal's input digest and Vault inputs, a short id
    per sealed entry and which entries differ now; ``{"seal": "missing"}`` without a seal,
    ``{"seal": "no-checker"}`` before the checker (or python3) is installed. No digest of
    an entry is ever printed, so ``-vvv`` shows nothing derived from a private file.

    .. code:: python

        {"seal": "ok", "inputs": "9f2c...", "extra": {"vault": [], "pki": [], "expires": None},
         "ids": ["3b1f0c2a9d8e7f60", ...], "differs": ["path /etc/gpunode/x.conf"]}
    """

    def command(self) -> str:
        return (
            f"if [ -r {SCRIPT} ] && command -v python3 >/dev/null 2>&1; "
            f'then python3 -I -S {SCRIPT} check; else echo \'{{"seal": "no-checker"}}\'; fi'
        )

    def process(self, output: list[str]) -> dict[str, Any]:
        try:
            doc = json.loads("\n".join(output))
        except ValueError:
            return {"seal": "unreadable"}
        if not isinstance(doc, dict) or not isinstance(doc.get("seal"), str):
            return {"seal": "unreadable"}
        return doc


# Facts that are sealed otherwise than by their own command's output.
DPKG_LIST = "dpkg-query -W -f='${Package} ${Version} ${db:Status-Abbrev}\\n' | LC_ALL=C sort"
RPM_LIST = "rpm -qa --qf '%{NAME} %{EPOCHNUM}:%{VERSION}-%{RELEASE}.%{ARCH}\\n' | LC_ALL=C sort"
# SystemdStatus of every unit ('*'): the loaded units change with every login (session
# scopes, user@UID.service); what gpunode reads it for (is a conflicting firewall loaded) is
# decided by the loaded units that come from a unit file: their names, no states
UNIT_FILES = (
    "{ ls -1A /etc/systemd/system /run/systemd/system /lib/systemd/system "
    "/usr/lib/systemd/system 2>/dev/null; echo //; "
    "systemctl list-units --all --plain --no-legend --full 2>/dev/null | awk '{print $1}'; } "
    "| awk '$0 == \"//\" {s = 1; next} !s {f[$0] = 1; next} ($0 in f)' | LC_ALL=C sort -u"
)
# the GPU probe's report changes with temperatures and memory use; a plan only asks
# whether the node has no GPU (gpunode.gpus.sees_no_gpu): its exit code and the PCI bus
GPU_PRESENCE = (
    f"( {FACT_COMMAND.format(probe=PROBE_PATH)} ) | "
    "sed -n -e 's/^gpunode-probe-exit=2$/no-gpu/p' "
    "-e '/^gpunode-probe-exit=not-installed$/p' -e '/^pci-gpu=/p'"
)

# SystemdStatus / SystemdEnabled of named units (pyinfra's systemd.service reads both for
# each unit it manages): each read's output is that unit's Id and SubState (or
# UnitFileState) from ``systemctl show --all``. The seal keeps a ``unit`` entry per unit, and
# the checker reads all of them with one ``systemctl show`` of the three properties (each
# unit's block holds every line either read prints): one command instead of two per unit.
UNIT_FACTS = (systemd.SystemdStatus, systemd.SystemdEnabled)


def _named_units(read: FactRead) -> list[str] | None:
    """The units a plain (system manager, this machine) SystemdStatus/SystemdEnabled read
    of named units asks about; None for any other read."""
    if read.fact not in UNIT_FACTS or any(
        read.argument(name) for name in ("user_mode", "machine", "user_name")
    ):
        return None
    services = read.argument("services")
    if isinstance(services, str):
        services = (services,)
    if not services or not all(
        isinstance(s, str) and s and all(" " < c < "\x7f" for c in s) for s in services
    ):
        return None  # an odd name: the read is sealed by its own command
    return list(services)


PATH_FACTS: tuple[type, ...] = (
    files.File,
    files.Directory,
    files.Link,
    files.Sha1File,
    files.Sha256File,
    files.Md5File,
    files.FileContents,
    server.AuthorizedKeys,
    FileDigest,
    PrivateFileState,
    Certificate,
)
WHOLE_FILES: dict[type, tuple[str, ...]] = {
    server.Users: ("/etc/passwd", "/etc/group"),
    server.Groups: ("/etc/group",),
}
COMMANDS: dict[type, str] = {
    deb.DebPackages: DPKG_LIST,
    rpm.RpmPackages: RPM_LIST,
}


def entries(reads: Iterable[FactRead]) -> list[tuple[str, str]] | None:
    """What the seal keeps for these fact reads (``("path", p)``, ``("unit", name)`` or
    ``("sh", command)``), each once, in order; None when one of them cannot be sealed."""
    out: dict[tuple[str, str], None] = {}
    for read in reads:
        if not read.batchable or read.elsewhere:
            return None
        if read.fact is SealCheck:
            continue  # the seal's own check: what it says changes with every seal
        if read.fact is server.TmpDir:
            # the login's temporary directory, where pyinfra stages uploads: it decides no
            # operation's change, and it is the session's (pam_tmpdir gives each login its
            # own TMPDIR, so the run that installs it would unseal the next one)
            continue
        if issubclass(read.fact, PATH_FACTS) and isinstance(read.argument("path"), str):
            out[("path", read.argument("path"))] = None
        elif read.fact in WHOLE_FILES:
            out.update(dict.fromkeys(("path", p) for p in WHOLE_FILES[read.fact]))
        elif read.fact in COMMANDS:
            out[("sh", COMMANDS[read.fact])] = None
        elif read.fact is systemd.SystemdStatus and not read.argument("services"):
            out[("sh", UNIT_FILES)] = None
        elif (named := _named_units(read)) is not None:
            out.update(dict.fromkeys(("unit", unit) for unit in named))
        elif read.fact is GpuProbe:
            out[("sh", GPU_PRESENCE)] = None
        else:
            out[("sh", read.command)] = None
    return list(out)


# --- does the seal prove the node converged (on the controller) -------------------------


@dataclass
class SealVerdict:
    """A seal's verdict on a host: ``proven`` (nothing to plan), else ``reason``."""

    proven: bool
    reason: str = ""
    entries: int = 0


def proven(host: Host) -> SealVerdict:
    """Read the host's seal in one command and judge it; never proven with
    ``GPUNODE_SEAL=0``. The first call of a run reads every connected host's seal side by
    side (pyinfra's CLI plans one host after another), outside fact pipelining (one fact,
    not the deploy's whole wishlist)."""
    if os.environ.get(SEAL_SWITCH, "1") == "0":
        return SealVerdict(False, f"{SEAL_SWITCH}=0")
    seals: dict[str, AsyncResult] | None = getattr(host.state, "_gpunode_seals", None)
    if seals is None:
        seals = {h.name: AsyncResult() for h in host.state.activated_hosts}
        host.state._gpunode_seals = seals  # type: ignore[attr-defined]
        gevent.joinall(
            [gevent.spawn(_read_seal, h, seals[h.name]) for h in host.state.activated_hosts]
        )
    result = seals.get(host.name)
    if result is None:  # connected after the others were read
        result = AsyncResult()
        _read_seal(host, result)
    now = result.get()
    try:
        return judge(host, now)
    except (VaultError, ValueError) as exc:
        return SealVerdict(False, f"inputs could not be checked: {exc}")


def _read_seal(host: Host, result: AsyncResult) -> None:
    try:
        with ctx_host.use(host), pipeline.direct(host):
            result.set(host.get_fact(SealCheck))
    except Exception as exc:  # noqa: BLE001 - an unreadable seal is "not proven", never an error
        result.set({"seal": "unreadable", "error": type(exc).__name__})


def judge(host: Any, now: dict[str, Any]) -> SealVerdict:
    """Whether the seal ``now`` (the SealCheck fact) proves ``host`` converged: same inputs,
    same Vault inputs, not expired, no entry different."""
    if now.get("seal") != "ok":
        return SealVerdict(False, f"seal {now.get('seal', 'unreadable')}")
    if now.get("inputs") != seal.input_digest(host):
        return SealVerdict(False, "the code or the host's inventory data changed")
    extra = now.get("extra") or {}
    expires = extra.get("expires")
    if expires is not None and time.time() >= float(expires):
        return SealVerdict(False, "a certificate is due for renewal")
    if now.get("differs"):
        shown = ", ".join(now["differs"][:5])
        more = f" and {len(now['differs']) - 5} more" if len(now["differs"]) > 5 else ""
        return SealVerdict(False, f"differs: {shown}{more}")
    reason = vault_reason(host, extra)
    if reason:
        return SealVerdict(False, reason)
    return SealVerdict(True, entries=len(now.get("ids") or ()))


def vault_reason(host: Any, extra: dict[str, Any]) -> str:
    """Why the Vault inputs the seal noted differ now ('' when they do not): a newer
    version of an unpinned secret, another CA behind a PKI role."""
    vault_inputs, pki_inputs = extra.get("vault") or [], extra.get("pki") or []
    if not vault_inputs and not pki_inputs:
        return ""
    session = session_for(node_config(host).vault)
    for mount, path, version in vault_inputs:
        meta = session.metadata(path, Secret(mount=mount, path=path))
        if int(meta.get("current_version") or 0) != int(version):
            return f"a newer version of {mount}/{path} in Vault"
    for mount, role, digest in pki_inputs:
        ca = Issuer(session, mount, role).ca_pem()
        if hashlib.sha256(ca.encode()).hexdigest() != digest:
            return f"another CA behind {mount}/{role}"
    return ""
