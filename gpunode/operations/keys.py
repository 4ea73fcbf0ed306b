"""Repository signing keys pinned by fingerprint: the check on the host right after a key
is downloaded, and the plan-time verdict on a keyring already there (the
:class:`gpunode.facts.keys.Keyring` fact, read on every run).

A keyring is trusted only if the set of its primary keys *equals* the pinned set: a file
with the right key plus another is refused (apt trusts every key in a ``signed-by`` file).

.. code:: python

    from gpunode.operations.keys import pinned_keyring
    key = pinned_keyring(
        what="HashiCorp signing key",
        src="https://apt.releases.hashicorp.com/gpg",
        path="/usr/share/keyrings/hashicorp-archive-keyring.asc",
        fingerprints=("798AEC654E5C15428C8E42EEAA16FCBCA621E701",),
        family="apt",
    )
    if key is None:
        return  # the host failed: add nothing that would trust this keyring
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from typing import Any

from pyinfra import host
from pyinfra.api import operation
from pyinfra.operations import apt, dnf, files

from gpunode.facts.keys import PRIMARY_RECORDS, Keyring, list_keys_command
from gpunode.operations.server import fail

# awk over gpg --with-colons: the fingerprint (field 10) of the fpr record right after each
# primary key record (the same rule as gpunode.facts.keys.primary_fingerprints).
_PRIMARY_FPR_AWK = (
    "awk -F: '"
    + "||".join(f'$1=="{record}"' for record in PRIMARY_RECORDS)
    + '{p=1;next} p&&$1=="fpr"{print toupper($10);p=0}\''
)


# What puts gpg on a host (it reads the keyrings): Debian/Ubuntu's gpg, EL's gnupg2 (always
# installed there: dnf needs it).
GPG_PACKAGE = {"apt": "gpg", "dnf": "gnupg2"}


def _expected(fingerprints: Sequence[str]) -> list[str]:
    return sorted({f.upper() for f in fingerprints})


@operation(is_idempotent=False)
def check_keyring(path: str, fingerprints: Sequence[str]):
    """
    Check on the host that the keyring ``path`` holds exactly the primary keys
    ``fingerprints`` (no fewer, no other); otherwise remove the file and fail the host.
    Run it right after the key is downloaded (``_if=download.did_change``) and before any
    repository file or package trusts it; later runs check the file with the ``Keyring``
    fact at plan time.

    + path: the keyring file on the host
    + fingerprints: the pinned primary-key fingerprints (40 hex digits each)

    .. code:: python

        check_keyring(
            name="Check the HashiCorp signing key",
            path="/usr/share/keyrings/hashicorp-archive-keyring.asc",
            fingerprints=("798AEC654E5C15428C8E42EEAA16FCBCA621E701",),
            _if=download.did_change,
        )
    """
    expected = " ".join(_expected(fingerprints))
    q = shlex.quote(path)
    refused = shlex.quote(f"gpunode: {path} holds primary keys: ")
    wanted = shlex.quote(f"; expected exactly: {expected} (the file was removed)")
    yield (
        f"found=$({list_keys_command(path)} | {_PRIMARY_FPR_AWK} | sort -u | "
        "tr '\\n' ' ' | sed 's/ $//'); "
        f'if [ "$found" != {shlex.quote(expected)} ]; then rm -f {q}; '
        f'echo {refused}"${{found:-none}}"{wanted} >&2; exit 1; fi'
    )


def keyring_problem(
    host_name: str, path: str, keyring: dict[str, Any] | None, fingerprints: Sequence[str]
) -> str | None:
    """Why the keyring on the host (the ``Keyring`` fact) must not be trusted, or None when
    it is absent or holds exactly the pinned primary keys."""
    if keyring is None or not keyring["gpg"]:
        return None  # absent, or unreadable until gpg is installed: checked on the host
    found, expected = keyring["fingerprints"], _expected(fingerprints)
    if found == expected:
        return None
    return (
        f"host {host_name}: {path} holds primary keys {', '.join(found) or 'none'}; "
        f"expected exactly {', '.join(expected)} (allowed: a keyring with only the pinned "
        "keys: remove the file and run again to download it, or fix the pin in gpunode's "
        "tables if the publisher rotated its key)"
    )


def pinned_keyring(
    what: str, src: str, path: str, fingerprints: Sequence[str], family: str
) -> Any | None:
    """
    Put a repository signing key at ``path`` (downloaded from ``src`` when missing, mode
    644), trusted only if its primary keys are exactly ``fingerprints``; gpg (which reads
    it) is installed first. Returns the download operation (its ``did_change`` tells
    whether the key is new), or ``None`` when the keyring already on the host holds other
    keys: the host then fails before anything trusts it, and the caller must add no
    repository file or package install after it.
    """
    keyring = host.get_fact(Keyring, path=path)
    problem = keyring_problem(host.name, path, keyring, fingerprints)
    if problem:
        fail(name=f"Check the {what}", message=problem)
        return None
    if family == "apt":
        apt.packages(
            name="gpg (reads repository keys)", packages=[GPG_PACKAGE[family]], no_recommends=True
        )
    else:
        dnf.packages(name="gpg (reads repository keys)", packages=[GPG_PACKAGE[family]])
    download = files.download(name=what, src=src, dest=path, mode="644")
    if keyring is None:  # fresh from the download
        check_keyring(
            name=f"Check the {what}",
            path=path,
            fingerprints=tuple(fingerprints),
            _if=download.did_change,
        )
    elif not keyring["gpg"]:  # there, but unreadable at plan time: gpg is installed first
        check_keyring(name=f"Check the {what}", path=path, fingerprints=tuple(fingerprints))
    return download
