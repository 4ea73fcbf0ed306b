"""The drift seal's operation (gpunode/seal.py explains the seal)."""

from __future__ import annotations

import json
from io import StringIO

from pyinfra import host
from pyinfra.api import QuoteString, StringCommand, operation

from gpunode import pipeline
from gpunode import seal as sealing
from gpunode.facts.seal import SealCheck, entries
from gpunode.operations.files import upload


def current(now: dict, inputs: str, extra: dict, ids: set[str]) -> bool:
    """Whether the node's seal (``now``, the SealCheck fact) already seals this run."""
    return (
        now.get("seal") == "ok"
        and now.get("inputs") == inputs
        and now.get("extra") == extra
        and not now.get("differs")
        and ids <= set(now.get("ids") or ())
    )


@operation()
def seal():
    """
    Seal what every fact this deploy read on the host saw, as the host is at the end of
    the run (``gpunode-seal record`` on the node); rewritten only when the inputs, the
    Vault inputs or a sealed entry changed, or an entry is new. Where a fact cannot be
    sealed, the seal is removed: that host always gets the full plan. Call it last.

    .. code:: python

        seal(name="Drift seal")
    """
    now = host.get_fact(SealCheck)
    sealed = entries(pipeline.fact_reads(host))
    if sealed is None:
        if now.get("seal") not in ("missing", "no-checker"):
            yield StringCommand("rm", "-f", "--", QuoteString(sealing.SEAL_PATH))
        return
    inputs = sealing.input_digest(host)
    extra = sealing.extra_inputs(host)
    if current(now, inputs, extra, {sealing.entry_id(k, a) for k, a in sealed}):
        return
    doc = json.loads(sealing.spec(host, sealed))
    yield upload(StringIO(json.dumps(doc)), sealing.SPEC_PATH)
    yield StringCommand(
        "python3",
        "-I",
        "-S",
        QuoteString(sealing.SCRIPT_PATH),
        "record",
        QuoteString(sealing.SPEC_PATH),
    )
