"""gpunode's own pyinfra operations, for what pyinfra's do not cover."""

from __future__ import annotations

import re
import shlex
import time
from dataclasses import dataclass
from typing import Any
from weakref import WeakKeyDictionary

from paramiko import SSHException
from pyinfra import host, logger
from pyinfra.api import FunctionCommand, OperationValueError, StringCommand, operation
from pyinfra.connectors.util import clear_askpass_cache, remove_any_sudo_askpass_file
from pyinfra.facts.server import TmpDir

from gpunode.facts.server import PythonBytecode


@operation(is_idempotent=True)
def notice(message: str):
    """
    Show a visible, non-failing note for this host in the run's output (a skip
    that a user should see, e.g. "no GPU on this host"), once a run, at pyinfra's
    default verbosity (``host.noop`` shows only with ``-v``).

    .. code:: python

        notice(name="GPU stack", message="no NVIDIA GPU found: skipped")
    """
    state = host.state
    # pyinfra runs an operation's body when it plans (change detection: not with -y) and again
    # when it executes: say it at the first of the two only
    if not (state.is_executing and state.should_check_for_changes()):
        logger.info(f"{host.print_prefix}{message}")
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


# py_compile writes the .pyc atomically (a new file, renamed over the old one), with the
# source's mode; umask 022 so that a stricter login umask (027) leaves it readable to the
# unprivileged services that import the module
_COMPILE = (
    "import py_compile, sys\n"
    "py_compile.compile(sys.argv[1], doraise=True,\n"
    "                   invalidation_mode=py_compile.PycInvalidationMode.CHECKED_HASH)\n"
)


def bytecode_path_of(source: str, pyc: str) -> bool:
    """Whether ``pyc`` is where a Python keeps the bytecode of ``source``
    (``DIR/__pycache__/NAME.TAG.pyc``)."""
    folder, _, name = source.rpartition("/")
    stem = name.removesuffix(".py")
    prefix = f"{folder}/__pycache__/{stem}."
    return (
        name.endswith(".py")
        and pyc.startswith(prefix)
        and re.fullmatch(r"[A-Za-z0-9_-]+(\.opt-[12])?\.pyc", pyc[len(prefix) :]) is not None
    )


@operation()
def python_bytecode(path: str, source_sha256: str):
    """
    Give the node's ``python3`` current, hash-checked bytecode for the module at ``path``
    (``source_sha256``: the content the deploy puts there, so a module replaced in the same
    run is compiled after it). Python checks such bytecode against the source on every
    import: it saves the compile (a large module costs tens of milliseconds at each start)
    and can never run code other than the source's.

    .. code:: python

        python_bytecode(name="pynvml bytecode", path="/usr/local/lib/gpunode/pynvml.py",
                        source_sha256=hashlib.sha256(source).hexdigest())
    """
    now = host.get_fact(PythonBytecode, path=path)
    if now["state"] == "current" and now["source"] == source_sha256:
        host.noop(f"bytecode of {path} is current")
        return
    # a stale file or a link goes first (never written through); the path is the node's
    # answer, so only one where the interpreter keeps this module's bytecode is removed
    if now["state"] == "stale" and bytecode_path_of(path, now["pyc"]):
        yield f"rm -f -- {shlex.quote(now['pyc'])}"
    yield (f"umask 022 && python3 -I -S -c {shlex.quote(_COMPILE)} {shlex.quote(path)}")


def stage_uploads_as_login() -> None:
    """Stage this host's uploads in the login user's own temporary directory.

    With sudo, pyinfra uploads a file as the login user into a temporary directory, then
    copies it into place with sudo. It asks the host for that directory under sudo
    (``server.TmpDir``): where pam_tmpdir runs (the hardening role installs it), sudo's
    session has root's private ``/tmp/user/0``, which the login cannot write, so every upload
    after the run that installed it fails with "Permission denied" (the download side is
    pyinfra issue #1440). So the directory is read once per host as the login and set as the
    host's ``_temp_dir`` (pyinfra's per-operation temporary directory, whose default comes
    from host data): the login's ``/tmp/user/<uid>`` (0700) under pam_tmpdir, else ``/tmp``.
    A ``TEMP_DIR`` in pyinfra's config or a ``_temp_dir`` in the host's data is kept.

    .. code:: python

        from gpunode.operations.server import stage_uploads_as_login
        stage_uploads_as_login()  # in the deploy file, before any role (outside any @deploy)

    pyinfra takes an operation's global arguments from the enclosing ``@deploy`` first, which
    fixes them when it starts: the host data must be set before the first role runs, at the
    top of the deploy file (every deploy in deploys/ does it).
    """
    if host.state.config.TEMP_DIR or host.data.get("_temp_dir"):
        return
    if not host.data.get("_sudo", host.state.config.SUDO):
        return  # no sudo: pyinfra's own lookup is the login's
    login_tmp = host.get_fact(TmpDir, _sudo=False)
    host.data._temp_dir = login_tmp or host.state.config.DEFAULT_TEMP_DIR


