"""``gpunode drift``: which operations of a deploy would change, per host.

A drift check is a pyinfra dry run through gpunode.commands.run: the inventory file is
loaded the way the CLI loads it, the deploy file is executed for every
connected host (facts are read, nothing is changed), and each operation whose
``will_change`` is set is drift. ``--apply`` executes the prepared run (the real
deploy) and then checks again from scratch.

Operations that run only ``_if`` another one changed (handlers: restart after a
config change) are not drift of their own: the operation they follow is reported.
Only operation *names* are reported, never their arguments: names carry no data
values (a gpunode rule), arguments may.

Per-host names come from each host's own operation data, not from the change
table shared by all hosts: pyinfra hashes API-mode operations by their position
per host (and CLI-mode ones by code line), so hosts whose operation lists
differ share a table entry whose name set is the union of theirs.

Exit status: 0 no drift (or, with ``--apply``, all of it corrected), 2 drift
(left after ``--apply``), 1 an error on any host (unreachable, a failed fact or
operation); the other hosts are still checked and reported.

.. code:: python

    from gpunode.commands.drift import check
    report = check("inventories/prod.py", "deploys/gpu_node.py")
    report.exit_code  # 0, 1 or 2
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pyinfra import host as current_host

from gpunode.clients.vault import VaultError, rotate_secret_id
from gpunode.commands import run
from gpunode.commands.run import RunError, load_inventory
from gpunode.facts.seal import SEAL_SWITCH, SealVerdict, proven

__all__ = ["DriftError", "Report", "check", "load_inventory", "main"]

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_DRIFT = 2

# node_exporter's textfile collector reads *.prom files from here (roles/monitoring.py
# creates it and points the collector at it).
TEXTFILE_DIR = "/var/lib/gpunode/textfile"
TEXTFILE_NAME = "gpunode_drift.prom"


@dataclass
class HostDrift:
    """One host's result: ``drifted`` are the operations the check found changing."""

    name: str
    checked: int = 0  # operations planned for the host
    drifted: list[str] = field(default_factory=list)
    corrected: list[str] = field(default_factory=list)  # --apply: executed with a change
    remaining: list[str] = field(default_factory=list)  # --apply: still drifting afterwards
    applied: bool = False  # --apply ran the deploy on this host
    error: str | None = None
    sealed: bool = False  # proven by the node's seal in one command: nothing was planned
    seal: str = ""  # why the seal did not prove it (the full plan ran), or "" when it did
    seal_renewed: bool = False  # --apply rewrote an out-of-date seal (no drift otherwise)

    @property
    def status(self) -> str:
        if self.error:
            return "error"
        if self.applied:
            if self.remaining:
                return "drift"
            return "corrected" if self.drifted else "ok"
        return "drift" if self.drifted else "ok"

    def lines(self) -> list[str]:
        if self.error:
            return [f"{self.name}: error: {self.error}"]
        if self.status == "ok" and self.sealed:
            return [f"{self.name}: no drift (sealed: {self.checked} checks in one command)"]
        if self.status == "ok":
            renewed = "; seal renewed" if self.seal_renewed else ""
            return [f"{self.name}: no drift ({self.checked} operations checked{renewed})"]
        late = self.changed_after_check
        also = [f"  - {n} (drifted after the check; corrected too)" for n in late]
        if self.status == "corrected":
            count = len(self.drifted) + len(late)
            head = f"{self.name}: drift corrected: {count} operation(s), none left"
            return [head, *(f"  - {n}" for n in self.drifted), *also]
        shown = self.remaining or self.drifted
        head = f"{self.name}: drift: {len(shown)} operation(s) would change"
        return [head, *(f"  - {n}" for n in shown), *(also if self.applied else [])]

    @property
    def changed_after_check(self) -> list[str]:
        """Operations the correction changed although the check found them unchanged: an
        operation reads its facts again when it executes, so drift that appeared between
        the check and the correction (a service stopped meanwhile) is corrected too, and
        reported here rather than left out of the report."""
        left = list(self.drifted)
        late = []
        for name in self.corrected:  # names repeat (one per item): match them one by one
            if name in left:
                left.remove(name)
            else:
                late.append(name)
        return late


