"""Fixtures shared by several modules under tests/unit (their helpers are in harness.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from harness import Replay, Server, _serve


@pytest.fixture
def server() -> Iterator[Server]:
    yield from _serve(Replay(), None)
