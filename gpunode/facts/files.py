"""File facts gpunode needs beyond pyinfra's: one command each."""

from __future__ import annotations

import shlex

from pyinfra.api import FactBase


class PrivateFileState(FactBase):
    """
    Owner, group and mode of a private file (a secret, a credential), or ``None`` if
    it does not exist. Nothing about its content (no size, no hash): under ``-vvv``
    pyinfra prints a fact's output, and a hash of a secret is an offline guessing
    oracle. The command names only the path. ``type`` is ``file``, ``link`` (a
    symlink, replaced by the operation) or ``other`` (a directory, a device, ...).

    .. code:: python

        {"type": "file", "user": "root", "group": "llm", "mode": "640"}
    """

    def command(self, path: str) -> str:
        q = shlex.quote(path)
        return (
            f"if [ -L {q} ]; then echo link; "
            f"elif [ -f {q} ]; then stat -c 'file %U %G %a' -- {q}; "
            f"elif [ -e {q} ]; then echo other; fi"
        )

    def process(self, output: list[str]) -> dict[str, str] | None:
        if not output:
            return None
        kind, *rest = output[0].split()
        if kind != "file":
            return {"type": kind}
        user, group, mode = rest
        return {"type": kind, "user": user, "group": group, "mode": mode}
