"""The drift seal: a converged node proves it is still converged in one command.

At the end of ``deploys/gpu_node.py`` the seal role writes /var/lib/gpunode/seal.json on the
node (gpunode/sealcheck.py, run there). It holds:

* ``inputs``: a digest of everything on the controller that decides the plan apart from
  the node's state: gpunode's code, roles, deploy and templates (:func:`code_digest`), the
  versions of pyinfra and nvidia-ml-py, the host's inventory data and the content of the
  controller's files that data names for upload (the remote logs' CA) (:func:`input_digest`);
* ``extra``: inputs read from Vault, checked again by the controller: the version of
  each unpinned KV secret the deploy read, the digest of the PKI CA that issued the
  gateway's certificate, and ``expires``, the time a plan would start to differ by itself
  (the certificate's renewal time);
* one digest per *entry*: what each fact the deploy read saw, as the node is now
  (gpunode.facts.seal.entries). Files are sealed by path (type, mode, owner, content), packages by
  the whole ``dpkg-query`` list, everything else by the fact's own command's output.

A plan is a function of the inputs and the facts. So when the inputs are the same, the
Vault versions and CA are the same, ``expires`` is in the future and no entry differs,
the plan is the one that was converged: no drift, in one command (``gpunode-seal
check``). Anything else (no seal, another digest, an entry that differs) sends the host
to the full plan, so a report is never less exact than without the seal.
tests/lab/test_seal.py proves it: every kind of drift the full plan sees, the seal sees.

Where a fact cannot be sealed (read as another user, or with a masked argument), the
role removes the seal: that host always gets the full plan.

.. code:: python

    from gpunode import seal
    seal.input_digest(host)  # on the controller, without contacting the host
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
from pathlib import Path
from typing import Any

from pyinfra.api.host import Host
from pyinfra.context import ctx_host

from gpunode.gpus import pynvml_source
from gpunode.paths import REPO_ROOT

SEAL_PATH = "/var/lib/gpunode/seal.json"
SCRIPT_PATH = "/usr/local/sbin/gpunode-seal"  # beside gpunode-probe
SCRIPT_SOURCE = Path(__file__).with_name("sealcheck.py")
SPEC_PATH = "/var/lib/gpunode/.seal-spec.json"
# what of the repository decides a plan (tests, docs and benchmarks do not)
CODE_DIRS = ("gpunode", "roles", "deploys", "templates", "locks", "monitoring")


def entry_id(kind: str, arg: str) -> str:
    """The short id ``gpunode-seal check`` gives a sealed entry (sealcheck.entry_id)."""
    return hashlib.sha256(f"{kind}\0{arg}".encode()).hexdigest()[:16]


# --- inputs on the controller ----------------------------------------------------------


@functools.cache
def code_digest(root: Path = REPO_ROOT) -> str:
    """SHA-256 over every file of the repository that decides a plan (CODE_DIRS), by path
    and content; read once per process."""
    digest = hashlib.sha256()
    for top in CODE_DIRS:
        base = root / top
        if not base.is_dir():
            continue
        for path in sorted(base.rglob("*")):
            if path.is_dir() or "__pycache__" in path.parts or path.suffix == ".pyc":
                continue
            rel = path.relative_to(root).as_posix()
            digest.update(rel.encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


@functools.cache
def _dependencies() -> dict[str, str]:
    out = {}
    for name in ("pyinfra", "nvidia-ml-py"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "-"
    try:
        out["pynvml.py"] = hashlib.sha256(pynvml_source().read_bytes()).hexdigest()
    except (OSError, RuntimeError, ValueError):
        out["pynvml.py"] = "-"
    return out


def _plain(value: Any) -> Any:
    """Inventory data as JSON, the same in every process (no addresses, sorted sets)."""
    if hasattr(value, "model_dump"):
        return _plain(value.model_dump(mode="json"))
    if isinstance(value, dict):
        return {
            str(k): _plain(v)
            for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))
            if "password" not in str(k).lower()  # never part of a digest kept on a node
        }
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, set | frozenset):
        return sorted((_plain(v) for v in value), key=repr)
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    kind = f"{type(value).__module__}.{type(value).__qualname__}"
    text = str(value)  # a Path, an address: its text; an object's default repr: its type
    return f"<{kind}>" if " at 0x" in text else f"<{kind}>{text}"


def controller_files(host: Host) -> dict[str, str]:
    """The files on the controller whose content a deploy uploads to ``host`` although the
    inventory names only their path (``hardening.remote_logs.ca_file``): path -> sha256 of
    the content, "-" when unreadable (the deploy then stops with the reason). A new CA in
    the same file is a new plan."""
    config = host.data.get("gpunode")
    logs = getattr(getattr(config, "hardening", None), "remote_logs", None)
    if logs is None:
        return {}
    try:
        content = Path(logs.ca_file).expanduser().read_bytes()
    except OSError:
        return {logs.ca_file: "-"}
    return {logs.ca_file: hashlib.sha256(content).hexdigest()}


# Host data a run sets, not the inventory: where uploads are staged (the login's TMPDIR,
# gpunode.operations.server.stage_uploads_as_login), which the first deploy changes by
# installing pam_tmpdir and which decides no operation's change.
RUN_DATA = frozenset({"_temp_dir"})


def input_digest(host: Host) -> str:
    """The digest of what decides this host's plan on the controller: code, dependencies,
    the host's name, inventory data and the controller files it names for upload."""
    doc = {
        "code": code_digest(),
        "dependencies": _dependencies(),
        "host": host.name,
        "data": _plain({k: v for k, v in host.data.dict().items() if k not in RUN_DATA}),
        "files": controller_files(host),
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


# --- inputs read from Vault while a deploy plans (per host) ------------------------------


def _extra(host: Host | None = None) -> dict[str, Any] | None:
    """This run's noted inputs of ``host`` (default: the host being deployed, if any)."""
    if host is None:
        if not ctx_host.isset():
            return None
        host = ctx_host.get()
    extra: dict[str, Any] | None = getattr(host, "_gpunode_seal_extra", None)
    if extra is None:
        extra = {"vault": {}, "pki": {}, "expires": None}
        host._gpunode_seal_extra = extra  # type: ignore[union-attr]
    return extra


def note_vault(mount: str, path: str, version: int, pinned: bool) -> None:
    """A KV v2 secret the deploy read for the current host: an unpinned one is checked
    again by its latest version (gpunode.clients.vault.Session.read calls this)."""
    extra = _extra()
    if extra is not None and not pinned:
        extra["vault"][f"{mount}\0{path}"] = version


def note_pki_ca(mount: str, role: str, ca_pem: str) -> None:
    """The CA a PKI role issues from, as the deploy compared the current host's
    certificate with it."""
    extra = _extra()
    if extra is not None:
        extra["pki"][f"{mount}\0{role}"] = hashlib.sha256(ca_pem.encode()).hexdigest()


def note_expiry(timestamp: float) -> None:
    """From this time on the current host's plan would differ by itself (a certificate
    to renew)."""
    extra = _extra()
    if extra is not None:
        current = extra["expires"]
        extra["expires"] = int(timestamp) if current is None else min(current, int(timestamp))


def extra_inputs(host: Host) -> dict[str, Any]:
    """What :func:`note_vault`, :func:`note_pki_ca` and :func:`note_expiry` noted, as the
    seal keeps it (lists sorted, JSON-ready)."""
    extra = _extra(host) or {}
    return {
        "vault": sorted([*k.split("\0"), v] for k, v in extra["vault"].items()),
        "pki": sorted([*k.split("\0"), v] for k, v in extra["pki"].items()),
        "expires": extra["expires"],
    }


def spec(host: Host, sealed: list[tuple[str, str]]) -> str:
    """The SPEC ``gpunode-seal record`` reads (see gpunode/sealcheck.py)."""
    return json.dumps(
        {
            "inputs": input_digest(host),
            "extra": extra_inputs(host),
            "entries": [list(e) for e in sealed],
        },
        sort_keys=True,
    )
