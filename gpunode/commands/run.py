"""Run pyinfra from Python: the one place in gpunode's commands that drives pyinfra.

``drift``, ``rotate`` and ``rollout`` run deploys through this module, never through a
``pyinfra`` subprocess or pyinfra's API directly: it builds pyinfra's State, Config and
Inventory, connects, plans a deploy on every host, executes it and disconnects, and
returns per-host results.

- :func:`load_inventory` loads an inventory file the way ``pyinfra INVENTORY ...`` does,
  limited (``--limit``) to hosts and groups, with a clear error for an unknown name;
  :func:`inventory_from` makes one from ``(name, data)`` pairs.
- :func:`prepare` connects and plans a deploy: a deploy *file* (``deploys/gpu_node.py``,
  executed per host like the CLI executes it) or a deploy *function* with keyword
  arguments. ``data`` is added to every host's data, like the CLI's ``--data KEY=VALUE``
  (the way to hand a deploy file values; never secret ones: host data is not a secret
  store). With ``detect_changes`` (a dry run, ``pyinfra --dry``) every operation is
  evaluated against the hosts' current state, so the plan says what would change;
  without it (``pyinfra -y``) operations are evaluated only when they execute, and facts
  are read once (pyinfra caches no facts).
- :meth:`Run.execute` executes the planned operations; :meth:`Run.results` reports per
  host the operations planned, those that would change (by operation name), those that
  changed when executed and the host's error. A :class:`Run` is a context manager:
  leaving it disconnects, so callers can still run commands on the connected hosts
  (:meth:`Run.host`) between execution and disconnection.
- :func:`run` is all of it in one call: plan only (dry run), or plan and apply.

A host that fails (unreachable, a fact or an operation failed, or its deploy raised while
planning) is reported with an error and the others go on; a host whose planning raised
is never executed (its operations up to the error would be a partial deploy). With
``all_or_nothing`` (the CLI's behaviour, and the default of :func:`run` when applying) a
planning error on any host stops the execution on every host: a Vault error stops the run
before anything is written anywhere.

Operation names are reported, never arguments: names carry no data values (a gpunode
rule), arguments may. Per-host names come from each host's own operation data, not from
the change table shared by all hosts: in API mode pyinfra hashes operations by their
position per host, so hosts whose operation lists differ share a table entry whose name
set is the union of theirs.

pyinfra's operations run in gevent greenlets. ``gpunode.commands.cli`` patches the
standard library with gevent before anything imports ssl or socket, as pyinfra's own CLI
does; code that calls this module from elsewhere works unpatched, with less concurrency.
pyinfra refuses API runs inside a CLI run (``pyinfra.is_cli``): so does this module.

.. code:: python

    from gpunode.commands import run
    inventory = run.load_inventory("inventories/prod.py", limit=["gpu-01"])
    results = run.run(inventory, "deploys/gpu_node.py", apply=False)  # a dry run
    results["gpu-01"].changes  # ["gpunode base | Packages", ...]
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
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

# A deploy: a deploy file's path, or a deploy function (a pyinfra @deploy).
Deploy = str | Path | Callable[..., Any]

CONNECT_TIMEOUT = 10  # seconds, per host


class RunError(Exception):
    """Bad input for a run (unknown file, host or group), or a run that cannot start."""


@dataclass
class HostRun:
    """One host's result. ``changes``: the operations the plan found changing (handlers
    that run only ``_if`` another operation changed excluded: the operation they follow
    is there); it is empty when planned without ``detect_changes``. ``executed``: the
    operations that changed something when executed, handlers excluded the same way. An
    operation's facts are read again when it executes, so ``executed`` can hold one that
    the plan found unchanged: its state changed in between."""

    name: str
    planned: int = 0  # operations planned for the host
    changes: list[str] = field(default_factory=list)
    ran: bool = False  # the deploy was executed on the host
    executed: list[str] = field(default_factory=list)
    error: str | None = None
    # the exception the deploy raised while planning (a VaultError, ...), for callers
    # that handle some kinds themselves
    exception: BaseException | None = field(default=None, repr=False)
    # stderr of the operation that failed (pyinfra logs it too); not for reports as is
    output: list[str] = field(default_factory=list, repr=False)

    @property
    def ok(self) -> bool:
        return self.error is None


# --- inventories ------------------------------------------------------------------------


def load_inventory(path: str | Path, limit: Iterable[str] | None = None) -> Inventory:
    """An inventory file loaded the way ``pyinfra INVENTORY ...`` loads it, then limited
    to the named hosts and groups (a clear error for an unknown name)."""
    from pyinfra_cli.inventory import make_inventory

    path = str(path)
    if not Path(path).is_file():
        raise RunError(f"{path}: no such inventory file")
    _add_repo_to_path(Path(path))
    try:
        with ctx_state.use(State()):  # the CLI's loader notes the file it runs on a state
            inventory = make_inventory(path)
    except SystemExit as exc:  # gpunode's config loader has printed the problems
        raise RunError(f"{path}: invalid inventory (exit status {exc.code})") from None
    except Exception as exc:  # noqa: BLE001 - pyinfra wraps errors in the user's file
        cause = getattr(exc, "exception", exc)  # pyinfra_cli's UnexpectedExternalError
        raise RunError(f"{path}: cannot load the inventory: {cause}") from None
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
            raise RunError(f"--limit {item}: no such host or group (allowed: {allowed})")
    names = list(dict.fromkeys(keep))
    return inventory_from((name, dict(inventory.get_host(name).data.dict())) for name in names)


def inventory_from(hosts: Iterable[tuple[str, dict[str, Any]]]) -> Inventory:
    """An inventory of these hosts (name, host data), in this order, without groups."""
    return Inventory((list(hosts), {}))


def _add_repo_to_path(path: Path) -> None:
    # Deploy files import roles/ like pyinfra's CLI lets them: from the working directory
    # and from the repository the file lives in.
    for candidate in (Path.cwd(), path.resolve().parent.parent):
        if str(candidate) not in sys.path:
            sys.path.insert(0, str(candidate))


# --- one run ----------------------------------------------------------------------------


class _Errors(BaseStateCallback):
    """Collects per-host connection and operation errors (pyinfra only logs them)."""

    def __init__(self) -> None:
        self.by_host: dict[str, str] = {}
        self.failed_op: dict[str, str] = {}  # host -> hash of the operation that failed

    def host_connect_error(self, state: State, host: Host, error: Any) -> None:  # type: ignore[override]
        message = error.args[0] if getattr(error, "args", None) else str(error)
        self.by_host.setdefault(host.name, f"cannot connect: {message}")

    def operation_host_error(  # type: ignore[override]
        self, state: State, host: Host, op_hash: str, *args: Any, **kw: Any
    ) -> None:
        names = _host_op_names(state, host).get(op_hash, "?")
        self.by_host.setdefault(host.name, f"operation failed: {names}")
        self.failed_op.setdefault(host.name, op_hash)


class Run:
    """A deploy planned on connected hosts (made by :func:`prepare`); see the module
    docstring. ``close`` (or leaving the ``with`` block) disconnects."""

    def __init__(self, state: State, errors: _Errors) -> None:
        self.state = state
        self._errors = errors
        self._exceptions: dict[str, BaseException] = {}
        self._ran: set[str] = set()  # hosts the deploy was executed on
        self._executed = False
        self._closed = False

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def errors(self) -> dict[str, str]:
        """host -> its error so far (connection, planning, operation)."""
        return dict(self._errors.by_host)

    def host(self, name: str) -> Host:
        """The pyinfra host (connected while the run is open), e.g. for health checks."""
        host = self.state.inventory.get_host(name, None)
        if host is None:
            raise RunError(f"{name}: not a host of this run")
        return host

    def execute(self, all_or_nothing: bool = False) -> dict[str, HostRun]:
        """Execute the planned operations on every host that was planned without error.
        ``all_or_nothing``: none at all when the planning of any host raised."""
        if self._executed:
            raise RunError("a run executes once")
        self._executed = True
        state, by_host = self.state, self._errors.by_host
        planning_failed = sorted(self._exceptions)
        if all_or_nothing and planning_failed:
            for host in state.active_hosts:
                by_host.setdefault(
                    host.name, f"not run: planning failed on {', '.join(planning_failed)}"
                )
        skip = {h for h in state.active_hosts if h.name in by_host}
        try:
            state.fail_hosts(skip)
        except PyinfraError:  # "No hosts remaining!"
            pass
        self._ran = {h.name for h in state.active_hosts}
        if state.active_hosts:
            state.set_stage(StateStage.Execute)
            with ctx_state.use(state):
                try:
                    run_ops(state)
                except PyinfraError:  # every host failed
                    pass
        for host in state.failed_hosts:
            by_host.setdefault(host.name, "the deploy failed")
        return self.results()

    def results(self) -> dict[str, HostRun]:
        """Per host, in inventory order: what was planned, would change, changed, failed."""
        state = self.state
        order = state.get_op_order()
        out: dict[str, HostRun] = {}
        for host in state.inventory:
            result = HostRun(name=host.name)
            out[host.name] = result
            result.error = self._errors.by_host.get(host.name)
            result.exception = self._exceptions.get(host.name)
            if host not in state.activated_hosts:
                continue
            ops = state.ops.get(host, {})
            names = _host_op_names(state, host)
            result.planned = len(ops)
            in_order = [h for h in order if h in ops]
            # handlers (`_if=other_op.did_change`) follow the operation they depend on,
            # which is reported itself; pyinfra's plan calls them "conditional changes"
            own = [h for h in in_order if not ops[h].global_arguments.get("_if")]
            result.changes = [
                names[h]
                for h in own
                if state.should_check_for_changes() and ops[h].operation_meta.will_change
            ]
            result.ran = host.name in self._ran
            result.executed = [
                names[h]
                for h in own
                if ops[h].operation_meta.is_complete() and ops[h].operation_meta.did_change()
            ]
            failed = self._errors.failed_op.get(host.name)
            if failed in ops and ops[failed].operation_meta.is_complete():
                result.output = list(ops[failed].operation_meta.stderr_lines)
        return out

    def close(self) -> None:
        """Disconnect from every host (once)."""
        if self._closed:
            return
        self._closed = True
        disconnect(self.state)


def disconnect(state: State) -> None:
    """Disconnect from every host a state connected to."""
    if state.current_stage < StateStage.Disconnect:
        state.set_stage(StateStage.Disconnect)
    with ctx_state.use(state):
        disconnect_all(state)


def prepare(
    inventory: Inventory,
    deploy: Deploy,
    *,
    kwargs: dict[str, Any] | None = None,
    data: dict[str, Any] | None = None,
    detect_changes: bool = True,
) -> Run:
    """Connect to every host of ``inventory`` and plan ``deploy`` on each one that
    connected. Nothing changes on the hosts (facts are read). See the module docstring."""
    if pyinfra.is_cli:
        raise RunError("gpunode cannot run pyinfra's API inside a pyinfra CLI run")
    body = _deploy_body(deploy, kwargs or {})
    if data:
        inventory.override_data = {**inventory.override_data, **data}
    errors = _Errors()
    config = Config(CONNECT_TIMEOUT=CONNECT_TIMEOUT)
    state = State(inventory, config, check_for_changes=detect_changes)
    state.cwd = os.getcwd()  # relative file and template paths, like the CLI
    state.add_callback_handler(errors)
    run = Run(state, errors)
    state.set_stage(StateStage.Connect)
    try:
        connect_all(state)
    except PyinfraError:  # "No hosts remaining!": every host failed to connect
        pass
    for host in state.failed_hosts:
        errors.by_host.setdefault(host.name, "cannot connect")
    state.set_stage(StateStage.Prepare)

    def prepare_host(host: Host) -> None:
        try:
            with ctx_config.use(state.config.copy()), ctx_host.use(host):
                body()
        except Exception as exc:  # noqa: BLE001 - one host's failure is reported, others go on
            run._exceptions[host.name] = exc
            errors.by_host.setdefault(host.name, f"planning failed: {exc}")

    with ctx_state.use(state):
        greenlets = [state.pool.spawn(prepare_host, h) for h in list(state.active_hosts)]
        gevent.joinall(greenlets)
    for host in list(state.failed_hosts):
        errors.by_host.setdefault(host.name, "a fact failed while planning")
    return run


def run(
    inventory: Inventory,
    deploy: Deploy,
    *,
    apply: bool = False,
    kwargs: dict[str, Any] | None = None,
    data: dict[str, Any] | None = None,
    all_or_nothing: bool = True,
) -> dict[str, HostRun]:
    """Plan ``deploy`` on every host (a dry run: what would change), or with ``apply``
    execute it (``pyinfra -y``: no change detection first), then disconnect."""
    with prepare(inventory, deploy, kwargs=kwargs, data=data, detect_changes=not apply) as planned:
        if apply:
            return planned.execute(all_or_nothing=all_or_nothing)
        return planned.results()


def _deploy_body(deploy: Deploy, kwargs: dict[str, Any]) -> Callable[[], None]:
    """What planning runs for each host (in that host's context)."""
    if callable(deploy):
        return lambda: deploy(**kwargs)
    path = Path(deploy)
    if kwargs:
        raise RunError(f"{path}: a deploy file takes no arguments (pass host data instead)")
    if not path.is_file():
        raise RunError(f"{path}: no such deploy file")
    code = compile(path.read_text(encoding="utf-8"), str(path), "exec")
    _add_repo_to_path(path)

    def body() -> None:
        exec(code, {"__file__": str(path), "__name__": "__gpunode_deploy__"})  # noqa: S102

    return body


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
