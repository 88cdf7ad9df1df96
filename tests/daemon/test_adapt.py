"""Session adaptation (daemon/predict/adapt.py) and its use by the Improviser, the engine and the control map."""

import time

import mido
import numpy as np
import pytest

from improvd.daemon.predict import adapt, timing
from improvd.daemon.predict.adapt import SessionAdapter
from improvd.core.config import Config, ControlConfig
from improvd.daemon.control.cc import Action, ControlMap
from improvd.daemon.predict.improviser import Decoding, Improviser
from improvd.daemon.predict.model import StepModel
from harness.engines import Rig
from harness.engines import engine_improvise as improvise
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
    counts = a.counts()
    entries = sum(len(row) for row in counts["pitch"].values())
    assert entries <= 50 * len(adapt.ORDERS)
    assert sum(c for ctx, row in counts["pitch"].items() if len(ctx) == 2 for c in row.values()) == 50
    assert sum(c for ctx, row in counts["interval"].items() if len(ctx) == 3 for c in row.values()) == 50


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


class NaiveAdapter:
    """The adapter's mathematics written out the slow way, for the fast one to be checked against: every
    expert's chain as dense arrays, the counts recounted from the whole history at every note."""

    def __init__(self, memory):
        self.memory = memory
        self.forget()

    def forget(self):
        self.played = []   # every pitch since the last forget: (pitch, learned)
        self.learned = []  # per learned note: (the pitches before it, at most MAX_ORDER + 1; its pitch)
        k = 1 + len(adapt.MIN_ORDERS) + len(adapt.INTERVAL_MIN)
        self.weights = [[m] + [(1 - m) / (k - 1)] * (k - 1) for m in adapt.MODEL_PRIOR]

    def context(self):
        return [p for p, _ in self.played][-(adapt.MAX_ORDER + 1):]

    def _row(self, kind, n):
        """What followed the current context of n pitches in the counted notes: {pitch: count}."""
        ctx = self.context()
        if len(ctx) < n:
            return {}
        row = {}
        for before, pitch in self.learned[-self.memory:]:
            if len(before) < n:
                continue
            if kind == "pitch" and before[-n:] == ctx[-n:]:
                row[pitch] = row.get(pitch, 0) + 1
            elif kind == "interval" and np.array_equal(np.diff(before[-n:]), np.diff(ctx[-n:])):
                target = ctx[-1] + pitch - before[-1]  # the same interval from the last pitch now
                if 0 <= target < 128:
                    row[target] = row.get(target, 0) + 1
        return row

    def _matched(self):
        best = 0
        for n in adapt.ORDERS:
            if self._row("pitch", n):
                best = max(best, n)
        ctx = self.context()
        for n in adapt.INTERVAL_SPANS:  # a context met, even when every pitch it leads to is out of range
            if len(ctx) >= n and any(len(b) >= n and np.array_equal(np.diff(b[-n:]), np.diff(ctx[-n:]))
                                     for b, _ in self.learned[-self.memory:]):
                best = max(best, n)
        return best

    def experts(self, model):
        out = [model.copy()]
        for kind, spans, lowest in (("pitch", adapt.ORDERS, adapt.MIN_ORDERS),
                                    ("interval", adapt.INTERVAL_SPANS, adapt.INTERVAL_MIN)):
            for m in lowest:
                p = model.copy()
                for n in spans:
                    row = self._row(kind, n) if n >= m else {}
                    if row:
                        counts = np.zeros(128)
                        for pitch, c in row.items():
                            counts[pitch] = c
                        u = adapt.ESCAPE * len(row)
                        p = (counts + u * p) / (counts.sum() + u)
                out.append(p)
        return out

    def mix(self, model):
        """(the mixture, the experts, the matched context length) now."""
        matched = self._matched()
        experts = self.experts(model)
        w = self.weights[sum(matched >= e for e in adapt.BUCKETS) - 1]
        return sum(wk * p for wk, p in zip(w, experts)), experts, matched

    def observe(self, pitch, model, learn=True):
        if learn:
            matched = self._matched()
            if model is not None and matched:
                b = sum(matched >= e for e in adapt.BUCKETS) - 1
                w = [wk * max(p[pitch], adapt.FLOOR) for wk, p in zip(self.weights[b], self.experts(model))]
                self.weights[b] = [wk / sum(w) * (1 - adapt.SHARE) + adapt.SHARE / len(w) for wk in w]
            self.learned.append((self.context(), pitch))
        self.played.append((pitch, learn))


