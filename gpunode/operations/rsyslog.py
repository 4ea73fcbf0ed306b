"""rsyslog drop-ins that never take effect unless ``rsyslogd -N1`` accepts them."""

from __future__ import annotations

import posixpath
import shlex

from pyinfra.api import operation

from gpunode.facts.rsyslog import RsyslogDropin
from gpunode.operations.files import checked_install

RSYSLOGD = "/usr/sbin/rsyslogd"


def install_command(staged: str, dest: str) -> str:
    """Check the staged file alone (``rsyslogd -N1 -f``), keep the live one, move the staged
    one in place, check the whole configuration (``rsyslogd -N1``: /etc/rsyslog.conf and what
    it includes); on any refusal the previous drop-in (or none) is back and it fails with
    rsyslogd's reason. rsyslog is not restarted here: the role does, when the drop-in (or
    what it refers to) changed."""
    directory, base = posixpath.split(dest)
    s, d = shlex.quote(staged), shlex.quote(dest)
    previous = shlex.quote(posixpath.join(directory, f".{base}.gpunode-previous"))
    refused = shlex.quote(f"gpunode: rsyslogd -N1 refused the new {dest}: it was not put in place")
    restored = shlex.quote(
        f"gpunode: rsyslogd -N1 refused the configuration with the new {dest}: the previous "
        "one is back"
    )
    return "\n".join(
        [
            f"if ! out=$({RSYSLOGD} -N1 -f {s} 2>&1); then",
            f"  rm -f {s}",
            '  printf "%s\\n" "$out" >&2',
            f"  echo {refused} >&2",
            "  exit 1",
            "fi",
            f"if [ -e {d} ]; then cp -p {d} {previous}; else rm -f {previous}; fi",
            f"mv -f {s} {d}",
            f"if ! out=$({RSYSLOGD} -N1 2>&1); then",
            f"  if [ -e {previous} ]; then mv -f {previous} {d}; else rm -f {d}; fi",
            '  printf "%s\\n" "$out" >&2',
            f"  echo {restored} >&2",
            "  exit 1",
            "fi",
            f"rm -f {previous}",
        ]
    )


@operation()
def rsyslog_dropin(path: str, content: str):
    """
    Write an rsyslog drop-in that takes effect only once ``rsyslogd -N1`` accepts it: staged
    next to its destination under a name rsyslog's ``*.conf`` include skips
    (``.NAME.gpunode-new``), owned by root with mode 0644 before it has content, checked
    alone with ``rsyslogd -N1 -f``, moved in place, and the whole configuration checked again
    with ``rsyslogd -N1`` (on a refusal the previous drop-in is put back and the operation
    fails with rsyslogd's reason). Nothing is written when the drop-in already has this
    content, owner and mode. rsyslog reads it when it is restarted (the caller's handler).

    + path: the drop-in, in a directory rsyslog.conf includes (``/etc/rsyslog.d/NAME.conf``)
    + content: the RainerScript text; every inventory value in it rendered by
      ``gpunode.render.rainerscript_string``

    .. code:: python

        rsyslog_dropin(name="Forward the journal", path="/etc/rsyslog.d/60-gpunode-remote.conf",
                       content=render_remote_logs(config, "apt"))
    """
    yield from checked_install(path, content, "644", install_command, RsyslogDropin)
