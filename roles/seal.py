"""Seal role (runs last, after provenance): the node keeps what this deploy left in place,
so a drift check of a converged node costs one command (gpunode/seal.py).

It installs the node-side checker (gpunode/sealcheck.py, Python 3 standard library), has
AIDE take this run's changes in (roles/hardening.py ``file_integrity``), and seals what every
fact of this run saw.

.. code:: python

    from roles.seal import seal
    seal()
"""

from __future__ import annotations

from pyinfra.api import deploy
from pyinfra.operations import files

from gpunode import seal as sealing
from gpunode.operations.seal import seal as seal_op
from roles.hardening import file_integrity


@deploy("gpunode seal")
def seal() -> None:
    files.directory(
        name="gpunode state folder", path="/var/lib/gpunode", user="root", group="root", mode="755"
    )
    files.put(
        name="Drift seal checker",
        src=str(sealing.SCRIPT_SOURCE),
        dest=sealing.SCRIPT_PATH,
        user="root",
        group="root",
        mode="755",
    )
    # this run's changes, the checker above included, into AIDE's database before the seal
    # records what the node holds (the database is one of the files it seals)
    file_integrity()
    seal_op(name="Drift seal")