BOOT_ID = "cat /proc/sys/kernel/random/boot_id"


@dataclass
class _Rollout:
    """One rolling reboot's progress in a run: the host it is on (None between hosts)."""

    current: str | None = None


# per run (pyinfra's State) and per operation: which host a rolling reboot is on
_ROLLOUTS: WeakKeyDictionary[Any, dict[str, _Rollout]] = WeakKeyDictionary()


def _boot_id(host: Any) -> str | None:
    """The host's boot id (a new one each boot), or None when it does not answer."""
    try:
        ok, output = host.run_shell_command(StringCommand(BOOT_ID), _sudo=False)
    except (OSError, EOFError, SSHException):  # the connection went down under the command
        return None
    lines = output.stdout_lines if ok else []
    return lines[0].strip() if len(lines) == 1 and lines[0].strip() else None


def _start(state: Any, host: Any, rollout: _Rollout, boot: list[str]) -> bool:
    if rollout.current not in (None, host.name):
        host.log_styled(
            f"not rebooted: the rolling reboot stopped at {rollout.current}, which did not "
            "come back or failed its check",
            fg="red",
            log_func=logger.error,
        )
        return False
    rollout.current = host.name
    before = _boot_id(host)
    if before is None:
        host.log_styled(
            "its boot id could not be read: not rebooted", fg="red", log_func=logger.error
        )
        return False
    boot[:] = [before]
    remove_any_sudo_askpass_file(host)  # sudo's helper file goes before the connection does
    return True


def _wait_for_new_boot(
    state: Any, host: Any, boot: list[str], delay: float, timeout: float, interval: float
) -> bool:
    started = time.monotonic()
    time.sleep(delay)
    clear_askpass_cache(host)  # the files it names went with the old boot
    host.disconnect()
    while True:
        host.connect(show_errors=False)
        if host.connected:
            now = _boot_id(host)
            if now is not None and now != boot[0]:
                return True
            host.disconnect()  # still the old boot (on its way down): a new connection later
        if time.monotonic() - started >= timeout:
            host.log_styled(
                f"did not come back within {timeout:.0f} s of its reboot "
                "(no SSH login with a new boot id): the rolling reboot stops here",
                fg="red",
                log_func=logger.error,
            )
            return False
        time.sleep(interval)


def _finish(state: Any, host: Any, rollout: _Rollout) -> bool:
    rollout.current = None
    return True


@operation(is_idempotent=False)
def rolling_reboot(check: str, reboot_timeout: int = 900, delay: int = 10, interval: int = 5):
    """
    Reboot the hosts one at a time: reboot a host, wait until it answers over SSH with a
    new boot id, run ``check`` on it (a shell command that exits 0 when the host came back
    right), and only then go on to the next host. A host that does not come back within
    ``reboot_timeout`` seconds, or fails its check, fails, and the rollout stops there:
    every host after it fails without a reboot, naming the host that stopped it (a new
    driver that breaks a node stops at one node, not the fleet).

    pyinfra runs a ``_serial`` operation on one host after another, but goes on to the next
    host when one fails; this operation is what stops it. It needs ``_serial=True``.

    + check: shell command run on the host after its reboot (as the operation's user)
    + reboot_timeout: seconds from the reboot until the host must answer with a new boot
    + delay: seconds before the first attempt to reconnect
    + interval: seconds between attempts

    .. code:: python

        rolling_reboot(name="Reboot into the new driver", check="test -e /sys/module/nvidia",
                       reboot_timeout=900, _serial=True)
    """
    # _serial is an execution argument: pyinfra keeps it in the operation's shared meta
    op_hash = str(host.current_op_hash)
    if not host.state.get_op_meta(op_hash).global_arguments.get("_serial"):
        raise OperationValueError("rolling_reboot reboots one host at a time: pass _serial=True")
    rollout = _ROLLOUTS.setdefault(host.state, {}).setdefault(op_hash, _Rollout())
    boot: list[str] = []
    yield FunctionCommand(_start, (rollout, boot), {})
    # detached, so the SSH channel closes before the machine goes down
    yield "( sleep 1 && systemctl reboot ) </dev/null >/dev/null 2>&1 &"
    yield FunctionCommand(_wait_for_new_boot, (boot, delay, reboot_timeout, interval), {})
    yield check
    yield FunctionCommand(_finish, (rollout,), {})
