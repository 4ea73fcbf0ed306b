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


class FileDigest(FactBase):
    """
    A file's owner, group, mode and sha256; ``None`` when it does not exist. For files whose
    content is no secret (a configuration), compared with the wanted content's digest.

    .. code:: python

        {"user": "root", "group": "root", "mode": "644", "sha256": "9b1c..."}
    """

    def command(self, path: str) -> str:
        p = shlex.quote(path)
        return f"test -f {p} && stat -c '%U %G %a' {p} && sha256sum {p} || true"

    def process(self, output: list[str]) -> dict[str, str] | None:
        if len(output) < 2:
            return None
        user, group, mode = output[0].split()
        return {"user": user, "group": group, "mode": mode, "sha256": output[1].split()[0]}
