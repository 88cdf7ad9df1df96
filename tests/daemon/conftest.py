"""Fixtures shared by the daemon's unit tests: the small step models the engine rigs play (harness/engines.py)."""

from __future__ import annotations

import pytest

from harness.modelfactory import make_step_model


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """Steps of 0.3..0.45 s (two or three sixteenths at 100 bpm), durations up to 0.3 s."""
    return make_step_model(tmp_path_factory.mktemp("m") / "band.onnx", seed=7, context=200, step_scale=0.6,
                           duration_scale=0.3)


@pytest.fixture(scope="module")
def spread_model(tmp_path_factory):
    """Flat pitch distributions (small logits): sampling visits most pitches, in and out of any scale."""
    return make_step_model(tmp_path_factory.mktemp("m") / "spread.onnx", seed=6, context=200, step_scale=0.2,
                           duration_scale=0.1, logit_scale=0.3)
