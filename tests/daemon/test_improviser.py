import numpy as np
import pytest

from improvd.daemon.predict.improviser import Decoding, Improviser
from improvd.daemon.predict.model import StepModel
from harness.modelfactory import make_step_model

PRIME = np.array([[60, 0.0, 0.2, 80], [62, 0.25, 0.2, 90], [64, 0.25, 0.2, 100], [65, 0.25, 0.4, 70],
                  [67, 0.5, 0.3, 60]])
GREEDY = Decoding(temperature=0.0, pitch_range=(21, 108), step_range=(0.0, 2.0), duration_range=(0.03, 4.0),
                  velocity="model")


@pytest.fixture(scope="module")
def factory(tmp_path_factory):
    return make_step_model(tmp_path_factory.mktemp("m") / "m.onnx", num_features=4, layers=2, context=100)


def generate(imp: Improviser, prime, n):
    imp.prime(prime)
    out = []
    for _ in range(n):
        row = imp.predict()
        out.append(row)
        imp.feed(row)
    return np.array(out)


def test_greedy_equals_reference(factory):
    imp = Improviser(StepModel(factory.path), GREEDY)
    got = generate(imp, PRIME, 20)
    expected = factory.greedy_continuation(PRIME, 20, pitch_range=(21, 108), step_range=(0.0, 2.0),
                                           duration_range=(0.03, 4.0))
    np.testing.assert_array_equal(got[:, 0], expected[:, 0])
    np.testing.assert_allclose(got[:, 1:3], expected[:, 1:3], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got[:, 3], expected[:, 3])
    assert len(set(got[:, 0])) > 1  # the test model does not just repeat one pitch


def test_greedy_ignores_rng_and_clamps(factory):
    narrow = Decoding(temperature=0.0, pitch_range=(50, 55), step_range=(0.2, 0.21), duration_range=(0.5, 0.6))
    got = generate(Improviser(StepModel(factory.path), narrow, rng=np.random.default_rng(1)), PRIME, 10)
    assert np.all((got[:, 0] >= 50) & (got[:, 0] <= 55))
    assert np.all((got[:, 1] >= 0.2) & (got[:, 1] <= 0.21))
    assert np.all((got[:, 2] >= 0.5) & (got[:, 2] <= 0.6))


def test_predict_before_feed_raises(factory):
    imp = Improviser(StepModel(factory.path), GREEDY)
    with pytest.raises(ValueError, match="feed at least one note"):
        imp.predict()


def test_sampling_reproducible_with_seed(factory):
    model = StepModel(factory.path)
    d = Decoding(temperature=1.0, top_p=0.9)
    a = generate(Improviser(model, d, rng=np.random.default_rng(5)), PRIME, 15)
    b = generate(Improviser(model, d, rng=np.random.default_rng(5)), PRIME, 15)
    c = generate(Improviser(model, d, rng=np.random.default_rng(6)), PRIME, 15)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_repriming_over_last_context_notes(tmp_path):
    context = 4
    ref = make_step_model(tmp_path / "m.onnx", context=context)
    imp = Improviser(StepModel(ref.path), GREEDY)
    rng = np.random.default_rng(0)
    seq = np.column_stack([rng.integers(40, 80, 23), rng.uniform(0, 0.5, 23), rng.uniform(0.05, 1, 23),
                           rng.integers(30, 120, 23)]).astype(np.float64)
    state, since, history = ref.zero_state(), 0, []
    for i, row in enumerate(seq):
        imp.feed(row)
        history.append(row)
        since += 1
        if since > context:  # the documented rule: rebuild from zero over the last C notes
            state = ref.zero_state()
            for past in history[-context:]:
                out = ref.step(past[None, :3], state)
                state = out["state_out"]
            since = 0
        else:
            out = ref.step(row[None, :3], state)
            state = out["state_out"]
        assert imp.since_priming == since, i
        np.testing.assert_allclose(imp.prediction.state, state, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(imp.prediction.pitch_logits, out["pitch_logits"], rtol=1e-4, atol=1e-4)
    assert imp.fed == len(seq)
    np.testing.assert_array_equal(imp.history, seq[-context:])


def test_repriming_is_spread_over_the_cycle_and_gives_the_same_outputs(tmp_path):
    """The rebuild at k = C + 1 comes from a second state fed beside the main one (no C-step spike): its outputs
    equal those of the rule done at once (zero state, feed the last C notes) through the same StepModel, over
    several cycles and across a snapshot taken mid-cycle and restored."""
    context = 5
    ref = make_step_model(tmp_path / "m.onnx", num_features=4, context=context)
    model = StepModel(ref.path)
    imp = Improviser(model, GREEDY)
    rng = np.random.default_rng(3)
    seq = np.column_stack([rng.integers(40, 80, 40), rng.uniform(0, 0.5, 40), rng.uniform(0.05, 1, 40),
                           rng.integers(30, 120, 40)]).astype(np.float64)
    calls = []
    run = model.run
    model.run = lambda note, state: calls.append(len(note)) or run(note, state)
    state, since, history, snap = model.zero_state(1), 0, [], None
    for i, row in enumerate(seq):
        if i == 23:
            snap = (imp.snapshot(), state, since, list(history))
            imp.feed(seq[0])  # fed, then undone
            imp.feed(seq[1])
            imp.restore(snap[0])
        calls.clear()
        imp.feed(row)
        assert calls in ([1], [2]), i  # one model call per note, never a rebuild of C steps
        history.append(row)
        since += 1
        if since > context:
            state = model.zero_state(1)
            for past in history[-context:]:
                out = run(past[None, :], state)
                state = out.state
            since = 0
        else:
            out = run(row[None, :], state)
            state = out.state
        assert imp.since_priming == since, i
        np.testing.assert_allclose(imp.prediction.state, out.state, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(imp.prediction.pitch_logits, out.pitch_logits, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(imp.prediction.step, out.step, rtol=1e-6, atol=1e-7)
        assert imp.prediction.pitch_logits.shape == (1, 128) and imp.prediction.velocity.shape == (1,)


def test_snapshot_restore(factory):
    imp = Improviser(StepModel(factory.path), GREEDY)
    imp.prime(PRIME)
    before = imp.predict()
    snap = imp.snapshot()
    imp.feed([70, 0.1, 0.1, 50])
    imp.feed([71, 0.1, 0.1, 50])
    assert not np.array_equal(imp.predict(), before)
    imp.restore(snap)
    np.testing.assert_array_equal(imp.predict(), before)
    assert imp.fed == len(PRIME)


def test_velocity_follow_uses_hint_or_recent_notes(factory):
    d = Decoding(temperature=0.0, velocity="follow")
    imp = Improviser(StepModel(factory.path), d)
    imp.prime(PRIME)
    assert imp.predict()[3] == round(np.mean(PRIME[:, 3]))
    assert imp.predict(velocity_hint=33.0)[3] == 33
    fixed = Improviser(StepModel(factory.path), Decoding(temperature=0.0, velocity="fixed", fixed_velocity=77))
    fixed.prime(PRIME)
    assert fixed.predict(velocity_hint=33.0)[3] == 77
