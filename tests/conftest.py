"""pytest's side of the shared harness (harness/): a test marked `jack` is skipped, with what to install, where
jackd or the JACK example clients are missing. Called by pytest while it collects."""

from __future__ import annotations

import pytest

from harness.jack import jack_missing


def pytest_collection_modifyitems(config, items):
    missing = jack_missing()
    if missing is None:
        return
    skip = pytest.mark.skip(reason=missing)
    for item in items:
        if item.get_closest_marker("jack") is not None:
            item.add_marker(skip)