@pytest.mark.parametrize("seed", range(4))
def test_the_fast_mixture_equals_the_straightforward_computation(seed):
    """Random sessions (a few motifs, transposed, near the ends of the pitch range too, the player's notes and
    improvd's, a memory that overflows, a forget): the adapter's mixture, its experts and its weights equal the
    dense computation of the same mathematics at every note."""
    rng = np.random.default_rng(seed)
    memory = int(rng.integers(40, 80))
    fast, slow = SessionAdapter(memory), NaiveAdapter(memory)
    base = int(rng.choice([3, 60, 116]))
    tune = [base + int(p) for p in rng.integers(-3, 12, 10)]  # played again and again, at times transposed
    stream = []
    while len(stream) < 200:
        r = rng.random()
        if r < 0.6:
            stream += tune
        elif r < 0.8:
            stream += [p + int(rng.choice([3, -5])) for p in tune[:int(rng.integers(4, 10))]]
        else:
            stream += [int(p) for p in rng.integers(base - 3, base + 12, rng.integers(1, 4))]
    matched_seen = set()
    model = None
    for i, pitch in enumerate(stream):
        pitch = int(np.clip(pitch, 0, 127))
        if i == 120:
            fast.forget()
            slow.forget()
        if model is not None:
            mixed, experts, matched = slow.mix(model)
            matched_seen.add(matched)
            np.testing.assert_allclose(fast.mix(model), mixed, rtol=1e-12, atol=1e-15)
            for got, want in zip(fast.expert_probs(model), experts):
                np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)
        learn = bool(rng.random() < 0.85)
        fast.observe(pitch, model, learn=learn)
        slow.observe(pitch, model, learn=learn)
        np.testing.assert_allclose(fast.weights, slow.weights, rtol=1e-12)
        model = rng.dirichlet(np.full(128, 0.3))
    assert fast.counted == min(memory, sum(1 for _, learned in slow.played if learned))  # (since the forget)
    assert matched_seen == {0, 2, 4, 8, 16}  # every weight row is used, the longest contexts too


RHYTHM = [(0.25, 0.2), (0.125, 0.1), (0.125, 0.1), (0.5, 0.45), (0.75, 0.3)]  # a distinctive rhythm


def play_timed(a, pitches, rhythm, model_timing=(0.3, 0.3)):
    for p, (step, duration) in zip(pitches, rhythm):
        a.observe(p, UNIFORM, timing=(step, duration), model_timing=model_timing)


def test_timing_equals_the_model_until_something_repeats():
    a = SessionAdapter(100)
    assert a.timing(0.3, 0.2) == (0.3, 0.2)
    play_timed(a, [60, 62, 64], RHYTHM)
    assert a.timing(0.3, 0.2) == (0.3, 0.2)  # pitches 62 64 and the last two rhythms never met before


def test_a_repeated_rhythm_is_predicted_and_forget_clears_it():
    """A model that always says 0.3 s: after the player repeats a motif with its rhythm, the step and duration
    of the motif's next note come from the session: nearly all the way when pitches and rhythm both match, part
    of the way by its pitches alone (played in another rhythm) or by its rhythm alone (on other pitches), as
    the expert that did not match is the model."""
    both, by_pitch, by_rhythm = SessionAdapter(1000), SessionAdapter(1000), SessionAdapter(1000)
    for a in (both, by_pitch, by_rhythm):
        for _ in range(6):
            play_timed(a, MOTIF[:5], RHYTHM)
    play_timed(both, MOTIF[:3], RHYTHM[:3])
    play_timed(by_pitch, MOTIF[:3], [(0.3, 0.3)] * 3)
    play_timed(by_rhythm, [40, 41, 42], RHYTHM[:3])
    for a, part in ((both, 0.7), (by_pitch, 0.2), (by_rhythm, 0.3)):
        step, duration = a.timing(0.3, 0.3)
        assert (step - 0.3) > part * (RHYTHM[3][0] - 0.3)  # towards the motif's next step, 0.5
        assert (duration - 0.3) > part * (RHYTHM[3][1] - 0.3)
    both.forget()
    play_timed(both, MOTIF[:3], RHYTHM[:3])
    assert both.timing(0.3, 0.3) == (0.3, 0.3)


def test_timing_never_much_worse_than_the_model_on_a_player_who_never_repeats():
    """Random pitches and steps, and a model that predicts their median: the session's followers only mislead,
    and the mixture must keep the step error within 2 % of the model's."""
    rng = np.random.default_rng(4)
    a = SessionAdapter(1000)
    plain = adapted = 0.0
    for p, step in zip(rng.integers(40, 90, 3000), rng.choice([0.125, 0.25, 0.375, 0.5], 3000)):
        plain += abs(0.3125 - step)
        adapted += abs(a.timing(0.3125, 0.3)[0] - step)
        a.observe(int(p), UNIFORM, timing=(step, 0.3), model_timing=(0.3125, 0.3))
    assert adapted <= 1.02 * plain


def test_timing_memory_stays_bounded_and_pitch_only_leaves_timing_alone():
    rng = np.random.default_rng(5)
    a = SessionAdapter(50)
    for p in rng.integers(40, 90, 3000):
        a.observe(int(p), UNIFORM, timing=(float(rng.choice([0.1, 0.2, 0.3])), 0.2), model_timing=(0.2, 0.2))
    cache = a._timing
    assert len(cache._added) == 50
    assert len(cache._by_pitch) <= 50 * len(timing.TIMING_PITCH_ORDERS)
    assert len(cache._by_rhythm) <= 50 * len(timing.TIMING_RHYTHM_ORDERS)
    pitch_only = SessionAdapter(100, timing=False)
    for _ in range(4):
        play_timed(pitch_only, MOTIF[:5], RHYTHM)
    assert pitch_only.timing(0.3, 0.3) == (0.3, 0.3) and not pitch_only.adapts_timing


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
    rig = Rig(factory, config_imp, control=ControlConfig(forget=85))
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
