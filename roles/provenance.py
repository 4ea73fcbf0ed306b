"""Provenance role (runs last): what deployed this node, in /etc/gpunode/provenance.json.

The record holds the deploy repository's commit and whether its tree was dirty,
gpunode's version, what the roles recorded with ``gpunode.provenance.record``
(driver/CUDA/runtime versions, model digests, secret versions; never values) and
``deployed_at``. It is rewritten when what the roles recorded changed, or when
this run changes anything else on the host (then with this run's commit). A new
commit alone that changes nothing on the host rewrites nothing: a converged host
reports no change and a drift check no false drift. ``deployed_at`` is the time of
the last deploy that changed the host. ``gpunode verify`` prints it.

.. code:: python

    from roles.provenance import provenance
    provenance()
"""

from __future__ import annotations

from io import StringIO

from pyinfra import host, state
from pyinfra.api import deploy
from pyinfra.facts.files import FileContents
from pyinfra.operations import files

from gpunode import provenance as record
from gpunode.paths import REPO_ROOT


@deploy("gpunode provenance")
def provenance() -> None:
    new = record.document(host.name, str(REPO_ROOT))
    old = record.parse(host.get_fact(FileContents, path=record.PATH))
    if old is not None and record.stable(old) == record.stable(new):
        return
    only_source = old is not None and record.content(old) == record.content(new)
    if only_source and state.should_check_for_changes() and not _run_changes_host():
        return  # a new commit, nothing else to change on this host
    files.put(
        name="Provenance record",
        src=StringIO(record.render(new)),
        dest=record.PATH,
        mode="644",
        user="root",
        group="root",
        # without change detection (pyinfra -y) the plan is unknown: decide when it runs
        _if=_run_changed_host if only_source and not state.should_check_for_changes() else None,
    )


def _unconditional_ops() -> list:
    """This host's operations so far in this deploy, less the handlers that run only
    `_if` another one changed (a restart after a config change)."""
    return [
        data.operation_meta
        for data in state.ops[host].values()
        if not data.global_arguments.get("_if")
    ]


def _run_changes_host() -> bool:
    """From the plan (change detection on): will any operation change this host?"""
    return any(meta.will_change for meta in _unconditional_ops())


def _run_changed_host() -> bool:
    """At execution: did any operation that ran before this one change this host?"""
    return any(meta.is_complete() and meta.did_change() for meta in _unconditional_ops())
