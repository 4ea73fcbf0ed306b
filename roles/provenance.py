"""Provenance role (runs last): what deployed this node, in /etc/gpunode/provenance.json.

The record holds the deploy repository's commit and whether its tree was dirty,
gpunode's version, what the roles recorded with ``gpunode.provenance.record``
(driver/CUDA/runtime versions, model digests, secret versions; never values) and
``deployed_at``. It is rewritten only when something other than ``deployed_at``
changed, so ``deployed_at`` is the time of the last deploy that changed the
record and a converged host reports no change. ``gpunode verify`` prints it.

.. code:: python

    from roles.provenance import provenance
    provenance()
"""

from __future__ import annotations

from io import StringIO

from pyinfra import host
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
    files.put(
        name="Provenance record",
        src=StringIO(record.render(new)),
        dest=record.PATH,
        mode="644",
        user="root",
        group="root",
    )
