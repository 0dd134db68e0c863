"""Fixtures shared by the KV-transfer tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture
def closing() -> Iterator[list]:
    """A list of senders/receivers/transports to close after the test, in order."""
    ends: list = []
    yield ends
    for e in ends:
        e.close()
