"""Operations for the firewall role beyond pyinfra's: the anti-lockout confirmation, a NEW
connection from the controller after a ruleset was loaded (run with ``python.call``)."""

from __future__ import annotations

import time
from typing import Any

from pyinfra.api import StringCommand
from pyinfra.api.exceptions import PyinfraError
from pyinfra.connectors.ssh import SSHConnector
from pyinfra.connectors.sshuserclient import SSHClient


def confirm_new_connection(state: Any, host: Any, timeout: float) -> bool:
    """Open a NEW connection to the host with its own connection data and run ``true``.

    Over SSH: pyinfra's own SSH client and settings (key, known_hosts, strict host key
    checking), with ``timeout`` for each attempt, retried until ``timeout`` has passed.
    Raises with the reason when no new connection got through.
    """
    connector = host.connector
    deadline = time.monotonic() + timeout
    last: Exception | str = "no attempt"
    while time.monotonic() < deadline:
        remaining = max(1.0, deadline - time.monotonic())
        try:
            if isinstance(connector, SSHConnector):
                _ssh_true(connector, remaining)
            else:  # another connector (e.g. @fake in the tests): a fresh instance of it
                fresh = type(connector)(state, host)
                fresh.connect()
                ok, _ = fresh.run_shell_command(StringCommand("true"))
                if not ok:
                    raise PyinfraError("`true` failed on the new connection")
            return True
        except Exception as exc:  # noqa: BLE001 - any failure is "not confirmed"
            last = exc
            time.sleep(1)
    raise PyinfraError(
        f"host {host.name}: firewall: a new SSH connection from the controller failed after "
        f"the new ruleset was loaded ({type(last).__name__}: {last}); the node restores its "
        "previous ruleset by itself when the rollback timer fires (check network.admin_cidrs "
        "covers this controller)"
    )


def _ssh_true(connector: SSHConnector, timeout: float) -> None:
    kwargs = connector.make_paramiko_kwargs()
    hostname = kwargs.pop("hostname")
    kwargs.update(timeout=timeout, banner_timeout=timeout, auth_timeout=timeout)
    client = SSHClient()
    try:
        client.connect(hostname, **kwargs)
        _, stdout, _ = client.exec_command("true", timeout=timeout)
        status = stdout.channel.recv_exit_status()
        if status != 0:
            raise PyinfraError(f"`true` exited {status} on the new connection")
    finally:
        client.close()
