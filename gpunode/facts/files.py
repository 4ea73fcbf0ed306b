"""File facts gpunode needs beyond pyinfra's: one command each."""

from __future__ import annotations

import shlex

from pyinfra.api import FactBase


class SecretFileState(FactBase):
    """
    Owner, group, mode and sha256 of a file, or ``None`` if it does not exist. The
    command names only the path.

    .. code:: python

        {"user": "root", "group": "llm", "mode": "640", "sha256": "9f86d0..."}
    """

    def command(self, path: str) -> str:
        q = shlex.quote(path)
        return f"if [ -f {q} ]; then stat -c '%U %G %a' {q} && sha256sum {q}; fi"

    def process(self, output: list[str]) -> dict[str, str] | None:
        if len(output) < 2:
            return None
        user, group, mode = output[0].split()
        return {"user": user, "group": group, "mode": mode, "sha256": output[1].split()[0]}
