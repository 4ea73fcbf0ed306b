"""gpunode's own pyinfra operations, for what pyinfra's do not cover."""

from __future__ import annotations

import shlex

from pyinfra import host
from pyinfra.api import operation


@operation(is_idempotent=True)
def notice(message: str):
    """
    Show a visible, non-failing note for this host in the run's output (a skip
    that a user should see, e.g. "no GPU on this host").

    .. code:: python

        notice(name="GPU stack", message="no NVIDIA GPU found: skipped")
    """
    host.noop(message)
    yield from ()


@operation(is_idempotent=False)
def fail(message: str):
    """
    Fail this host with a clear message (other hosts carry on). For host state
    that contradicts the config, found only once connected (wrong distro, say).

    .. code:: python

        fail(name="Check distro", message="declared debian12, found ubuntu 22.04")
    """
    yield f"echo {shlex.quote('gpunode: ' + message)} >&2; exit 1"
