"""Timing checks of the end-to-end tests: a miss fails, or becomes an expected failure whose reason carries the
evidence of a cause outside improvd (the rules: harness/graph.py). The pytest side of `harness.graph.timing_excuse`.
Called from the test's thread."""

from __future__ import annotations

import pytest

from harness.graph import timing_excuse
from harness.jack import JackServer


def check_timing(server: JackServer, ok: bool, detail, *, since: int) -> None:
    """Assert a timing check measured on the receiver's frame clock: nothing when it held; an expected failure with
    the evidence when the server's log after byte `since` and the host excuse the miss; else AssertionError."""
    excuse = timing_excuse(server, ok, detail, since=since)
    if excuse is not None:
        pytest.xfail(excuse)
