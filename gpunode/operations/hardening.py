"""Operations for the hardening role, beyond pyinfra's own."""

from __future__ import annotations

import re
import shlex

from pyinfra import host
from pyinfra.api import OperationValueError, operation
from pyinfra.facts.server import Sysctl

from gpunode.facts.hardening import KeyValues, PasswordAccounts

_KEY_RE = re.compile(r"[A-Z][A-Z0-9_]*")
_WORD_RE = re.compile(r"[A-Za-z0-9._/-]+")


@operation()
def sysctl_values(values: dict[str, int]):
    """
    Set sysctl keys to these values now (not persisted): one ``sysctl -w`` for the keys
    whose running value differs, nothing when all match.

    .. code:: python

        sysctl_values(name="Network sysctls", values={"net.ipv4.tcp_syncookies": 1})
    """
    if not values:
        host.noop("no sysctl to set")
        return
    running = host.get_fact(Sysctl, keys=sorted(values))
    differ = {k: v for k, v in sorted(values.items()) if running.get(k) != v}
    if not differ:
        host.noop("every sysctl already has its value")
        return
    yield "sysctl -q -w " + " ".join(f"{k}={v}" for k, v in differ.items())


@operation()
def key_values(path: str, values: dict[str, str]):
    """
    Set ``KEY value`` lines in a file such as /etc/login.defs: a key's lines are rewritten in
    place (comments and the rest of the file left as they are), a missing key is appended;
    nothing when every key has its value. Keys are ``[A-Z_]`` words and values single words
    (gpunode's own tables), quoted anyway.

    .. code:: python

        key_values(name="login.defs", path="/etc/login.defs", values={"UMASK": "027"})
    """
    for key, value in values.items():
        if not _KEY_RE.fullmatch(key) or not _WORD_RE.fullmatch(value):
            raise OperationValueError(f"{path}: {key!r} {value!r} is not a KEY value pair")
    have = host.get_fact(KeyValues, path=path)
    differ = {k: v for k, v in values.items() if have.get(k) != v}
    if not differ:
        host.noop(f"{path} has every value")
        return
    commands = []
    for key, value in differ.items():
        if key in have:
            script = rf"s/^[[:space:]]*{key}([[:space:]].*)?$/{key}	{value}/"
            commands.append(f"sed -i -E {shlex.quote(script)} {shlex.quote(path)}")
        else:
            line = shlex.quote(f"{key}\t{value}")
            commands.append(f"printf '%s\\n' {line} >> {shlex.quote(path)}")
    yield " && ".join(commands)


@operation()
def password_aging(minimum: int, maximum: int, warn: int, skip: tuple[str, ...] = ()):
    """
    Password aging (``chage -m/-M/-W``) on every local account that has a password, except
    ``skip``; nothing for an account that has those values already.

    .. code:: python

        password_aging(name="Password aging", minimum=1, maximum=365, warn=7, skip=("root",))
    """
    want = {"min": str(minimum), "max": str(maximum), "warn": str(warn)}
    accounts = host.get_fact(PasswordAccounts)
    todo = [n for n, aging in sorted(accounts.items()) if n not in skip and aging != want]
    if not todo:
        host.noop("every account with a password has its aging")
        return
    for name in todo:
        yield f"chage -m {minimum} -M {maximum} -W {warn} -- {shlex.quote(name)}"
