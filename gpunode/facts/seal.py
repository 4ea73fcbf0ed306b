"""Seal facts: what the drift seal on a node says, and what the seal keeps for each fact a
deploy read (gpunode/seal.py explains the seal; gpunode/sealcheck.py runs on the node)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from pyinfra.api import FactBase
from pyinfra.facts import deb, files, rpm, server, systemd

from gpunode.facts.files import FileDigest, PrivateFileState
from gpunode.facts.gateway import Certificate
from gpunode.facts.nvidia import GpuProbe
from gpunode.pipeline import FactRead
from gpunode.probe import FACT_COMMAND, PROBE_PATH
from gpunode.seal import SCRIPT_PATH as SCRIPT


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
            f'then python3 {SCRIPT} check; else echo \'{{"seal": "no-checker"}}\'; fi'
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
# SystemdStatus/SystemdEnabled of every unit ('*'): the loaded units change with every
# login (session scopes); the installed unit files and their states decide what gpunode
# reads them for (is a conflicting firewall there)
UNIT_FILES = "systemctl list-unit-files --no-legend --no-pager --plain | LC_ALL=C sort"
# the GPU probe's report changes with temperatures and memory use; a plan only asks
# whether the node has no GPU (gpunode.gpus.sees_no_gpu): its exit code and the PCI bus
GPU_PRESENCE = (
    f"( {FACT_COMMAND.format(probe=PROBE_PATH)} ) | "
    "sed -n -e 's/^gpunode-probe-exit=2$/no-gpu/p' "
    "-e '/^gpunode-probe-exit=not-installed$/p' -e '/^pci-gpu=/p'"
)

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
    """What the seal keeps for these fact reads (``("path", p)`` or ``("sh", command)``),
    each once, in order; None when one of them cannot be sealed."""
    out: dict[tuple[str, str], None] = {}
    for read in reads:
        if not read.batchable:
            return None
        if read.fact is SealCheck:
            continue  # the seal's own check: what it says changes with every seal
        if issubclass(read.fact, PATH_FACTS) and isinstance(read.argument("path"), str):
            out[("path", read.argument("path"))] = None
        elif read.fact in WHOLE_FILES:
            out.update(dict.fromkeys(("path", p) for p in WHOLE_FILES[read.fact]))
        elif read.fact in COMMANDS:
            out[("sh", COMMANDS[read.fact])] = None
        elif read.fact in (systemd.SystemdStatus, systemd.SystemdEnabled) and not read.argument(
            "services"
        ):
            out[("sh", UNIT_FILES)] = None
        elif read.fact is GpuProbe:
            out[("sh", GPU_PRESENCE)] = None
        else:
            out[("sh", read.command)] = None
    return list(out)
