"""A runtime profile's command line for one service (the profiles are in
gpunode/schema/runtimes.py), and the lock file a runtime installed with pip comes from
(gpunode/locks.py)."""

from __future__ import annotations

import string
from collections.abc import Mapping

from gpunode import locks
from gpunode.schema.inference import RuntimeInstall
from gpunode.schema.runtimes import Profile, RuntimeName


def command_line(profile: Profile, values: Mapping[str, object]) -> list[str]:
    """The server's arguments (after the executable) for these values.

    >>> command_line(PROFILES["llamacpp"], {"model": "/m", "listen": "0.0.0.0", "port": 8080})
    ['-m', '/m', '--host', '0.0.0.0', '--port', '8080', '--metrics']
    """
    argv: list[str] = []
    for arg in profile.args:
        needed = [name for token in arg.tokens for name in _placeholders(token)]
        if any(values.get(name) is None for name in needed):
            continue
        argv += [token.format(**{n: values[n] for n in needed}) for token in arg.tokens]
    return argv


def _placeholders(token: str) -> list[str]:
    return [name for _, name, _, _ in string.Formatter().parse(token) if name]


# --- runtimes installed with pip: their lock files -----------------------------------------


def runtime_lock(install: RuntimeInstall) -> locks.Lock:
    """The lock a pip runtime is installed from (LockError when it has none or a bad one):
    ``install.lock``, or the repository's ``locks/runtimes/<pins>.txt``."""
    path = install.lock or str(locks.RUNTIME_LOCKS / locks.runtime_lock_name(install.packages))
    return locks.read(path)


def check_locks(where: str, runtimes: Mapping[RuntimeName, RuntimeInstall]) -> list[str]:
    """Every runtime with method pip has a lock that parses and holds each of its pins."""
    problems = []
    for name, install in runtimes.items():
        if install.method != "pip":
            continue
        at = f"{where}: inference.runtimes.{name}"
        pins = " ".join(install.packages)
        shipped = locks.RUNTIME_LOCKS / locks.runtime_lock_name(install.packages)
        if not install.lock and not shipped.exists():
            problems.append(
                f"{at}.packages: no lock for {pins}: "
                f"{shipped.relative_to(locks.LOCKS_DIR.parent)} does not exist (allowed: pins "
                f"with a lock of hashes: write it with `python scripts/lock.py runtime {pins}`, "
                f"or name your own in inference.runtimes.{name}.lock)"
            )
            continue
        try:
            lock = runtime_lock(install)
        except locks.LockError as exc:
            problems.append(f"{at}.{'lock' if install.lock else 'packages'}: {exc}")
            continue
        unpinned = lock.unpinned(install.packages)
        if unpinned:
            problems.append(
                f"{at}.packages: {', '.join(unpinned)} not in the lock {lock.path} at that "
                "version (allowed: a lock that holds every pin; scripts/lock.py writes one)"
            )
    return problems
