import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from harness.fakes import FakeClock, balanced_in_total
from improvd.daemon.live.scheduler import Scheduler


class Out:
    """A fake output: records (clock time, message) of every send."""

    def __init__(self, clock=None):
        self.clock = clock
        self.sent = []

    def send(self, msg):
        self.sent.append((self.clock.now() if self.clock else time.perf_counter(), msg))

    def kinds(self):
        return [(m.type, m.note) for _, m in self.sent]


def fake_scheduler(**kw):
    clock = FakeClock()
    out = Out(clock)
    return clock, out, Scheduler(out.send, now=clock.now, sleep=clock.sleep, wait=clock.wait, **kw)


def test_order_and_absolute_deadlines_without_thread():
    clock, out, s = fake_scheduler()
    t0 = clock.t
    s.schedule_note(t0 + 0.5, t0 + 0.7, 64, 90)
    s.schedule_note(t0 + 0.1, t0 + 0.3, 60, 80, channel=2)
    s.schedule_note(t0 + 0.1, t0 + 0.2, 67, 70)  # same onset: scheduling order decides
    assert s.pending() == 6 and s.next_due_s() == pytest.approx(t0 + 0.1)
    for due in (0.1, 0.2, 0.3, 0.5, 0.7):
        clock.t = t0 + due
        s.run_pending()
    assert out.kinds() == [("note_on", 60), ("note_on", 67), ("note_off", 67), ("note_off", 60),
                           ("note_on", 64), ("note_off", 64)]
    assert [round(t - t0, 6) for t, _ in out.sent] == [0.1, 0.1, 0.2, 0.3, 0.5, 0.7]
    assert out.sent[0][1].channel == 2 and out.sent[0][1].velocity == 80
    st_ = s.stats()
    assert st_["sent"] == 6 and st_["late"] == 0 and st_["max_ms"] == 0 and st_["pending"] == 0


def test_thread_with_fake_clock_hits_deadlines():
    clock, out, s = fake_scheduler()
    t0 = clock.t
    done = threading.Event()
    s.on_sent = lambda t, m: len(out.sent) == 40 and done.set()
    for k in range(20):
        s.schedule_note(t0 + 0.05 + 0.1 * k, t0 + 0.1 + 0.1 * k, 60 + k, 100)
    s.start()
    assert done.wait(5.0)
    s.stop()
    dues = sorted([0.05 + 0.1 * k for k in range(20)] + [0.1 + 0.1 * k for k in range(20)])
    for (t, _), due in zip(out.sent, dues):
        assert 0 <= t - (t0 + due) < 1e-4  # spun up to the deadline, never early
    assert s.stats()["p99_ms"] < 0.1
    assert balanced_in_total(out.sent)


def test_lateness_stats_and_on_sent():
    clock, out, s = fake_scheduler()
    seen = []
    s.on_sent = lambda t, m: seen.append((t, m.type))
    t0 = clock.t
    s.schedule_note(t0, t0 + 1, 60, 100)
    clock.t = t0 + 0.003
    s.run_pending()
    stats = s.stats()
    assert stats["late"] == 1 and stats["max_ms"] == pytest.approx(3.0) and stats["last_ms"] == pytest.approx(3.0)
    assert stats["sounding"] == 1 and stats["pending"] == 1
    assert seen == [(t0 + 0.003, "note_on")]


def test_retrigger_sends_note_off_first_and_skips_stale_off():
    clock, out, s = fake_scheduler()
    t0 = clock.t
    s.schedule_note(t0 + 0.0, t0 + 1.0, 60, 100)
    s.schedule_note(t0 + 0.5, t0 + 1.5, 60, 90)
    for due in (0.0, 0.5, 1.0, 1.5):
        clock.t = t0 + due
        s.run_pending()
    assert [(round(t - t0, 3), m.type, m.velocity) for t, m in out.sent] == [
        (0.0, "note_on", 100), (0.5, "note_off", 0), (0.5, "note_on", 90), (1.5, "note_off", 0)]


def test_cancel_by_owner_releases_at_once_and_drops_pending():
    clock, out, s = fake_scheduler()
    t0 = clock.t
    a, b = object(), object()
    s.schedule_note(t0, t0 + 1.0, 60, 100, owner=a)
    s.schedule_note(t0 + 0.2, t0 + 1.0, 62, 100, owner=a)
    s.schedule_note(t0, t0 + 1.0, 48, 100, owner=b)
    s.run_pending()
    assert s.sounding() == {(0, 60), (0, 48)}
    clock.t = t0 + 0.1
    assert s.cancel(a) == 1
    assert out.kinds()[-1] == ("note_off", 60) and out.sent[-1][0] == t0 + 0.1
    assert s.sounding() == {(0, 48)}
    clock.t = t0 + 2.0
    s.run_pending()
    assert ("note_on", 62) not in out.kinds()  # a's pending note never starts
    assert out.kinds()[-1] == ("note_off", 48)  # b's note is untouched
    assert balanced_in_total(out.sent)


