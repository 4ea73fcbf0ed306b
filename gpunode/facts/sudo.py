"""Facts for sudoers drop-ins (gpunode/operations/sudo.py)."""

from __future__ import annotations

import shlex

from pyinfra.api import FactBase


class SudoersDropin(FactBase):
    """
    A sudoers drop-in's owner, group, mode and sha256; ``None`` when it does not exist.

    .. code:: python

        {"user": "root", "group": "root", "mode": "440", "sha256": "9b1c..."}
    """

    def command(self, path: str) -> str:
        p = shlex.quote(path)
        return f"test -f {p} && stat -c '%U %G %a' {p} && sha256sum {p} || true"

    def process(self, output: list[str]) -> dict[str, str] | None:
        if len(output) < 2:
            return None
        user, group, mode = output[0].split()
        return {"user": user, "group": group, "mode": mode, "sha256": output[1].split()[0]}
