"""Fixtures shared by several modules under tests/unit (their helpers are in harness.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from harness import Replay, Server, _serve

from gpunode import provenance


@pytest.fixture
def server() -> Iterator[Server]:
    yield from _serve(Replay(), None)


@pytest.fixture(autouse=True)
def _fresh_provenance(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts with no provenance records (gpunode/provenance.py keeps them for the
    life of a process, as one pyinfra run does): no test passes or fails by the order tests
    run in."""
    monkeypatch.setattr(provenance, "_RECORDS", {})


@pytest.fixture(autouse=True)
def _no_fact_pipeline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Unit tests check the commands each fact and operation sends: fact pipelining
    (gpunode/pipeline.py) is off unless a test (test_pipeline.py) turns it on."""
    monkeypatch.setenv("GPUNODE_FACT_PIPELINE", "0")
