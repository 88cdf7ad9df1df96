"""JACK safety without a server: the output never writes into a ring that could be full and owes the note-offs it
could not write; the stall watch; the thread watchdog; the stale-synchro check; libjack's handlers stay C code."""

from __future__ import annotations

import ctypes
import threading
import time

import mido
import pytest

from harness.fakes import FakeMidi, FakeRt, off, on
from improvd.daemon.io import jackwatch, libjack
from improvd.daemon.io.outport import OutputPort, OutputSuspended
from improvd.daemon.live import service
from improvd.daemon.live.scheduler import Scheduler
from improvd.daemon.live.watchdog import Heartbeat, ThreadWatch


def _output(frame_source=None):
    rt = FakeRt()
    out = OutputPort("jack", "virtual:improvd out", open_client=FakeMidi(rt))
    out.frame_source = frame_source
    return out, rt


def test_no_more_than_half_the_ring_between_two_server_cycles():
    frame = [0]
    out, rt = _output(lambda: frame[0])
    fits = OutputPort.CYCLE_BUDGET_BYTES // 7  # 3-byte messages, 4 bytes of length each
    for i in range(fits):
        out.send(mido.Message("control_change", control=1, value=i % 128))
    with pytest.raises(OutputSuspended, match="has not run a cycle"):
        out.send(mido.Message("control_change", control=1, value=0))
    assert len(rt.sent) == fits and out.refused == 1
    frame[0] += 64  # the server ran a cycle: rtmidi's process callback emptied the ring
    out.send(mido.Message("control_change", control=1, value=0))
    assert len(rt.sent) == fits + 1


def test_a_refused_note_off_is_owed_and_written_first_on_resume():
    out, rt = _output(lambda: 0)
    out.send(on(60))
    out.send(on(62))
    out.suspend()
    with pytest.raises(OutputSuspended):
        out.send(off(60))
    with pytest.raises(OutputSuspended):
        out.send(on(64))  # refused: it never sounds, so no note-off is owed for it
    with pytest.raises(OutputSuspended):
        out.send(off(64))
    assert out.owed == 1
    assert out.resume() == 1
    assert rt.sent == [(0x90, 60, 90), (0x90, 62, 90), (0x80, 60, 0)]
    out.send(off(62))
    assert rt.sent[-1] == (0x80, 62, 0) and out.owed == 0


def test_owed_note_offs_go_out_before_the_next_message_when_the_budget_refused_them():
    frame = [0]
    out, rt = _output(lambda: frame[0])
    out.send(on(60))
    with pytest.raises(OutputSuspended):  # this cycle's budget is spent
        while True:
            out.send(mido.Message("control_change", control=1, value=0))
    with pytest.raises(OutputSuspended):
        out.send(off(60))
    frame[0] += 64
    out.send(on(61))
    assert rt.sent[-2:] == [(0x80, 60, 0), (0x90, 61, 90)]


def test_the_stall_watch_says_stalled_once_and_moving_once():
    w = jackwatch.ProgressWatch(0.5)
    assert w.update(0.0, 100) is None
    assert w.update(0.3, 100) is None
    assert w.update(0.6, 100) == "stalled" and w.stalled
    assert w.update(5.0, 100) is None and w.stalled_for_s(5.0) == pytest.approx(5.0)
    assert w.update(5.1, 164) == "moving" and not w.stalled
    assert w.update(5.2, None) is None  # no reading (server gone): nothing said


def _thread(target):
    t = threading.Thread(target=target, daemon=True)
    t.start()
    return t


def test_the_watchdog_names_a_dead_thread_and_a_stuck_one():
    now = [0.0]
    watch = ThreadWatch(2.0, clock=lambda: now[0])
    dead = _thread(lambda: None)
    dead.join()
    stop = threading.Event()
    alive = _thread(stop.wait)
    hb_dead, hb_stuck, hb_ok = (Heartbeat(lambda: now[0]) for _ in range(3))
    watch.watch("engine", lambda: dead, hb_dead)
    watch.watch("scheduler", lambda: alive, hb_stuck)
    watch.watch("poller", lambda: alive, hb_ok)
    watch.watch("not started", lambda: None, Heartbeat(lambda: now[0]))
    assert watch.check() == ["the engine thread died"]
    for t in (0.1, 1.0, 1.9, 2.05):
        now[0] = t
        hb_ok.beat()
        problems = watch.check()
    assert problems == ["the engine thread died", "the scheduler thread made no progress for 2.0 s"]
    stop.set()


def test_the_watchdog_does_not_blame_threads_when_the_whole_process_stood_still():
    now = [0.0]
    watch = ThreadWatch(2.0, clock=lambda: now[0])
    stop = threading.Event()
    t = _thread(stop.wait)
    hb = Heartbeat(lambda: now[0])
    watch.watch("engine", lambda: t, hb)
    assert watch.check() == []
    now[0] = 30.0  # SIGSTOP or a laptop's sleep: the main thread did not run either
    assert watch.check() == []
    now[0] = 30.1
    hb.beat()
    assert watch.check() == []
    stop.set()


