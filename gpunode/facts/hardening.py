"""Facts for the hardening role: one cheap shell command each."""

from __future__ import annotations

import shlex

from pyinfra.api import FactBase

from gpunode.hardening import SSHD_DROPIN


class SshdState(FactBase):
    """
    gpunode's sshd drop-in and whether the main sshd_config includes the drop-in directory
    (sshd reads only the files an ``Include`` names).

    .. code:: python

        {"dropin_sha1": "9b1c...", "includes_dropins": True}
    """

    def command(self) -> str:
        return (
            f"echo dropin_sha1=$(sha1sum {SSHD_DROPIN} 2>/dev/null | cut -d' ' -f1); "
            "grep -qiE '^[[:space:]]*Include[[:space:]]+/etc/ssh/sshd_config\\.d/\\*\\.conf' "
            "/etc/ssh/sshd_config && echo include=yes || echo include=no"
        )

    def process(self, output: list[str]) -> dict[str, bool | str]:
        raw = dict(line.partition("=")[::2] for line in output)
        return {
            "dropin_sha1": raw.get("dropin_sha1", "").strip(),
            "includes_dropins": raw.get("include", "").strip() == "yes",
        }


class WritableSysctls(FactBase):
    """
    Which of the given sysctl keys this host can write (inside a container the kernel-wide
    ones under /proc/sys/kernel and /proc/sys/fs are read-only).

    .. code:: python

        {"kernel.sysrq": False, "net.ipv4.tcp_syncookies": True}
    """

    def command(self, keys: list[str]) -> str:
        checks = "; ".join(
            f"test -w /proc/sys/{key.replace('.', '/')} && echo {key}=yes || echo {key}=no"
            for key in keys
        )
        return checks or "true"

    def process(self, output: list[str]) -> dict[str, bool]:
        return {k: v == "yes" for k, _, v in (line.partition("=") for line in output) if k}


class PrimaryGroup(FactBase):
    """
    The name of a user's primary group (``id -gn``); ``None`` when there is no such user.

    .. code:: python

        host.get_fact(PrimaryGroup, user="root")
        "root"
    """

    def command(self, user: str) -> str:
        return f"id -gn -- {shlex.quote(user)} 2>/dev/null || true"

    def process(self, output: list[str]) -> str | None:
        return output[0].strip() if output else None


class KeyValues(FactBase):
    """
    The settings of a ``KEY value`` file such as /etc/login.defs: comments and blank lines
    left out, the last of a key's lines wins (as shadow's getdef reads them); ``{}`` when
    the file is missing.

    .. code:: python

        host.get_fact(KeyValues, path="/etc/login.defs")
        {"UMASK": "022", "PASS_MAX_DAYS": "99999", ...}
    """

    @staticmethod
    def default() -> dict:
        return {}

    def command(self, path: str) -> str:
        return f"cat -- {shlex.quote(path)} 2>/dev/null || true"

    def process(self, output: list[str]) -> dict[str, str]:
        values: dict[str, str] = {}
        for line in output:
            words = line.split(None, 1)
            if words and not words[0].startswith("#"):
                values[words[0]] = words[1].strip() if len(words) > 1 else ""
        return values


class PasswordAccounts(FactBase):
    """
    Local accounts that have a password (a hash in /etc/shadow, not locked with ``!`` or
    ``*``, or an empty one), with their aging fields as /etc/shadow keeps them (days; ``""``
    when unset). Reads /etc/shadow: needs root. No hash is read into gpunode.

    .. code:: python

        {"alice": {"min": "0", "max": "99999", "warn": "7"}}
    """

    @staticmethod
    def default() -> dict:
        return {}

    def command(self) -> str:
        return 'awk -F: \'$2 !~ /^[!*]/ { print $1 ":" $4 ":" $5 ":" $6 }\' /etc/shadow'

    def process(self, output: list[str]) -> dict[str, dict[str, str]]:
        accounts = {}
        for line in output:
            name, _, rest = line.partition(":")
            low, high, warn = (rest.split(":") + ["", "", ""])[:3]
            accounts[name] = {"min": low, "max": high, "warn": warn}
        return accounts
