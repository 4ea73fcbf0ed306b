"""Operations for the hardening role, beyond pyinfra's own."""

from __future__ import annotations

from pyinfra import host
from pyinfra.api import operation
from pyinfra.facts.server import Sysctl


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
