"""``gpunode drift``: which operations of a deploy would change, per host.

A drift check is a pyinfra dry run through pyinfra's API: the inventory file is
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

import json
import os
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import gevent
import pyinfra
from pyinfra.api import BaseStateCallback, Config, State
from pyinfra.api.connect import connect_all, disconnect_all
from pyinfra.api.exceptions import PyinfraError
from pyinfra.api.host import Host
from pyinfra.api.inventory import Inventory
from pyinfra.api.operations import run_ops
from pyinfra.api.state import StateStage
from pyinfra.context import ctx_config, ctx_host, ctx_state

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
        if self.status == "ok":
            return [f"{self.name}: no drift ({self.checked} operations checked)"]
        if self.status == "corrected":
            head = f"{self.name}: drift corrected: {len(self.drifted)} operation(s), none left"
            return [head, *(f"  - {n}" for n in self.drifted)]
        shown = self.remaining or self.drifted
        head = f"{self.name}: drift: {len(shown)} operation(s) would change"
        return [head, *(f"  - {n}" for n in shown)]


@dataclass
class Report:
    inventory: str
    deploy: str
    apply: bool
    started_at: float
    duration_s: float = 0.0
    hosts: dict[str, HostDrift] = field(default_factory=dict)

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
        out = [line for h in self.hosts.values() for line in h.lines()]
        counts = {s: sum(h.status == s for h in self.hosts.values()) for s in _STATUSES}
        summary = ", ".join(f"{counts[s]} {s}" for s in _STATUSES if counts[s])
        out.append(f"drift: {len(self.hosts)} host(s): {summary or 'none'}")
        return out


_STATUSES = ("ok", "corrected", "drift", "error")


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class _Errors(BaseStateCallback):
    """Collects per-host connection and operation errors (pyinfra only logs them)."""

    def __init__(self) -> None:
        self.by_host: dict[str, str] = {}

    def host_connect_error(self, state: State, host: Host, error: Any) -> None:  # type: ignore[override]
        message = error.args[0] if getattr(error, "args", None) else str(error)
        self.by_host.setdefault(host.name, f"cannot connect: {message}")

    def operation_host_error(  # type: ignore[override]
        self, state: State, host: Host, op_hash: str, *args: Any, **kw: Any
    ) -> None:
        names = _host_op_names(state, host).get(op_hash, "?")
        self.by_host.setdefault(host.name, f"operation failed: {names}")


# --- loading ------------------------------------------------------------------------


def load_inventory(path: str, limit: Iterable[str] | None = None) -> Inventory:
    """An inventory file loaded the way ``pyinfra INVENTORY ...`` loads it, then limited
    to the named hosts and groups (a clear error for an unknown name)."""
    from pyinfra_cli.inventory import make_inventory

    if not Path(path).is_file():
        raise DriftError(f"{path}: no such inventory file")
    _add_repo_to_path(Path(path))
    try:
        with ctx_state.use(State()):  # the CLI's loader notes the file it runs on a state
            inventory = make_inventory(path)
    except SystemExit as exc:  # gpunode's config loader has printed the problems
        raise DriftError(f"{path}: invalid inventory (exit status {exc.code})") from None
    except Exception as exc:  # noqa: BLE001 - pyinfra wraps errors in the user's file
        cause = getattr(exc, "exception", exc)  # pyinfra_cli's UnexpectedExternalError
        raise DriftError(f"{path}: cannot load the inventory: {cause}") from None
    if not limit:
        return inventory
    keep: list[str] = []
    for item in limit:
        group = inventory.get_group(item, None)
        if group:
            keep += [h.name for h in group]
        elif inventory.get_host(item, None) is not None:
            keep.append(item)
        else:
            allowed = ", ".join([*(h.name for h in inventory), *inventory.groups])
            raise DriftError(f"--limit {item}: no such host or group (allowed: {allowed})")
    names = list(dict.fromkeys(keep))
    hosts = [(name, dict(inventory.get_host(name).data.dict())) for name in names]
    return Inventory((hosts, {}))


def _add_repo_to_path(path: Path) -> None:
    # Deploy files import roles/ like pyinfra's CLI lets them: from the working directory
    # and from the repository the file lives in.
    for candidate in (Path.cwd(), path.resolve().parent.parent):
        if str(candidate) not in sys.path:
            sys.path.insert(0, str(candidate))


def _exec_deploy(deploy: Path, code: Any) -> None:
    exec(code, {"__file__": str(deploy), "__name__": "__gpunode_deploy__"})  # noqa: S102


class DriftError(Exception):
    """Bad input for a drift run (unknown file, host or group)."""


# --- one run ------------------------------------------------------------------------


def _prepare(inventory: Inventory, deploy: Path) -> tuple[State, _Errors]:
    """Connect and plan the deploy on every host (a dry run); nothing changes on hosts."""
    if pyinfra.is_cli:
        raise DriftError("gpunode drift cannot run inside a pyinfra CLI run")
    errors = _Errors()
    config = Config(CONNECT_TIMEOUT=10)
    state = State(inventory, config)
    state.add_callback_handler(errors)
    state.set_stage(StateStage.Connect)
    try:
        connect_all(state)
    except PyinfraError:  # "No hosts remaining!": every host failed to connect
        pass
    for host in state.failed_hosts:
        errors.by_host.setdefault(host.name, "cannot connect")
    state.set_stage(StateStage.Prepare)
    code = compile(deploy.read_text(encoding="utf-8"), str(deploy), "exec")
    _add_repo_to_path(deploy)

    def prepare_host(host: Host) -> None:
        try:
            with ctx_config.use(state.config.copy()), ctx_host.use(host):
                _exec_deploy(deploy, code)
        except Exception as exc:  # noqa: BLE001 - one host's failure is reported, others go on
            errors.by_host.setdefault(host.name, f"planning failed: {exc}")

    with ctx_state.use(state):
        greenlets = [state.pool.spawn(prepare_host, h) for h in list(state.active_hosts)]
        gevent.joinall(greenlets)
    for host in list(state.failed_hosts):
        errors.by_host.setdefault(host.name, "a fact failed while planning")
    return state, errors


def _host_op_names(state: State, host: Host) -> dict[str, str]:
    """op hash -> this host's own name of the operation (with its deploy prefix)."""
    out: dict[str, str] = {}
    for op_hash, data in state.ops.get(host, {}).items():
        given = data.global_arguments.get("name")
        names = state.op_meta[op_hash].names
        if given:
            # the shared meta holds "<deploy> | <name>" for the names of every host
            mine = sorted(n for n in names if n == given or n.endswith(f" | {given}"))
            out[op_hash] = mine[0] if len(mine) == 1 else given
        else:
            # unnamed operations are named after their function ("files.put")
            out[op_hash] = " / ".join(sorted(names))
    return out


