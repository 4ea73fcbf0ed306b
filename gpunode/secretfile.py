"""The secret-file operation: a Vault secret onto a node without leaking it.

The value is never an operation argument pyinfra prints (it travels inside a
:class:`~gpunode.vault.SecretValue`, whose ``repr`` is masked), never on a
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
from pyinfra.api import FactBase, FileUploadCommand, StringCommand, operation

from gpunode.vault import SecretValue


class SecretFileState(FactBase):
    """
    Owner, group, mode and sha256 of a file, or ``None`` if it does not exist. The
    command names only the path.

    .. code:: python

        {"user": "root", "group": "llm", "mode": "640", "sha256": "9f86d0..."}
    """

    def command(self, path: str) -> str:
        q = shlex.quote(path)
        return f"if [ -f {q} ]; then stat -c '%U %G %a' {q} && sha256sum {q}; fi"

    def process(self, output: list[str]) -> dict[str, str] | None:
        if len(output) < 2:
            return None
        user, group, mode = output[0].split()
        return {"user": user, "group": group, "mode": mode, "sha256": output[1].split()[0]}


def _mode(mode: str) -> str:
    return mode.lstrip("0").rjust(3, "0")


@operation()
def secret_file(path: str, secret: SecretValue, env: str, user: str, group: str, mode: str):
    """
    Write one secret as ``ENV=value`` into an env file, atomically and without
    leaking it. Changes only when the content, owner, group or mode differ.

    + path: the env file on the node (its directory must exist)
    + secret: the value read from Vault (``gpunode.vault.Session.read``)
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
