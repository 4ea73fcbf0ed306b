"""What each deploy put on a node, for /etc/gpunode/provenance.json.

Roles call :func:`record` while the deploy runs (per host, never with secret
values: versions, digests and names only); the provenance role writes what was
recorded for the host at the end of the deploy.

.. code:: python

    from gpunode.provenance import record
    record("nvidia", {"branch": "580", "version": "580.95.05"})
"""

from __future__ import annotations

from typing import Any

from pyinfra import host

_RECORDS: dict[str, dict[str, Any]] = {}


def record(section: str, values: dict[str, Any]) -> None:
    """Record ``values`` under ``section`` for the host the deploy is running on."""
    _RECORDS.setdefault(host.name, {}).setdefault(section, {}).update(values)


def recorded(host_name: str) -> dict[str, Any]:
    """Everything recorded for one host so far (a copy)."""
    return {k: dict(v) for k, v in _RECORDS.get(host_name, {}).items()}
