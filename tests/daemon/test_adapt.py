"""Session adaptation (daemon/predict/adapt.py) and its use by the Improviser, the engine and the control map."""

import time

import mido
import numpy as np
import pytest

from improvd.daemon.predict import adapt
from improvd.daemon.predict.adapt import SessionAdapter
from improvd.core.config import Config, ControlConfig
from improvd.daemon.control.cc import Action, ControlMap
from improvd.daemon.predict.improviser import Decoding, Improviser
from improvd.daemon.predict.model import StepModel
from tests.daemon.test_engine import Rig, improvise
from harness.modelfactory import make_step_model

UNIFORM = np.full(128, 1.0 / 128)
MOTIF = [61, 68, 63, 70, 66, 73]  # a distinctive zig-zag, played again and again


def test_equals_the_model_until_something_repeats():
    a = SessionAdapter(100)
    rng = np.random.default_rng(0)
    model = rng.dirichlet(np.ones(128))
    np.testing.assert_allclose(a.mix(model), model)  # nothing heard
    for p in (60, 62, 64):
        a.observe(p, model)
    a.observe(65, model, learn=False)  # context 62 64 65 never met before: every expert is the model
    np.testing.assert_allclose(a.mix(model), model, atol=1e-12)


def test_a_repeated_motif_is_predicted_and_forget_clears_it():
    a = SessionAdapter(1000)
    for _ in range(4):
        for p in MOTIF:
            a.observe(p, UNIFORM)
    for p in MOTIF[:3]:
        a.observe(p, UNIFORM)
    q = a.mix(UNIFORM)
    assert q.sum() == pytest.approx(1.0)
    assert q[MOTIF[3]] > 0.5 > 50 * UNIFORM[MOTIF[3]]  # the motif's next note, from 1/128 to more than half
    a.forget()
    assert a.counted == 0 and a.learned == 0
    np.testing.assert_allclose(a.mix(UNIFORM), UNIFORM)


def test_a_transposed_motif_is_predicted_by_its_intervals():
    a = SessionAdapter(1000)
    for _ in range(3):
        for p in MOTIF:
            a.observe(p, UNIFORM)
    for p in MOTIF[:4]:
        a.observe(p + 5, UNIFORM)  # the same zig-zag a fourth higher: absolute pitches never met
    q = a.mix(UNIFORM)
    assert q[MOTIF[4] + 5] > 10 * UNIFORM[0]  # 1/128 before; about 15/128 measured


def test_improvd_notes_extend_the_context_but_are_not_learned():
    a = SessionAdapter(1000)
    for p in MOTIF * 3:
        a.observe(p, UNIFORM, learn=False)
    assert a.counted == 0
    np.testing.assert_allclose(a.mix(UNIFORM), UNIFORM)


def test_memory_stays_bounded():
    a = SessionAdapter(50)
    rng = np.random.default_rng(1)
    for p in rng.integers(40, 90, 5000):
        a.observe(int(p), UNIFORM)
    assert a.counted == 50
    entries = sum(len(row) for table in a._pitch.tables.values() for row in table.values())
    assert entries <= 50 * len(adapt.ORDERS)
    assert sum(c for table in [a._pitch.tables[2]] for row in table.values() for c in row.values()) <= 50


def test_never_much_worse_than_the_model_on_a_player_who_never_repeats():
    """Random pitches under a model that knows their distribution: the session's counts only mislead, and the
    Bayesian mixture must keep the loss within 1 % of the model's."""
    rng = np.random.default_rng(2)
    model = np.zeros(128)
    model[40:90] = 1 / 50
    a = SessionAdapter(1000)
    plain = adapted = 0.0
    for p in rng.integers(40, 90, 3000):
        plain -= np.log(model[p])
        adapted -= np.log(a.mix(model)[p])
        a.observe(int(p), model)
    assert adapted <= 1.01 * plain


def test_memory_must_be_positive():
    with pytest.raises(ValueError, match="memory = 0"):
        SessionAdapter(0)


@pytest.fixture(scope="module")
def factory(tmp_path_factory):
    return make_step_model(tmp_path_factory.mktemp("m") / "m.onnx", num_features=4, seed=7, context=100)


def test_improviser_plays_the_players_motif_back_greedily(factory):
    model = StepModel(factory.path)
    greedy = Decoding(temperature=0.0, velocity="fixed")
    phrase = np.array([[p, 0.2, 0.15, 90] for p in MOTIF * 4 + MOTIF[:3]], dtype=np.float64)

    def answer(adapter):
        imp = Improviser(model, greedy, adapter=adapter)
        for row in phrase:
            imp.feed(row, player=True)
        out = []
        for _ in range(3):
            row = imp.predict()
            out.append(int(row[0]))
            imp.feed(row)
        return out

    plain, adapted = answer(None), answer(SessionAdapter(1000))
    assert adapted == MOTIF[3:6]
    assert plain != MOTIF[3:6]  # the random test model does not play the motif by itself


def test_snapshot_restores_the_adapter_context(factory):
    imp = Improviser(StepModel(factory.path), Decoding(temperature=0.0), adapter=SessionAdapter(100))
    for p in MOTIF:
        imp.feed([p, 0.2, 0.1, 80], player=True)
    snap = imp.snapshot()
    imp.feed([30, 0.2, 0.1, 80])
    assert imp.adapter.context()[-1] == 30
    imp.restore(snap)
    assert imp.adapter.context()[-1] == MOTIF[-1]


def test_forget_is_a_button():
    m = ControlMap(ControlConfig(forget=85))
    cc = lambda v: mido.Message("control_change", control=85, value=v)  # noqa: E731
    assert [m.handle(cc(v)) for v in (0, 127, 127, 0, 100)] == [[], [Action("forget")], [], [], [Action("forget")]]


def test_engine_learns_from_the_player_and_forgets_by_cc_and_by_call(factory):
    config_imp = improvise(adapt="cache", adapt_memory=200, max_notes=2)
    rig = Rig(factory, config_imp)
    rig.engine._control = ControlMap(ControlConfig(forget=85))
    try:
        assert rig.engine.adapter is not None
        rig.play(MOTIF, time.perf_counter() - 1.0)
        rig.wait_answers(1)
        assert rig.engine.adapter.counted == len(MOTIF)  # the player's notes, not improvd's answer
        rig.engine.input_queue.put((time.perf_counter(), mido.Message("control_change", control=85, value=127)))
        deadline = time.perf_counter() + 2
        while rig.engine.adapter.counted and time.perf_counter() < deadline:
            time.sleep(0.01)
        assert rig.engine.adapter.counted == 0
        rig.play(MOTIF, time.perf_counter() - 1.0)
        rig.wait_answers(2)
        assert rig.engine.adapter.counted == len(MOTIF)
        rig.engine.forget()  # the public method (any thread)
        deadline = time.perf_counter() + 2
        while rig.engine.adapter.counted and time.perf_counter() < deadline:
            time.sleep(0.01)
        assert rig.engine.adapter.counted == 0
    finally:
        rig.close()


def test_adapt_off_by_default_has_no_adapter(factory):
    rig = Rig(factory, improvise())
    try:
        assert rig.engine.adapter is None
    finally:
        rig.close()


def test_config_keys():
    c = Config()
    assert c.improvise.adapt == "off" and c.improvise.adapt_memory >= 1 and c.control.forget == -1