def test_release_all_gives_up_when_a_stuck_thread_holds_the_schedulers_lock():
    sent = []
    s = Scheduler(sent.append)
    s.schedule_note(0.0, 10.0, 60, 90)
    s.run_pending()
    held = threading.Event()
    done = threading.Event()

    def hold():
        with s._cond:
            held.set()
            done.wait(5)
    _thread(hold)
    held.wait(2)
    t0 = time.monotonic()
    assert s.release_all(lock_timeout_s=0.1) is False
    assert time.monotonic() - t0 < 1.0
    done.set()
    assert s.release_all(lock_timeout_s=1.0) is True
    assert sent[-1].type == "note_off"


def test_stale_synchros_are_the_unlinked_jack_files_still_mapped(tmp_path):
    maps = tmp_path / "maps"
    maps.write_text(
        "7f00-7f01 rw-s 00000000 00:1a 12 /dev/shm/jack_sem.1000_default_improvd\n"
        "7f01-7f02 rw-s 00000000 00:1a 13 /dev/shm/jack_sem.1000_default_jack_lsp (deleted)\n"
        "7f02-7f03 rw-s 00000000 00:1a 14 /dev/shm/jack-1000-0 (deleted)\n"
        "7f03-7f04 r-xp 00000000 08:01 15 /usr/lib/libjack.so.0.1.0\n")
    assert libjack.stale_jack_synchros(str(maps)) == ["jack_sem.1000_default_jack_lsp (deleted)"]
    # settle: waits while one is mapped, returns once it is gone
    calls = []

    def sleep(_s):
        calls.append(1)
        if len(calls) == 3:
            maps.write_text("7f00-7f01 rw-s 00000000 00:1a 12 /dev/shm/jack_sem.1000_default_improvd\n")
    assert libjack.settle_jack_synchros(1.0, maps_path=str(maps), sleep=sleep) is True
    assert len(calls) == 3
    maps.write_text("7f01-7f02 rw-s 00000000 00:1a 13 /dev/shm/jack_sem.1000_default_x (deleted)\n")
    clock = iter([0.0, 0.2, 0.6])
    assert libjack.settle_jack_synchros(0.5, maps_path=str(maps), sleep=lambda s: None,
                                      clock=lambda: next(clock)) is False


def test_probing_leaves_libjacks_handlers_as_they_were_and_never_python():
    lib = libjack.load_libjack()
    if lib is None:
        pytest.skip("libjack is not installed")
    try:
        slots = [ctypes.c_void_p.in_dll(lib, n) for n in ("jack_error_callback", "jack_info_callback")]
    except ValueError:
        pytest.skip("this libjack does not export its handlers")
    before = [s.value for s in slots]
    seen = []
    with libjack.libjack_silenced(lib):
        seen = [s.value for s in slots]
    assert [s.value for s in slots] == before
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    assert seen == [ctypes.cast(libc.strlen, ctypes.c_void_p).value] * 2  # C code, not a Python trampoline


class FakeMonitor:
    def __init__(self, realtime, priority):
        self.realtime, self.client_priority = realtime, priority


def test_the_scheduler_is_real_time_beside_jack_only_below_a_real_time_server(caplog):
    assert service.jack_scheduler_priority(FakeMonitor(True, 9)) == service.SCHEDULER_RT_PRIORITY
    assert service.jack_scheduler_priority(FakeMonitor(True, 4)) == 3
    with caplog.at_level("INFO", logger="improvd"):
        assert service.jack_scheduler_priority(FakeMonitor(False, None)) is None
    assert "without real-time scheduling" in caplog.text


def test_the_daemon_exits_with_status_4_naming_the_worker_that_died(caplog):
    from improvd.core.config import from_dict
    svc = service.Service(from_dict({}))
    dead = _thread(lambda: None)
    dead.join()
    svc.watchdog.watch("engine", lambda: dead, Heartbeat())
    with caplog.at_level("ERROR", logger="improvd"):
        assert svc.run() == service.EXIT_THREAD_FAILED == 4
    assert "the engine thread died" in caplog.text and "exits (status 4)" in caplog.text
    assert svc.exit_status == 4


def test_a_client_whose_threads_stop_switching_while_the_server_runs_is_stuck():
    w = jackwatch.ClientWatch(2.0)
    rate = 48000
    assert not w.update(0.0, 0, rate, 100)
    assert not w.update(1.0, 48000, rate, 1600)  # switching: running its cycle
    assert not w.update(2.5, 120000, rate, 1600)
    assert w.update(3.1, 148800, rate, 1600) and w.stuck  # 2.1 s without a switch, 2.1 s of cycles
    assert not w.update(3.5, 168000, rate, 1600)  # said once
    assert not w.update(4.0, 192000, rate, 1700) and not w.stuck  # it runs again