@dataclass
class Report:
    inventory: str
    deploy: str
    apply: bool
    started_at: float
    duration_s: float = 0.0
    hosts: dict[str, HostDrift] = field(default_factory=dict)
    credentials: list[str] = field(default_factory=list)  # what the credential step did

    @property
    def exit_code(self) -> int:
        if any(h.error for h in self.hosts.values()):
            return EXIT_ERROR
        if any(h.status == "drift" for h in self.hosts.values()):
            return EXIT_DRIFT
        return EXIT_OK

    def to_json(self) -> dict[str, Any]:
        return {
            "inventory": self.inventory,
            "deploy": self.deploy,
            "apply": self.apply,
            "started_at": self.started_at,
            "duration_s": round(self.duration_s, 3),
            "exit_code": self.exit_code,
            "credentials": self.credentials,
            "hosts": {name: {**asdict(h), "status": h.status} for name, h in self.hosts.items()},
        }

    def prometheus(self) -> str:
        """The report in Prometheus' text format, for node_exporter's textfile collector."""
        out = [
            "# HELP gpunode_drift_operations Operations of the deploy that the last drift "
            "check found changing (before any correction).",
            "# TYPE gpunode_drift_operations gauge",
        ]
        for name, h in self.hosts.items():
            if not h.error:
                out.append(f'gpunode_drift_operations{{host="{_label(name)}"}} {len(h.drifted)}')
        out += [
            "# HELP gpunode_drift_remaining_operations Operations still drifting after the run "
            "(after the correction with --apply).",
            "# TYPE gpunode_drift_remaining_operations gauge",
        ]
        for name, h in self.hosts.items():
            if not h.error:
                left = len(h.remaining) if self.apply else len(h.drifted)
                out.append(f'gpunode_drift_remaining_operations{{host="{_label(name)}"}} {left}')
        out += [
            "# HELP gpunode_drift_host_ok 1 when the host was checked without error.",
            "# TYPE gpunode_drift_host_ok gauge",
            *(
                f'gpunode_drift_host_ok{{host="{_label(n)}"}} {0 if h.error else 1}'
                for n, h in self.hosts.items()
            ),
            "# HELP gpunode_drift_last_run_timestamp_seconds When the last drift run started.",
            "# TYPE gpunode_drift_last_run_timestamp_seconds gauge",
            f"gpunode_drift_last_run_timestamp_seconds {self.started_at:.3f}",
            "# HELP gpunode_drift_last_run_duration_seconds How long the last drift run took.",
            "# TYPE gpunode_drift_last_run_duration_seconds gauge",
            f"gpunode_drift_last_run_duration_seconds {self.duration_s:.3f}",
            "# HELP gpunode_drift_success 1 when the last drift run finished without error "
            "(drift found is not an error).",
            "# TYPE gpunode_drift_success gauge",
            f"gpunode_drift_success {0 if self.exit_code == EXIT_ERROR else 1}",
        ]
        return "\n".join(out) + "\n"

    def lines(self) -> list[str]:
        out = [*self.credentials, *(line for h in self.hosts.values() for line in h.lines())]
        counts = {s: sum(h.status == s for h in self.hosts.values()) for s in _STATUSES}
        summary = ", ".join(f"{counts[s]} {s}" for s in _STATUSES if counts[s])
        out.append(f"drift: {len(self.hosts)} host(s): {summary or 'none'}")
        return out


_STATUSES = ("ok", "corrected", "drift", "error")


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class DriftError(RunError):
    """Bad input for a drift run (unknown file, host or group)."""


# --- one run ------------------------------------------------------------------------