def test_cancel_all_and_stop_release_everything():
    clock, out, s = fake_scheduler()
    t0 = clock.t
    s.schedule_note(t0, t0 + 5, 60, 100)
    s.schedule_note(t0, t0 + 5, 61, 100, channel=3)
    s.run_pending()
    s.cancel()
    assert s.sounding() == frozenset() and s.pending() == 0 and balanced_in_total(out.sent)
    s.schedule_note(t0, t0 + 5, 62, 100)
    s.run_pending()
    s.stop()
    assert balanced_in_total(out.sent)
    ons = sum(m.type == "note_on" for _, m in out.sent)
    stats = s.stats()
    assert stats["note_ons"] == stats["note_offs"] == ons  # what the final stats line reports is what was sent and s.sounding() == frozenset()


def test_send_failure_is_survived_and_logged_once(caplog):
    clock = FakeClock()
    sent = []

    def send(msg):
        if msg.note == 61:
            raise OSError("port gone")
        sent.append(msg)

    s = Scheduler(send, now=clock.now, sleep=clock.sleep, wait=clock.wait)
    for p in (61, 61, 60):
        s.schedule_note(clock.t, clock.t + 1, p, 100)
    s.run_pending()
    assert s.sounding() == {(0, 60)}
    assert s.stats()["failed"] == 2
    assert sum("sending to the MIDI output failed" in r.message for r in caplog.records) == 1


def test_real_thread_earlier_event_wakes_it():
    out = Out()
    s = Scheduler(out.send)
    got = threading.Event()
    s.on_sent = lambda t, m: m.note == 72 and got.set()
    s.start()
    try:
        now = time.perf_counter()
        s.schedule_note(now + 100, now + 101, 60, 100)  # the thread now waits ~100 s
        s.schedule_note(now + 0.02, now + 0.03, 72, 100)
        assert got.wait(1.0)
        t_sent = out.sent[0][0]
        assert now + 0.02 <= t_sent < now + 0.1
    finally:
        s.stop(timeout=1.0)
    assert not s.running


def test_real_thread_cancel_wakes_it_and_stop_releases():
    out = Out()
    s = Scheduler(out.send)
    started = threading.Event()
    s.on_sent = lambda t, m: m.type == "note_on" and started.set()
    s.start()
    try:
        now = time.perf_counter()
        s.schedule_note(now, now + 100, 60, 100)
        s.schedule_note(now, now + 100, 64, 100)
        assert started.wait(1.0)
        released = threading.Event()
        s.on_sent = lambda t, m: len(out.sent) == 4 and released.set()
        t_cancel = time.perf_counter()
        assert s.cancel() == 2
        assert released.wait(1.0)
        assert out.sent[-1][0] - t_cancel < 0.05
        s.schedule_note(time.perf_counter(), time.perf_counter() + 100, 67, 100)
        deadline = time.perf_counter() + 1.0
        while s.sounding() != {(0, 67)} and time.perf_counter() < deadline:
            time.sleep(0.001)
        assert s.sounding() == {(0, 67)}
    finally:
        t_stop = time.perf_counter()
        s.stop(timeout=1.0)
    assert time.perf_counter() - t_stop < 0.5
    assert balanced_in_total(out.sent) and s.sounding() == frozenset()


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["note", "cancel", "advance"]), st.floats(0, 1), st.floats(0, 1),
                          st.integers(60, 62), st.integers(0, 1)), max_size=40))
def test_property_every_note_on_gets_its_note_off(ops):
    clock, out, s = fake_scheduler()
    owners = (object(), object())
    for op, x, y, pitch, owner in ops:
        if op == "note":
            s.schedule_note(clock.t + x, clock.t + x + y, pitch, 100, owner=owners[owner])
        elif op == "cancel":
            s.cancel(owners[owner] if x < 0.5 else None)
        else:
            clock.t += x
            s.run_pending()
        # at any time, what sounds at the receiver is exactly what the scheduler thinks sounds
        sounding = {}
        for _, m in out.sent:
            sounding[(m.channel, m.note)] = m.type == "note_on"
        assert {k for k, v in sounding.items() if v} == set(s.sounding())
    s.stop()
    assert balanced_in_total(out.sent)
    ons = sum(m.type == "note_on" for _, m in out.sent)
    stats = s.stats()
    assert stats["note_ons"] == stats["note_offs"] == ons  # what the final stats line reports is what was sent