def test_a_client_is_not_stuck_while_the_server_itself_stands_still():
    w = jackwatch.ClientWatch(2.0)
    assert not w.update(0.0, 1000, 48000, 50)
    assert not w.update(5.0, 1000 + 4800, 48000, 50)  # 0.1 s of cycles in 5 s: the server, not the client


def test_thread_switches_are_read_for_this_processs_threads():
    tids = {threading.get_native_id()}
    first = jackwatch.thread_switches(tids)
    if first is None:
        pytest.skip("no /proc/self/task here")
    time.sleep(0.01)
    assert jackwatch.thread_switches(tids) > first
    assert jackwatch.thread_switches({999999999}) is None


class _FrameMonitor:
    """A JackMonitor's face for the stall watch: the frame time is set by the test; reads are counted."""

    rate = 48000

    def __init__(self):
        self.frame_now, self.reads = 0, 0
        self.gone = threading.Event()

    def frame(self):
        self.reads += 1
        return self.frame_now


class _WatchedOutput:
    def __init__(self, jack_threads=()):
        self.jack_threads = list(jack_threads)
        self.suspended, self.refused, self.owed_sent = 0, 0, 3

    def suspend(self):
        self.suspended += 1

    def resume(self):
        return self.owed_sent

    def describe(self):
        return "output 'synth'"


def test_the_jack_watch_reads_the_frame_time_once_a_tick_and_suspends_the_output_while_the_server_stalls(caplog):
    from improvd.daemon.live.stallwatch import JACK_STALL_S, JackWatch
    clock, monitor, out = [0.0], _FrameMonitor(), _WatchedOutput()
    watch = JackWatch(monitor, out, (out,), now=lambda: clock[0])
    with caplog.at_level("WARNING", logger="improvd"):
        for tick in range(20):  # the server runs: its frame time moves every tick
            clock[0], monitor.frame_now = tick * 0.1, tick * 4800
            assert watch.check() == [] and monitor.reads == tick + 1
        for tick in range(20, 20 + int(JACK_STALL_S / 0.1) + 2):  # it stops
            clock[0] = tick * 0.1
            assert watch.check() == []
        assert watch.stalled and out.suspended == 1 and "the JACK server stalled" in caplog.text
        clock[0], monitor.frame_now = 3.0, 200000
        assert watch.check() == [] and not watch.stalled
        assert "moves again; output resumed (3 note-off(s) owed sent first" in caplog.text
    assert monitor.reads == 20 + int(JACK_STALL_S / 0.1) + 2 + 1


def test_the_jack_watch_names_an_output_client_that_stopped_running_its_cycle():
    from improvd.daemon.live.stallwatch import JackWatch
    parked, tid = threading.Event(), []
    t = _thread(lambda: (tid.append(threading.get_native_id()), parked.wait(10)))
    try:
        while not tid:
            time.sleep(0.01)
        time.sleep(0.05)  # parked: its thread makes no context switch from now on
        clock, monitor = [0.0], _FrameMonitor()
        out = _WatchedOutput(jack_threads=tid)
        watch = JackWatch(monitor, out, (out, None), now=lambda: clock[0], client_stall_s=2.0)
        found = []
        for tick in range(30):  # the server runs for 3 s; the client's thread does not switch
            clock[0], monitor.frame_now = tick * 0.1, tick * 4800
            found += watch.check()
        assert len(found) == 1 and "client for its output 'synth' has not run its cycle for 2 s" in found[0]
        assert "plays nothing" in found[0] and out.suspended == 1
    finally:
        parked.set()
        t.join()


class _HiccupMonitor(_FrameMonitor):
    """A server whose frame time stands still until `moves_at_s` (perf_counter), e.g. a VM the host paused."""

    def __init__(self, moves_at_s):
        super().__init__()
        self.moves_at_s = moves_at_s

    def frame(self):
        self.reads += 1
        return 0 if time.perf_counter() < self.moves_at_s else 4800


def test_at_stop_a_server_that_paused_for_80_ms_is_not_taken_for_a_stalled_one():
    """A false stall at stop leaves the sounding notes without their note-offs (the output is suspended)."""
    from improvd.daemon.live.stallwatch import SHUTDOWN_STALL_PROBE_S, JackWatch
    out = _WatchedOutput()
    watch = JackWatch(_HiccupMonitor(time.perf_counter() + 0.08), out, (out,))
    assert watch.stalled_now() is False
    frozen = JackWatch(_HiccupMonitor(float("inf")), out, (out,))
    t0 = time.perf_counter()
    assert frozen.stalled_now() is True
    assert SHUTDOWN_STALL_PROBE_S <= time.perf_counter() - t0 < SHUTDOWN_STALL_PROBE_S + 0.2