def check(
    inventory_path: str,
    deploy_path: str,
    limit: Iterable[str] | None = None,
    apply: bool = False,
    shard: tuple[int, int] | None = None,
    use_seal: bool = True,
) -> Report:
    """Check (and with ``apply`` correct, then check again) every host of the inventory
    (of ``shard`` (I, N): the hosts :func:`in_shard` gives it). A host whose seal proves it
    converged (gpunode/seal.py) is not planned; ``use_seal=False`` plans every host."""
    deploy = Path(deploy_path)
    if not deploy.is_file():
        raise DriftError(f"{deploy_path}: no such deploy file")
    started = time.time()
    report = Report(inventory=inventory_path, deploy=deploy_path, apply=apply, started_at=started)
    limit = list(limit or [])
    inventory = load_inventory(inventory_path, limit)
    if shard is not None:
        names = [h.name for h in inventory if in_shard(h.name, *shard)]
        if not names:
            return report  # an empty shard: nothing to check is no drift
        inventory = load_inventory(inventory_path, names)
    for host in inventory:
        report.hosts[host.name] = HostDrift(name=host.name)
    report.credentials = rotate_credentials(inventory)

    errors: dict[str, str] = {}
    names = list(report.hosts)
    if use_seal:
        for name, verdict in seal_verdicts(inventory).items():
            if verdict.proven:
                report.hosts[name].sealed = True
                report.hosts[name].checked = verdict.entries
            else:
                report.hosts[name].seal = verdict.reason
        names = [n for n, h in report.hosts.items() if not h.sealed]
        if not names:
            report.duration_s = time.time() - started
            return report
        inventory = load_inventory(inventory_path, names)

    with _full_plans(), run.prepare(inventory, deploy) as planned:  # a dry run
        stale: list[str] = []
        for name, result in planned.results().items():
            report.hosts[name].checked = result.planned
            report.hosts[name].drifted = [c for c in result.changes if not bookkeeping(c)]
            if SEAL_OP in result.changes and name not in planned.errors:
                stale.append(name)
        errors.update(planned.errors)
        drifted = [n for n in names if report.hosts[n].drifted and n not in errors]
        if apply and (drifted or stale):
            # the deploy runs where it drifted, and where only the seal is out of date
            # (renewed: the next check of that host costs one command again)
            for name, result in planned.execute().items():
                if result.ran:
                    report.hosts[name].corrected = [
                        c for c in result.executed if not bookkeeping(c)
                    ]
                    report.hosts[name].applied = name in drifted
                    report.hosts[name].seal_renewed = name in stale and SEAL_OP in result.executed
            errors.update(planned.errors)

    if apply and drifted:
        again_names = [n for n in drifted if n not in errors]
        if again_names:
            with _full_plans():
                again = run.run(load_inventory(inventory_path, again_names), deploy)
            for name, result in again.items():
                report.hosts[name].remaining = [c for c in result.changes if not bookkeeping(c)]
                if result.error:
                    errors.setdefault(name, f"re-check: {result.error}")

    for name, message in errors.items():
        report.hosts[name].error = message
    report.duration_s = time.time() - started
    return report


@contextmanager
def _full_plans() -> Iterator[None]:
    """While drift plans: the deploy file plans every host itself (its own seal shortcut,
    deploys/gpu_node.py, off: these hosts' seals were read already, or --full)."""
    before = os.environ.get(SEAL_SWITCH)
    os.environ[SEAL_SWITCH] = "0"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(SEAL_SWITCH, None)
        else:
            os.environ[SEAL_SWITCH] = before


def in_shard(host_name: str, index: int, count: int) -> bool:
    """Whether ``host_name`` belongs to shard ``index`` of ``count`` (0 <= index < count):
    by SHA-256 of the name, so the split is stable and needs no coordination."""
    return int.from_bytes(hashlib.sha256(host_name.encode()).digest()[:8], "big") % count == index


def parse_shard(text: str) -> tuple[int, int]:
    """``I/N`` -> (I, N); a clear error for anything else."""
    left, sep, right = text.partition("/")
    digits = all(part.isascii() and part.isdigit() for part in (left, right))
    if sep and digits and 0 < int(right) <= 100000:
        if int(left) < int(right):
            return int(left), int(right)
    raise DriftError(
        f"--shard {text}: not a shard (allowed: I/N with 0 <= I < N <= 100000, e.g. 0/4)"
    )


