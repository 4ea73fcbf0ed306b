"""Package operations pyinfra's do not cover."""

from __future__ import annotations

from pyinfra.api import operation

from gpunode.base import APT_LOCK_TIMEOUT_S

LOCK_RETRY_S = 5

# apt-get update takes apt's lists lock, which DPkg::Lock::Timeout (gpunode/base.py) does not
# wait for: a deploy that meets the daily timer's update or unattended-upgrades would fail
# the host. So the update is retried while apt says another process holds a lock, for as long
# as apt waits for dpkg's own lock; any other failure is reported at once. LC_ALL=C: apt's
# messages are matched in English whatever the node's locale.
APT_UPDATE = (
    "end=$(( $(date +%s) + {wait} )); "
    "while :; do "
    "out=$(LC_ALL=C apt-get update 2>&1); rc=$?; "
    "if [ $rc -eq 0 ]; then printf '%s\\n' \"$out\"; exit 0; fi; "
    "case \"$out\" in *'Could not get lock '*) ;; "
    "*) printf '%s\\n' \"$out\" >&2; exit $rc;; esac; "
    'if [ "$(date +%s)" -ge "$end" ]; then printf \'%s\\n\' "$out" >&2; exit $rc; fi; '
    "echo 'gpunode: another apt process holds its lock (the daily update or "
    "unattended-upgrades?): apt-get update again in {retry} s' >&2; "
    "sleep {retry}; "
    "done"
)


def apt_update_command(wait_s: int = APT_LOCK_TIMEOUT_S, retry_s: int = LOCK_RETRY_S) -> str:
    """The shell command of :func:`apt_update`."""
    return APT_UPDATE.format(wait=int(wait_s), retry=int(retry_s))


@operation(is_idempotent=False)
def apt_update(wait_s: int = APT_LOCK_TIMEOUT_S):
    """
    Refresh apt's package lists, as ``apt.update`` does, but waiting (up to ``wait_s``
    seconds, retried every 5 s) while another apt process holds its lock, instead of failing
    the host.

    .. code:: python

        apt_update(name="Refresh apt package lists")
    """
    yield apt_update_command(wait_s)