def _planned(state: State) -> dict[str, tuple[int, list[str]]]:
    """host -> (operations planned, names of those that would change), in deploy order."""
    order = state.get_op_order()
    result: dict[str, tuple[int, list[str]]] = {}
    for host in state.inventory:
        if host not in state.activated_hosts:
            continue
        ops = state.ops.get(host, {})
        names = _host_op_names(state, host)
        changing = [
            names[h]
            for h in order
            if h in ops
            # handlers (`_if=other_op.did_change`) follow the operation they depend on,
            # which is reported itself; pyinfra's plan calls them "conditional changes"
            and not ops[h].global_arguments.get("_if")
            and ops[h].operation_meta.will_change
        ]
        result[host.name] = (len(ops), changing)
    return result


def _executed_changes(state: State) -> dict[str, list[str]]:
    result: dict[str, list[str]] = {}
    for host in state.activated_hosts:
        ops = state.ops.get(host, {})
        names = _host_op_names(state, host)
        result[host.name] = [
            names[h]
            for h in state.get_op_order()
            if h in ops
            and ops[h].operation_meta.is_complete()
            and ops[h].operation_meta.did_change()
        ]
    return result


def _did_change(meta: Any) -> bool:
    return bool(meta.is_complete() and meta.did_change())


def check(
    inventory_path: str,
    deploy_path: str,
    limit: Iterable[str] | None = None,
    apply: bool = False,
) -> Report:
    """Check (and with ``apply`` correct, then check again) every host of the inventory."""
    deploy = Path(deploy_path)
    if not deploy.is_file():
        raise DriftError(f"{deploy_path}: no such deploy file")
    started = time.time()
    report = Report(inventory=inventory_path, deploy=deploy_path, apply=apply, started_at=started)
    limit = list(limit or [])
    inventory = load_inventory(inventory_path, limit)
    for host in inventory:
        report.hosts[host.name] = HostDrift(name=host.name)

    state, errors = _prepare(inventory, deploy)
    for name, (count, changing) in _planned(state).items():
        report.hosts[name].checked = count
        report.hosts[name].drifted = changing
    drifted = [n for n, h in report.hosts.items() if h.drifted and n not in errors.by_host]
    if apply and drifted:
        with ctx_state.use(state):
            try:
                run_ops(state)
            except PyinfraError:  # every host failed
                pass
        for name, changed in _executed_changes(state).items():
            report.hosts[name].corrected = changed
            report.hosts[name].applied = name in drifted
        for host in state.failed_hosts:
            errors.by_host.setdefault(host.name, "the deploy failed")
    _disconnect(state)

    if apply and drifted:
        again_names = [n for n in drifted if n not in errors.by_host]
        if again_names:
            again, again_errors = _prepare(load_inventory(inventory_path, again_names), deploy)
            for name, (_, changing) in _planned(again).items():
                report.hosts[name].remaining = changing
            for name, message in again_errors.by_host.items():
                errors.by_host.setdefault(name, f"re-check: {message}")
            _disconnect(again)

    for name, message in errors.by_host.items():
        report.hosts[name].error = message
    report.duration_s = time.time() - started
    return report


def _disconnect(state: State) -> None:
    state.set_stage(StateStage.Disconnect)
    with ctx_state.use(state):
        disconnect_all(state)


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
) -> int:
    started = time.time()
    try:
        report = check(inventory, deploy, limit=limit, apply=apply)
    except DriftError as exc:
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