# --- the seal ----------------------------------------------------------------------


SEAL_OP = "gpunode seal | Drift seal"  # its change is bookkeeping, never drift
# AIDE taking a run's changes in: it follows any other change, bookkeeping too (named with
# the deploys around it: "gpunode seal | gpunode file integrity | ..." in gpu_node.py)
INTEGRITY_OP = "gpunode file integrity | File integrity database: this deploy's changes"


def bookkeeping(op: str) -> bool:
    """The seal's and AIDE's operations: they follow any change, and are never drift."""
    return op == SEAL_OP or op == INTEGRITY_OP or op.endswith(f" | {INTEGRITY_OP}")


def seal_verdicts(inventory: Any) -> dict[str, SealVerdict]:
    """Each host's seal, read in one command per host (all hosts at once) and judged on
    the controller (:func:`judge`). A host that cannot be reached gets no verdict: the
    full plan reports its error."""
    verdicts: dict[str, SealVerdict] = {}

    def read_seal() -> None:
        verdicts[current_host.name] = proven(current_host)

    with run.prepare(inventory, read_seal, detect_changes=False):
        pass
    return verdicts


def rotate_credentials(inventory: Iterable[Any]) -> list[str]:
    """The credential step, before anything is planned: for each Vault config of the hosts
    with ``vault.rotate_secret_id``, once, the secret_id in its file is replaced by a new one
    and the old one destroyed (gpunode.clients.vault.rotate_secret_id); the run then logs in
    with the new one. A refused secret_id stops the run here, before any host is touched."""
    configs: dict[str, Any] = {}
    for host in inventory:
        vault = getattr(host.data.get("gpunode"), "vault", None)
        if vault is not None and vault.rotate_secret_id:
            configs.setdefault(vault.model_dump_json(), vault)
    done = []
    for vault in configs.values():
        try:
            rotation = rotate_secret_id(vault)
        except VaultError as exc:
            raise DriftError(f"credential step: {exc}") from None
        life = (
            f"the new one lives {rotation.ttl} s unless the next run replaces it"
            if rotation.ttl
            else "the role gives the new one no TTL: set secret_id_ttl (docs/controller.md)"
        )
        done.append(
            f"vault: the secret_id in {rotation.path} (AppRole role {rotation.role}) was "
            f"replaced and the old one destroyed; {life}"
        )
    return done


# --- output -------------------------------------------------------------------------


def write_atomically(path: str | Path, text: str, mode: int = 0o644) -> None:
    """Write via a temporary file and rename: node_exporter never reads half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as stream:
            stream.write(text)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def main(
    inventory: str,
    deploy: str,
    limit: list[str] | None = None,
    apply: bool = False,
    json_path: str | None = None,
    prometheus_path: str | None = None,
    shard: str | None = None,
    use_seal: bool = True,
) -> int:
    started = time.time()
    try:
        report = check(
            inventory,
            deploy,
            limit=limit,
            apply=apply,
            shard=parse_shard(shard) if shard else None,
            use_seal=use_seal,
        )
    except RunError as exc:  # a DriftError, or bad input found by run.py
        print(f"gpunode drift: {exc}", file=sys.stderr)
        report = Report(inventory=inventory, deploy=deploy, apply=apply, started_at=started)
        report.hosts["-"] = HostDrift(name="-", error=str(exc))
        _write_outputs(report, json_path, prometheus_path)
        return EXIT_ERROR
    print("\n".join(report.lines()))
    _write_outputs(report, json_path, prometheus_path)
    return report.exit_code


def _write_outputs(report: Report, json_path: str | None, prometheus_path: str | None) -> None:
    if json_path:
        write_atomically(json_path, json.dumps(report.to_json(), indent=2) + "\n")
    if prometheus_path:
        write_atomically(prometheus_path, report.prometheus())
