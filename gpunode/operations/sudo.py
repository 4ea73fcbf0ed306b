"""sudoers drop-ins that never take effect unless ``visudo`` accepts them."""

from __future__ import annotations

import posixpath
import shlex

from pyinfra.api import operation

from gpunode.facts.sudo import SudoersDropin
from gpunode.operations.files import checked_install

VISUDO = "/usr/sbin/visudo"


def install_command(staged: str, dest: str) -> str:
    """Check the staged file alone, keep the live one, move the staged one in place, check
    the whole sudoers; on any refusal the previous drop-in (or none) is back and it fails."""
    directory, base = posixpath.split(dest)
    s, d = shlex.quote(staged), shlex.quote(dest)
    previous = shlex.quote(posixpath.join(directory, f".{base}.gpunode-previous"))
    refused = shlex.quote(f"gpunode: visudo refused the new {dest}: it was not put in place")
    restored = shlex.quote(
        f"gpunode: visudo -c refused sudoers with the new {dest}: the previous one is back"
    )
    return "\n".join(
        [
            f"if ! {VISUDO} -c -f {s} >/dev/null; then",
            f"  rm -f {s}",
            f"  echo {refused} >&2",
            "  exit 1",
            "fi",
            f"if [ -e {d} ]; then cp -p {d} {previous}; else rm -f {previous}; fi",
            f"mv -f {s} {d}",
            f"if ! {VISUDO} -c >/dev/null; then",
            f"  if [ -e {previous} ]; then mv -f {previous} {d}; else rm -f {d}; fi",
            f"  echo {restored} >&2",
            "  exit 1",
            "fi",
            f"rm -f {previous}",
        ]
    )


@operation()
def sudoers_dropin(path: str, content: str):
    """
    Write a sudoers drop-in that takes effect only once ``visudo`` accepts it: it is staged
    next to its destination under a name sudo skips (sudo ignores names with a ``.``), owned
    by root with mode 0440 before it has content, checked alone with ``visudo -cf``, moved in
    place, and the whole sudoers checked again with ``visudo -c`` (on a refusal the previous
    drop-in is put back and the operation fails with visudo's reason). Nothing is written
    when the drop-in already has this content, owner and mode.

    + path: the drop-in, in a directory sudoers includes (``/etc/sudoers.d/NAME``)
    + content: the sudoers text; every inventory value in it rendered by
      ``gpunode.render.sudoers_value`` or a checked name

    .. code:: python

        sudoers_dropin(name="sudo for admins", path="/etc/sudoers.d/90-gpunode-admins",
                       content="%gpunode_admins ALL=(ALL:ALL) ALL\\n")
    """
    yield from checked_install(path, content, "440", install_command, SudoersDropin)
