"""Facts for sudoers drop-ins (gpunode/operations/sudo.py)."""

from __future__ import annotations

from gpunode.facts.files import FileDigest


class SudoersDropin(FileDigest):
    """
    A sudoers drop-in's owner, group, mode and sha256; ``None`` when it does not exist.

    .. code:: python

        {"user": "root", "group": "root", "mode": "440", "sha256": "9b1c..."}
    """
