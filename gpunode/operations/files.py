"""File operations beyond pyinfra's: a Vault secret onto a node without leaking it
(:func:`secret_file`), and an existing file's owner and mode (:func:`file_mode`).

The value is never an operation argument pyinfra prints (it travels inside a
:class:`~gpunode.clients.vault.SecretValue`, whose ``repr`` is masked), never on a
command line (it goes up over SFTP into a file that already has its final owner
and mode), never in a diff (this operation prints none, even with ``--diff``)
and never in a log. The file is replaced atomically: a temporary file in the
same directory, created empty with the final owner and mode, filled, then
renamed over the old one. A converged host is recognised by the sha256 of the
remote file, so it reports no change.
"""

from __future__ import annotations

import io
import posixpath
import secrets as _random
import shlex
from typing import Any

from pyinfra import host
from pyinfra.api import FileUploadCommand, StringCommand, operation
from pyinfra.facts.files import File

from gpunode.clients.vault import SecretValue
from gpunode.facts.files import SecretFileState


def _mode(mode: str) -> str:
    return mode.lstrip("0").rjust(3, "0")


@operation()
def secret_file(path: str, secret: SecretValue, env: str, user: str, group: str, mode: str):
    """
    Write one secret as ``ENV=value`` into an env file, atomically and without
    leaking it. Changes only when the content, owner, group or mode differ.

    + path: the env file on the node (its directory must exist)
    + secret: the value read from Vault (``gpunode.clients.vault.Session.read``)
    + env: the variable name in the file
    + user, group, mode: the file's final owner and mode (set before any byte is written)

    .. code:: python

        value = session_for(config.vault).read("llm_api_key", secret)
        secret_file(
            name="Secret file", path="/etc/gpunode/secrets/llm_api_key.env",
            secret=value, env="API_KEY", user="root", group="llm", mode="0640",
        )
    """
    current = host.get_fact(SecretFileState, path=path)
    want_mode = _mode(mode)
    if current and current["sha256"] == secret.sha256(env):
        if current["mode"] != want_mode:  # tighten first, then hand over
            yield StringCommand("chmod", want_mode, path)
        if (current["user"], current["group"]) != (user, group):
            yield StringCommand("chown", f"{user}:{group}", path)
        return

    directory, base = posixpath.split(path)
    tmp = posixpath.join(directory, f".{base}.gpunode-new")
    # Empty, with its final owner and mode, before any content exists.
    yield StringCommand("install", "-m", want_mode, "-o", user, "-g", group, "/dev/null", tmp)
    content = io.BytesIO(secret.env_line(env).encode())
    args: dict[str, Any] = dict(host.current_op_global_arguments or {})
    if any(args.get(k) for k in ("_sudo", "_doas", "_dzdo", "_su_user")):
        # pyinfra uploads as the login user to a temporary file, then copies it with
        # sudo: make that file ours and private first (cp keeps the target's mode).
        staging = f"/tmp/gpunode-secret-{_random.token_hex(8)}"
        yield StringCommand(
            "install",
            "-m",
            "600",
            "/dev/null",
            staging,
            _sudo=False,
            _doas=False,
            _dzdo=False,
            _su_user="",
        )
        yield FileUploadCommand(content, tmp, remote_temp_filename=staging)
    else:
        yield FileUploadCommand(content, tmp)  # SFTP writes into the file: mode kept
    yield StringCommand("mv", "-f", tmp, path)


@operation()
def file_mode(path: str, user: str, group: str, mode: str):
    """
    Set an existing file's owner, group and mode (``000`` included, which pyinfra's
    ``files.file`` skips); a missing file is left missing.

    .. code:: python

        file_mode(name="shadow", path="/etc/shadow", user="root", group="root", mode="000")
    """
    info = host.get_fact(File, path=path)
    if not info:
        host.noop(f"{path} does not exist")
        return
    if (info["user"], info["group"]) != (user, group):
        yield f"chown {shlex.quote(f'{user}:{group}')} {shlex.quote(path)}"
    if info["mode"] != int(mode):
        yield f"chmod {shlex.quote(mode)} {shlex.quote(path)}"
