"""Facts for rsyslog drop-ins (gpunode/operations/rsyslog.py)."""

from __future__ import annotations

from gpunode.facts.files import FileDigest


class RsyslogDropin(FileDigest):
    """
    An rsyslog drop-in's owner, group, mode and sha256; ``None`` when it does not exist.

    .. code:: python

        {"user": "root", "group": "root", "mode": "644", "sha256": "9b1c..."}
    """
