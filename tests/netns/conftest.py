"""Fixtures for tests that build throwaway network namespaces (see netlab.py)."""

from __future__ import annotations

import warnings
from typing import Iterator

import pytest

from .netlab import NetLab, missing_requirements


@pytest.fixture
def netlab() -> Iterator[NetLab]:
    """A NetLab whose namespaces, links and processes are removed after the test, pass or fail.
    Skips when not root or `ip` is missing; tests needing more tools check for them themselves
    (netlab.missing_requirements)."""
    reason = missing_requirements(("ip",))
    if reason:
        pytest.skip(reason)
    lab = NetLab()
    try:
        yield lab
    finally:
        lab.close()
        if lab.cleanup_errors:
            warnings.warn("netlab cleanup problems: " + "; ".join(lab.cleanup_errors))
