"""The engine driven through its input queue, playing on a queue-backed fake output through a real scheduler.

Real time is used (the engine waits on its queue), with short silences and steps so the whole file runs in a few
seconds. Every played note is checked against the numpy twin of the model (harness/modelfactory.py).
"""

import time

import mido
import numpy as np
import pytest

from improvd.daemon.predict.model import StepModel
from harness.engines import Rig
from harness.engines import engine_improvise as improvise
from harness.fakes import balanced
from harness.modelfactory import make_step_model


def note_ons(sent):
    return [(t, m) for t, m in sent if m.type == "note_on" and m.velocity > 0]


def check_against_reference(refs, events, imp, *, respond=True):
    """Replay the fed sequence through the numpy twin: each played note must be its greedy choice."""
    states = {}
    outs = {}
    prev_kind = None
    prev_onset = None
    played = 0
    for kind, row, onset, path in events:
        out = outs.get(path)
        if kind == "played":
            assert out is not None
            logits = out["pitch_logits"][0].astype(np.float64)
            masked = np.full(128, -np.inf)
            masked[imp.pitch_range[0]:imp.pitch_range[1] + 1] = logits[imp.pitch_range[0]:imp.pitch_range[1] + 1]
            assert row[0] == np.argmax(masked)
            assert row[2] == pytest.approx(np.clip(out["duration"][0], *imp.duration_range), rel=1e-5, abs=1e-6)
            step = float(np.clip(out["step"][0], *imp.step_range))
            assert row[1] >= step - 1e-6  # never earlier than predicted
            if prev_kind == "played" and respond:  # inside an answer: exactly the predicted step
                assert row[1] == pytest.approx(step, rel=1e-5, abs=1e-6)
                assert onset - prev_onset == pytest.approx(step, abs=1e-6)
            played += 1
        # every model sees the whole fed sequence (a swap primes the new one with the history)
        for p, r in refs.items():
            st = states.get(p, r.zero_state())
            o = r.step(row[None, :3], st)
            states[p], outs[p] = o["state_out"], o
        prev_kind, prev_onset = kind, onset
    return played


@pytest.fixture(scope="module")
def fast_model(tmp_path_factory):
    return make_step_model(tmp_path_factory.mktemp("m") / "fast.onnx", seed=3, context=200, step_scale=0.06,
                           duration_scale=0.08)


@pytest.fixture(scope="module")
def slow_model(tmp_path_factory):
    return make_step_model(tmp_path_factory.mktemp("m") / "slow.onnx", seed=4, context=200, step_scale=0.6,
                           duration_scale=2.0)


def test_answers_a_phrase_with_the_greedy_notes(fast_model):
    imp = improvise(max_notes=6)
    rig = Rig(fast_model, imp, output_channel=3)
    try:
        t0 = time.perf_counter() - 1.0  # the phrase happened a second ago: the silence has passed
        rig.play([60, 62, 64, 65, 67], t0)
        summary = rig.wait_answers(1)
    finally:
        rig.close()
    assert summary["notes_heard"] == 5 and summary["notes_played"] == 6 and not summary["interrupted"]
    assert summary["inference_ms"] > 0 and summary["mode"] == "respond"
    heard = [e for e in rig.events if e[0] == "heard"]
    np.testing.assert_allclose([e[1] for e in heard], [[60, 0, 0.05, 100]] + [[p, 0.1, 0.05, 100]
                                                                              for p in (62, 64, 65, 67)], atol=1e-9)
    assert check_against_reference({fast_model.path: fast_model}, rig.events, imp) == 6
    played = [e for e in rig.events if e[0] == "played"]
    ons = note_ons(rig.sent)
    assert [m.note for _, m in ons] == [int(e[1][0]) for e in played]
    assert all(m.channel == 2 and m.velocity == 77 for _, m in ons)
    for (t_sent, _), (_, _, onset, _) in zip(ons, played):
        # Sent at its absolute deadline, never early. The bound is loose because shared test machines can starve
        # a thread for tens of ms; precision is measured by the fake-clock scheduler tests and bench/live_timing.py.
        assert 0 <= t_sent - onset < 0.1
    assert balanced(rig.sent)


def test_waits_for_the_silence_and_held_keys(fast_model):
    rig = Rig(fast_model, improvise(silence=0.15, max_notes=2))
    try:
        now = time.perf_counter()
        rig.engine.input_queue.put((now, mido.Message("note_on", note=60, velocity=90)))
        rig.engine.input_queue.put((now, mido.Message("note_on", note=64, velocity=90)))
        rig.engine.input_queue.put((now + 0.01, mido.Message("note_off", note=60)))
        time.sleep(0.25)  # a key is still held: no answer, however long
        assert rig.port.drain() == [] and rig.summaries == []
        released = time.perf_counter()
        rig.engine.input_queue.put((released, mido.Message("note_off", note=64)))
        rig.wait_sent(lambda s: len(note_ons(s)) >= 1)
        first = note_ons(rig.sent)[0][0]
        assert 0.15 <= first - released < 0.15 + 0.1
        rig.wait_answers(1)
    finally:
        rig.close()
    assert balanced(rig.sent)


