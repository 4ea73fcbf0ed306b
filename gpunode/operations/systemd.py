"""systemd operations beyond pyinfra's: start a unit clearing its failed state, restart it,
and wait until what it serves is healthy."""

from __future__ import annotations

import shlex

from pyinfra import host
from pyinfra.api import operation


@operation()
def start_unit(unit: str, running: bool):
    """
    Start a unit that is not running (``running``: the ``SystemdStatus`` fact), first clearing
    a failed state, so a unit that hit its start limit starts again once it is fixed.

    .. code:: python

        start_unit(name="Service running", unit="gpunode-inference-chat.service",
                   running=host.get_fact(SystemdStatus, services=[unit]).get(unit, False))
    """
    if running:
        host.noop(f"{unit} is running")
        return
    q = shlex.quote(unit)
    yield f"systemctl reset-failed {q} 2>/dev/null || true; systemctl start {q}"


@operation(is_idempotent=False)
def restart_unit(unit: str):
    """
    Restart a unit (clearing a failed state first). Run it ``_if`` something it uses changed.

    .. code:: python

        restart_unit(name="Restart", unit="gpunode-inference-chat.service", _if=unit.did_change)
    """
    q = shlex.quote(unit)
    yield f"systemctl reset-failed {q} 2>/dev/null || true; systemctl restart {q}"


@operation(is_idempotent=False)
def wait_healthy(url: str, timeout: int, unit: str):
    """
    Wait on the node until ``url`` answers 2xx, or fail after ``timeout`` seconds with the
    unit's status. Run it ``_if`` the unit was (re)started.

    .. code:: python

        wait_healthy(name="Wait for health", url="http://127.0.0.1:8080/health",
                     timeout=180, unit="gpunode-inference-chat.service", _if=start.did_change)
    """
    q = shlex.quote
    yield (
        f"end=$(( $(date +%s) + {int(timeout)} )); "
        f"until curl -fsS -o /dev/null --max-time 5 {q(url)}; do "
        f"if systemctl is-failed --quiet {q(unit)}; then "
        f'echo "gpunode: {unit} failed (start limit reached) before {url} was healthy" >&2; '
        f"systemctl status --no-pager --lines=15 {q(unit)} >&2; exit 1; fi; "
        f'if [ "$(date +%s)" -ge "$end" ]; then '
        f'echo "gpunode: {unit} is not healthy at {url} after {int(timeout)}s" >&2; '
        f"systemctl status --no-pager --lines=15 {q(unit)} >&2; exit 1; fi; sleep 1; done"
    )
