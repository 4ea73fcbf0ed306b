"""Facts about the content-addressed artifact store on the node (see
gpunode/operations/artifacts.py): the digests it holds and where its links point."""

from __future__ import annotations

import re
import shlex

from pyinfra.api import FactBase

from gpunode.schema.types import SHA256_RE

DIGEST = re.compile(SHA256_RE)


class StoreDigests(FactBase):
    """
    The digests complete in a store (``<store>/sha256/<digest>``), newest first. Fetches in
    progress (``.fetch.*``) are not listed.

    .. code:: python

        ["9a0e...", "5f1c..."]
    """

    @staticmethod
    def default() -> list[str]:
        return []

    def command(self, store: str) -> str:
        return f"ls -1t {shlex.quote(store + '/sha256')} 2>/dev/null || true"

    def process(self, output: list[str]) -> list[str]:
        return [line.strip() for line in output if DIGEST.match(line.strip())]


class Links(FactBase):
    """
    Where a service directory's ``current`` and ``previous`` links point ("" for none).

    .. code:: python

        {"current": "/var/lib/gpunode/models/sha256/9a0e...", "previous": ""}
    """

    @staticmethod
    def default() -> dict[str, str]:
        return {"current": "", "previous": ""}

    def command(self, directory: str) -> str:
        d = shlex.quote(directory)
        return f'for l in current previous; do echo "$l=$(readlink {d}/$l)"; done'

    def process(self, output: list[str]) -> dict[str, str]:
        links = {"current": "", "previous": ""}
        for line in output:
            key, sep, value = line.partition("=")
            if sep and key in links:
                links[key] = value.strip()
        return links
