"""What each deploy put on a node, for /etc/gpunode/provenance.json.

Roles call :func:`record` while the deploy runs (per host, never with secret
values: versions, digests and names only); the provenance role writes what was
recorded for the host at the end of the deploy.

.. code:: python

    from gpunode.provenance import record
    record("nvidia", {"branch": "580", "version": "580.95.05"})
"""

from __future__ import annotations

import datetime
import functools
import json
import subprocess
import time
from pathlib import Path
from typing import Any

from pyinfra import host

from gpunode import __version__

_RECORDS: dict[str, dict[str, Any]] = {}


def record(section: str, values: dict[str, Any]) -> None:
    """Record ``values`` under ``section`` for the host the deploy is running on."""
    _RECORDS.setdefault(host.name, {}).setdefault(section, {}).update(values)


def recorded(host_name: str) -> dict[str, Any]:
    """Everything recorded for one host so far (a copy)."""
    return {k: dict(v) for k, v in _RECORDS.get(host_name, {}).items()}


# --- the record on the node ---------------------------------------------------------

PATH = "/etc/gpunode/provenance.json"
# Fields that change on every deploy; a record whose other fields are unchanged is
# not rewritten, so a converged host reports no change.
VOLATILE = ("deployed_at",)
SOURCE_STAMP = ".gpunode-source.json"


@functools.cache
def repository_state(repo: str) -> dict[str, Any]:
    """The deploy repository's commit and whether its tree has uncommitted changes
    (read once per run, on the machine that runs the deploy)."""

    def git(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["git", "-C", repo, *args], capture_output=True, text=True, check=False
        )

    try:
        head = git("rev-parse", "HEAD")
    except OSError:  # no git on this machine
        head = subprocess.CompletedProcess([], 1)
    if head.returncode != 0:
        # a copy made by `git archive` (a controller's, roles/controller.py) carries its
        # commit in a stamp file
        stamp = Path(repo) / SOURCE_STAMP
        if stamp.is_file():
            doc = json.loads(stamp.read_text())
            return {"commit": doc.get("commit"), "dirty": doc.get("dirty")}
        return {"commit": None, "dirty": None}
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": head.stdout.strip(), "dirty": bool(status.stdout.strip())}


def document(host_name: str, repo: str, now: float | None = None) -> dict[str, Any]:
    """The provenance record for one host: the deploy source, gpunode's version and
    what the roles recorded (versions, digests, secret versions; never values)."""
    stamp = datetime.datetime.fromtimestamp(
        time.time() if now is None else now, tz=datetime.UTC
    ).strftime("%Y-%m-%dT%H:%M:%SZ")
    return {
        "gpunode_version": __version__,
        "repository": repository_state(repo),
        "recorded": recorded(host_name),
        "deployed_at": stamp,
    }


def stable(doc: dict[str, Any]) -> dict[str, Any]:
    """The record less what changes on every deploy."""
    return {k: v for k, v in doc.items() if k not in VOLATILE}


def content(doc: dict[str, Any]) -> dict[str, Any]:
    """The record less the deploy source (commit, dirty): what is on the host."""
    return {k: v for k, v in stable(doc).items() if k != "repository"}


def render(doc: dict[str, Any]) -> str:
    return json.dumps(doc, indent=2, sort_keys=True) + "\n"


def parse(lines: list[str] | None) -> dict[str, Any] | None:
    """A record read back from a node (the FileContents fact); None when absent or broken."""
    if not lines:
        return None
    try:
        doc = json.loads("\n".join(lines))
    except ValueError:
        return None
    return doc if isinstance(doc, dict) else None