@pytest.mark.parametrize("lookahead_s", [0.05, 0.5])
def test_player_interrupts_an_answer(slow_model, lookahead_s):
    # With a long look-ahead, notes handed to the scheduler but not started are taken back out of the model state.
    rig = Rig(slow_model, improvise(max_notes=30, max_seconds=60.0), lookahead_s=lookahead_s)
    try:
        rig.play([60, 64, 67], time.perf_counter() - 1.0)
        rig.wait_sent(lambda s: len(note_ons(s)) >= 1)
        t_interrupt = time.perf_counter()
        rig.engine.input_queue.put((t_interrupt, mido.Message("note_on", note=72, velocity=100)))
        summary = rig.wait_answers(1)
        time.sleep(0.05)
        rig.sent += rig.port.drain()
        assert summary["interrupted"]
        assert summary["notes_played"] == len(note_ons(rig.sent)) < 30
        after = [(t, m) for t, m in rig.sent if t > t_interrupt]
        assert all(m.type == "note_off" for _, m in after)
        assert all(t - t_interrupt < 0.1 for t, _ in after)  # silent at once (loose bound: loaded machines)
        assert balanced(rig.sent) and rig.scheduler.sounding() == frozenset()
        # the interrupting note becomes the next phrase, answered after its release and the silence
        released = time.perf_counter()
        rig.engine.input_queue.put((released, mido.Message("note_off", note=72)))
        rig.wait_sent(lambda s: any(t > released + 0.05 for t, _ in note_ons(s)))
    finally:
        rig.close()
    assert balanced(rig.sent)
    # What the model was fed is the greedy continuation of what was heard and actually played: the notes handed but
    # never started (reported by on_note_played, not counted in notes_played) were taken back.
    i_next = next(i for i, e in enumerate(rig.events) if e[0] == "heard" and e[1][0] == 72)
    played = [e for e in rig.events[:i_next] if e[0] == "played"]
    assert len(played) >= summary["notes_played"]
    if lookahead_s > 0.3:
        assert len(played) > summary["notes_played"]  # something was handed ahead and taken back
    events = [e for e in rig.events[:i_next] if e[0] == "heard"] + played[:summary["notes_played"]] + \
        rig.events[i_next:]
    check_against_reference({slow_model.path: slow_model}, events, improvise())


def test_stop_mid_answer_releases_everything(slow_model):
    rig = Rig(slow_model, improvise(max_notes=30, max_seconds=60.0))
    rig.play([60, 62], time.perf_counter() - 1.0)
    rig.wait_sent(lambda s: len(note_ons(s)) >= 1)
    rig.close()
    assert rig.summaries and rig.summaries[-1]["interrupted"]
    assert balanced(rig.sent) and rig.scheduler.sounding() == frozenset()


def test_continuous_mode_plays_on_and_incorporates_player_notes(fast_model):
    imp = improvise(mode="continuous", max_notes=5)
    rig = Rig(fast_model, imp)
    try:
        rig.play([60, 62, 64], time.perf_counter() - 1.0)
        rig.wait_sent(lambda s: len(note_ons(s)) >= 3)
        now = time.perf_counter()
        rig.engine.input_queue.put((now, mido.Message("note_on", note=48, velocity=60)))  # no interruption
        rig.engine.input_queue.put((now + 0.03, mido.Message("note_off", note=48)))
        n_before = len(note_ons(rig.sent))
        rig.wait_sent(lambda s: len(note_ons(s)) >= n_before + 8)
        rig.wait_answers(2)
    finally:
        rig.close()
    kinds = [e[0] for e in rig.events]
    i_player = max(i for i, k in enumerate(kinds) if k == "heard")
    assert kinds[:3] == ["heard"] * 3 and rig.events[i_player][1][0] == 48
    assert "played" in kinds[3:i_player] and "played" in kinds[i_player + 1:]
    assert rig.summaries[0]["mode"] == "continuous" and rig.summaries[0]["notes_played"] == 5
    assert not any(s["interrupted"] for s in rig.summaries[:-1])
    assert check_against_reference({fast_model.path: fast_model}, rig.events, imp, respond=False) >= 8
    assert balanced(rig.sent)


def test_hot_swap_between_phrases(fast_model, tmp_path):
    other = make_step_model(tmp_path / "other.onnx", seed=11, context=200, step_scale=0.06, duration_scale=0.08)
    imp = improvise(max_notes=4)
    rig = Rig(fast_model, imp)
    try:
        swapped = {}

        def on_played(row, onset):
            if not swapped:  # requested mid-answer: must not apply until the answer is over
                swapped["at"] = len(rig.events)
                rig.engine.request_swap(rig.config.replace(improvise=improvise(max_notes=3)), StepModel(other.path))

        rig.on_played = on_played
        rig.play([60, 62, 64], time.perf_counter() - 1.0)
        first = rig.wait_answers(1)
        rig.play([67, 65], time.perf_counter() + 0.01, spacing_s=0.03, hold_s=0.02)
        second = rig.wait_answers(2)
    finally:
        rig.close()
    assert first["notes_played"] == 4 and second["notes_played"] == 3
    paths = [e[3] for e in rig.events if e[0] == "played"]
    assert paths == [fast_model.path] * 4 + [other.path] * 3
    assert rig.engine.model.path == other.path and rig.engine.config.improvise.max_notes == 3
    refs = {fast_model.path: fast_model, other.path: other}
    assert check_against_reference(refs, rig.events, imp) == 7
    assert balanced(rig.sent)


def test_garbage_input_is_ignored(fast_model):
    rig = Rig(fast_model, improvise(max_notes=2))
    try:
        for item in ("junk", (1.0,), (float("nan"), mido.Message("note_on")), (1.0, "not a message"),
                     (time.perf_counter(), mido.Message("sysex", data=[1, 2, 3]))):
            rig.engine.input_queue.put(item)
        rig.play([60, 61], time.perf_counter() - 1.0)
        assert rig.wait_answers(1)["notes_played"] == 2
    finally:
        rig.close()
