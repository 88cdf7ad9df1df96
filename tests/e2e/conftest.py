"""Fixtures of the end-to-end tests (harness/ holds the rigs they build): a JACK server per test module, the
models the rigs play, and factories of sessions and bands that close what they made. Called by pytest."""

from __future__ import annotations

import pytest

from harness.band import Band
from harness.daemon import make_model
from harness.jack import JackServer, jack_missing
from harness.modelfactory import make_step_model
from harness.procs import closing_all
from harness.session import Session


@pytest.fixture(scope="module")
def jack_server(tmp_path_factory):
    """A JACK server with the dummy driver (48 kHz, 64 frames) for one test module, in synchronous mode: the tests
    check that every note is heard, answered and released, and in the default asynchronous mode a client the host
    stalls past the driver's wake-up loses that cycle's MIDI, improvd or not (see `JackServer`)."""
    missing = jack_missing()
    if missing:
        pytest.skip(missing)
    server = JackServer(sync=True).start(tmp_path_factory.mktemp("jack"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """The sessions' model: a small step-format model (harness.daemon.make_model)."""
    return make_model(tmp_path_factory.mktemp("model"))


@pytest.fixture
def session(jack_server, tmp_path, model):
    """`session(**kwargs)` makes a `Session` with the module's model; each is closed (and its graph checked) after
    the test."""
    with closing_all(lambda **kwargs: Session(jack_server, tmp_path, model, **kwargs)) as make:
        yield make


@pytest.fixture
def band(jack_server, tmp_path):
    """`band(model_path, **kwargs)` makes a `Band`; each is closed (and its graph checked) after the test."""
    with closing_all(lambda model_path, **kwargs: Band(jack_server, tmp_path, model_path, **kwargs)) as make:
        yield make


@pytest.fixture(scope="module")
def grid_model(tmp_path_factory):
    """Steps of about 0.3..0.45 s: two or three sixteenths at 100 bpm."""
    return make_step_model(tmp_path_factory.mktemp("m") / "grid.onnx", seed=7, context=64, step_scale=0.6,
                           duration_scale=0.3)


@pytest.fixture(scope="module")
def long_model(tmp_path_factory):
    """Notes that last longer than their steps: something always sounds."""
    return make_step_model(tmp_path_factory.mktemp("m") / "long.onnx", seed=4, context=64, step_scale=0.6,
                           duration_scale=2.0)


@pytest.fixture(scope="module")
def spread_model(tmp_path_factory):
    """Fast notes from flat pitch distributions: sampling visits pitches in and out of any scale."""
    return make_step_model(tmp_path_factory.mktemp("m") / "spread.onnx", seed=6, context=64, step_scale=0.12,
                           duration_scale=0.08, logit_scale=0.3)
