"""Repository signing keys: which OpenPGP primary keys a keyring file on the host holds.

apt trusts every key in a ``signed-by`` file, and dnf imports every key in a ``gpgkey=``
file, so a keyring is only as good as the set of keys in it: gpunode compares that set
with the pinned one (gpunode/nvidia.py, gpunode/nomad.py) on every run.

.. code:: python

    from gpunode.facts.keys import Keyring
    keyring = host.get_fact(Keyring, path="/usr/share/keyrings/hashicorp-archive-keyring.asc")
    keyring["fingerprints"]  # ["798AEC654E5C15428C8E42EEAA16FCBCA621E701"]
"""

from __future__ import annotations

import shlex
from collections.abc import Iterable
from typing import Any

from pyinfra.api import FactBase

# The first line of the fact's output: the file exists (then gpg's listing follows), or it
# exists and gpg is not installed to read it.
PRESENT = "gpunode-keyring: present"
NO_GPG = "gpunode-keyring: no gpg"

# gpg --with-colons record types that start a primary key: a public key, or a secret one.
PRIMARY_RECORDS = ("pub", "sec")


def list_keys_command(path: str) -> str:
    """``gpg --show-keys --with-colons`` of ``path``, in a throwaway gpg home (nothing is
    imported anywhere; root's ~/.gnupg is not created or read)."""
    return (
        'home=$(mktemp -d) && { gpg --homedir "$home" --batch --no-tty --show-keys '
        f'--with-colons {shlex.quote(path)} 2>/dev/null; rm -rf "$home"; }}'
    )


def primary_fingerprints(records: Iterable[str]) -> list[str]:
    """The fingerprints of the primary keys in ``gpg --with-colons`` output, sorted and
    unique: the ``fpr`` record that follows each ``pub``/``sec`` record (a subkey's ``fpr``
    follows its ``sub``/``ssb`` record and is not counted)."""
    found: set[str] = set()
    after_primary = False
    for line in records:
        fields = line.split(":")
        if fields[0] in PRIMARY_RECORDS:
            after_primary = True
        elif fields[0] == "fpr" and after_primary and len(fields) > 9:
            found.add(fields[9].upper())
            after_primary = False
    return sorted(found)


class Keyring(FactBase):
    """
    The primary-key fingerprints in an OpenPGP keyring file (armored or binary), read with
    the host's ``gpg``; ``None`` when the file does not exist. ``gpg`` is ``False`` when the
    file exists but gpg is not installed (nothing could be read). A file that is not a key
    at all holds no key: ``[]``.

    .. code:: python

        {"fingerprints": ["798AEC654E5C15428C8E42EEAA16FCBCA621E701"], "gpg": True}
    """

    def command(self, path: str) -> str:
        q = shlex.quote(path)
        return (
            f"if [ -e {q} ]; then if command -v gpg >/dev/null 2>&1; then "
            f"echo {shlex.quote(PRESENT)}; {list_keys_command(path)}; "
            f"else echo {shlex.quote(NO_GPG)}; fi; fi"
        )

    def process(self, output: list[str]) -> dict[str, Any] | None:
        if not output:
            return None
        if output[0] == NO_GPG:
            return {"fingerprints": [], "gpg": False}
        return {"fingerprints": primary_fingerprints(output[1:]), "gpg": True}
