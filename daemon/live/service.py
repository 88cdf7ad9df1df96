"""`improvd run`: the daemon. Wires the model, the ports, the scheduler and the engine; owns signals and reload.

Start-up fails fast (config, model, ports) with an error that names the problem. Then the main thread only
watches: it waits on an event with a short timeout, and on each tick

- stops on SIGINT or SIGTERM: the engine stops, every sounding note is released, the ports close, the recording is
  written, exit status 0, all within a second;
- reloads on SIGHUP (or when the `control.reload` CC is pressed): the config file is read again (with the same
  `--set` overrides) and the model built beside the running one, then handed to the engine, which swaps them
  between phrases; a reload that fails keeps the old ones and logs why. MIDI ports and `record.dir` are not
  reopened by a reload;
- polls the port lists every 0.5 s: a port improvd is connected to that goes away is logged once and reconnected
  when a port of that name returns; if the JACK server itself goes away, improvd says so and exits with status 3
  so that a service manager restarts it;
- starts a reload on a thread of its own, so that a slow model load never delays a stop;
- leaves the session recording (`record.dir`) to the recorder's thread, which writes it at least every
  `record.flush_seconds` (10 s): a slow or hung disk never delays a stop (at stop, the last write gets
  `RECORD_STOP_WAIT_S`, after every note is released);
- watches the JACK server's progress (its frame time, `JACK_STALL_S`): while it stalls, the output writes nothing
  (rtmidi would block holding the GIL once its ring is full), and a stop during a stall makes no request to it;
- watches its worker threads (`daemon/live/watchdog.py`): one that died or made no progress for `THREAD_STALL_S` is
  logged, the sounding notes are released and improvd exits with status 4 (`EXIT_THREAD_FAILED`);
- logs an input overload (the engine more than `INPUT_QUEUE_LIMIT` messages behind: new input is dropped, but
  never the release of a key that was let through) once when it starts and once when it ends;
- on SIGUSR1, logs the lateness of the events sent since the previous SIGUSR1 (`window stats:`) and the memory
  in use (benchmarks read lateness and memory over time with it);
- with `--verbose`, logs every event heard and sent (from queues filled by the MIDI threads, so logging never
  delays a note).

Real-time measures: the scheduler thread asks for real-time priority (`SCHEDULER_RT_PRIORITY`, below JACK's own
threads), the GIL switch interval is short, and the objects that exist after start-up are moved out of the garbage
collector's reach (`gc.freeze`), so that a full collection cannot stall the scheduler for milliseconds.

Threads (docs/architecture.md): the MIDI input's poller stamps and enqueues, the engine thread decides what to play,
the scheduler thread writes what is played to the output port (the releases of a lost output, a stop or the
watchdog are written by this main thread, under the port's and the scheduler's locks), the recorder's thread
writes the recording, a reload loads on a thread of its own, and this main thread does everything else.
"""

from __future__ import annotations

import collections
import gc
import logging
import os
import signal
import sys
import threading
import time

import mido

from improvd.daemon.io import inport, jackwatch, libjack, outport, portnames
from improvd.core.config import Config, load_config
from improvd.core.errors import ImprovdError, ModelError
from improvd.daemon.io.recorder import SessionRecorder, check_directory
from improvd.daemon.live.watchdog import THREAD_STALL_S, ThreadWatch

log = logging.getLogger("improvd")

TICK_S = 0.1
PORT_CHECK_S = 0.5
STOP_TIMEOUT_S = 0.5
# At stop, how long the recording's last write may take (the notes are released before it): a disk that does not
# answer by then keeps what the previous write put there, and improvd exits well within systemd's 5 s.
RECORD_STOP_WAIT_S = 0.4
EXIT_SERVER_GONE = 3
EXIT_THREAD_FAILED = 4  # a worker thread died or stopped making progress (the watchdog)
# The JACK server ran no cycle for this long (seconds): it stalled; improvd stops writing to its output.
JACK_STALL_S = 0.5
# At shutdown, the server counts as stalled if its frame time did not move over this long (seconds): then no
# request is made to it (closing a client waits for the server's answer, for ever if it is stopped).
SHUTDOWN_STALL_PROBE_S = 0.05
# How long a Python thread may hold the GIL while another waits for it (CPython's default is 5 ms). The engine, the
# scheduler and the MIDI input poller share one interpreter; a short interval lets the scheduler send a release or a
# due note within a fraction of a millisecond of being woken, instead of up to several milliseconds later.
GIL_SWITCH_INTERVAL_S = 0.0002
# SCHED_FIFO priority of the scheduler thread where the OS allows it: above every normal program, below JACK's
# threads (jackd's default is 10, and clients' process threads run near it), so improvd never delays JACK's cycle.
# On JACK it is taken only where the server itself runs its clients real-time, and below their priority: beside a
# server without real-time scheduling, a real-time improvd thread would preempt every JACK client's cycle.
SCHEDULER_RT_PRIORITY = 5
# Input messages the engine may be behind before new input is dropped (an input flood): about 0.1-0.5 s of work.
INPUT_QUEUE_LIMIT = 2000
OVERLOAD_OVER_S = 1.0  # an overload is over after this long without a dropped message
_NOTE_TYPES = ("note_on", "note_off")


# MIDI clock and transport (mido message types): they go to the engine; 0xF8 ticks (24 per beat) are not logged.
CLOCK_TYPES = frozenset({"clock", "start", "continue", "stop", "songpos"})


class _InputSink:
    """What the input's poller hands each `(t_s, message)` to (MIDI input thread: cheap, never blocks).

    - The engine's queue, bounded: while the engine is `limit` or more items behind (an input flood), new
      messages are dropped and counted in `dropped`, except the release of a key that was let through (so the
      engine never sees a key pressed that it will not see released, and memory stays bounded).
    - The recorder (note messages only) and the verbose log (clock ticks excepted), when they are on.

    It remembers the keys it let through that are held, so that when the input port goes away the main thread can
    release them (`release_held`). With `clock_only` (the `midi.clock` port), only clock and transport messages
    are taken.
    """

    def __init__(self, engine_queue, recorder: SessionRecorder | None, events: collections.deque | None,
                 *, clock_only: bool = False, limit: int = INPUT_QUEUE_LIMIT) -> None:
        self._queue = engine_queue
        self._recorder = None if clock_only else recorder
        self._events = events
        self._clock_only = clock_only
        self._limit = int(limit)
        self.held: set[tuple[int, int]] = set()  # (channel, pitch) let through and not yet released
        self.received = 0
        self.dropped = 0

    def put_nowait(self, item) -> None:
        """MIDI input thread: one `(t_s, message)`."""
        self.received += 1
        msg = item[1]
        kind = msg.type
        if self._clock_only and kind not in CLOCK_TYPES:
            return
        if kind in _NOTE_TYPES:
            key = (msg.channel, msg.note)
            if kind == "note_on" and msg.velocity > 0:
                if self._queue.qsize() >= self._limit:
                    self.dropped += 1
                    return
                self.held.add(key)
            elif key in self.held:
                self.held.discard(key)
            elif self._queue.qsize() >= self._limit:
                self.dropped += 1
                return
            self._queue.put_nowait(item)
            if self._recorder is not None:
                self._recorder.add_player(*item)
        elif self._queue.qsize() >= self._limit:
            self.dropped += 1
            return
        else:
            self._queue.put_nowait(item)
            if kind == "clock":
                return
        if self._events is not None:
            self._events.append(("heard", *item))

    def release_held(self, t_s: float) -> int:
        """Main thread, once the input port is closed: a note-off, stamped `t_s`, for every key held; returns
        how many."""
        keys = sorted(self.held)
        self.held.clear()
        for channel, pitch in keys:
            item = (t_s, mido.Message("note_off", channel=channel, note=pitch, velocity=0))
            self._queue.put_nowait(item)
            if self._recorder is not None:
                self._recorder.add_player(*item)
        return len(keys)


class _RecordWriter:
    """The recording's own thread ("improvd-recorder"): encodes what was heard and sent every `TICK_S`, writes the
    file every `interval_s` and once more at stop. The writes (each with its fsyncs) never run on the main thread,
    so a slow or hung disk cannot hold the thread that handles signals and port checks. Every `SessionRecorder`
    method but `add_player` / `add_improvd` runs here while the thread lives.
    """

    def __init__(self, recorder: SessionRecorder, interval_s: float) -> None:
        self.recorder = recorder
        self.interval_s = float(interval_s)
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="improvd-recorder", daemon=True)
        self.written: bool | None = None  # the last write's result, once the thread has ended

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stopping.wait(TICK_S):
            try:
                self.recorder.drain()
                if self.recorder.due(self.interval_s):
                    self.recorder.flush()
            except Exception:  # a bug here must not end the recording for the rest of the session
                log.exception("the recording thread failed; it goes on")
        try:
            self.written = self.recorder.flush()
        except Exception:
            log.exception("the last write of the recording failed")
            self.written = False

    def stop(self, timeout: float) -> bool:
        """Ask for the last write and wait up to `timeout` s; True when the thread ended (then `written` says
        whether the file was written), False when the disk holds it still."""
        self._stopping.set()
        if self._thread.ident is None:
            self._thread.start()
        self._thread.join(timeout)
        return not self._thread.is_alive()


def _describe_message(msg) -> str:
    if msg.type in ("note_on", "note_off"):
        kind = "note-on " if msg.type == "note_on" and msg.velocity > 0 else "note-off"
        return f"{kind} ch {msg.channel + 1:2d} pitch {msg.note:3d} vel {msg.velocity:3d}"
    return str(msg)


def _format_answer(summary: dict) -> str:
    """One log line per answer, from the engine's summary dict."""
    parts = [f"heard {summary.get('notes_heard', '?')} notes", f"played {summary.get('notes_played', '?')}"]
    if summary.get("inference_ms") is not None:
        parts.append(f"inference {summary['inference_ms']:.2f} ms")
    if summary.get("lateness_ms") is not None:
        parts.append(f"lateness {summary['lateness_ms']:.3f} ms")
    if summary.get("time_scale") is not None:
        parts.append(f"time scale {summary['time_scale']:.3f}")
    if summary.get("bpm") is not None:
        parts.append(f"grid {summary['bpm']:.1f} bpm")
    if summary.get("key") is not None:
        parts.append(f"key {summary['key']}")
    if summary.get("length") is not None:
        parts.append(f"length {summary['length']}")
    if summary.get("delayed") or summary.get("rechosen"):
        parts.append(f"texture bounds: {summary.get('delayed', 0)} onsets delayed, "
                     f"{summary.get('rechosen', 0)} pitches re-chosen")
    if summary.get("interrupted"):
        parts.append("interrupted")
    return "answer: " + ", ".join(parts)


def _format_stats(stats: dict, prefix: str = "stats") -> str:
    """The scheduler's `stats()` as one log line (bench/live_timing.py, bench/flood.py and bench/soak.py parse
    it); a window's line (`window stats:`) counts the events of the window; the final one adds the note-ons and
    note-offs sent, so a receiver's counts can be checked against what improvd sent."""
    window = prefix != "stats"
    sent = stats.get("window_sent", 0) if window else stats.get("sent", 0)
    late = stats.get("window_late", 0) if window else stats.get("late", 0)
    line = (f"{prefix}: sent {sent} events (late {late}, failed "
            f"{stats.get('failed', 0)}), lateness median {stats.get('median_ms', 0.0):.3f} ms, "
            f"p99 {stats.get('p99_ms', 0.0):.3f} ms, max {stats.get('max_ms', 0.0):.3f} ms")
    if not window and "note_ons" in stats:
        line += f", note-ons {stats['note_ons']}, note-offs {stats['note_offs']}"
    return line


def _rss_mb() -> tuple[float, float] | None:
    """(resident memory now, its peak) of this process in MB, from /proc (Linux); None elsewhere."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            fields = dict(line.split(":", 1) for line in fh if ":" in line)
        return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024
    except (OSError, KeyError, ValueError):
        return None


def _load_model(config: Config):
    """Load, check and warm up the model: a model whose outputs are not finite is refused; the first inference of
    a session and the first decode pay for allocations and lazy imports (tens of ms), which must not fall on the
    first note of the first answer."""
    import numpy as np

    from improvd.daemon.predict.improviser import Decoding, Improviser
    from improvd.daemon.predict.model import StepModel  # onnxruntime is imported with it

    model = StepModel(config.model.path, threads=config.model.threads)
    bad = model.nonfinite_outputs()
    if bad:
        raise ModelError(f"model {str(model.path)!r} gives non-finite outputs (NaN or infinity) in "
                         f"{', '.join(bad)} for one note from the zero state: it cannot be played (was it exported "
                         f"from a diverged training run?)")
    improviser = Improviser(model, Decoding.from_config(config.improvise), rng=np.random.default_rng(0))
    for _ in range(2):
        improviser.feed(np.array([60.0, 0.25, 0.25, 90.0]))
        improviser.predict()
    return model


def _warm_up_numpy() -> None:
    """numpy imports parts of itself on first use (np.median pulls in numpy.ma: ~20-90 ms). The scheduler's
    stats use them, at the end of an answer, possibly right after an interruption: import them at start-up."""
    import numpy as np
    values = np.arange(3.0)
    np.median(values)
    np.percentile(values, 99)


class Service:
    """The running daemon: built by `start()`, watched by `run()`, taken apart by `shutdown()`.

    Args:
        config: the checked config.
        overrides: the `--set` overrides, re-applied on reload.
        verbose: log every event.
        now: the clock shared by every part (`time.perf_counter`).
    """

    def __init__(self, config: Config, *, overrides: list[str] | None = None, verbose: bool = False,
                 now=time.perf_counter) -> None:
        self.config = config
        self.overrides = list(overrides or [])
        self.verbose = verbose
        self.now = now
        self.wake = threading.Event()
        self.stop_requested = False
        self.reload_requested = False
        self.exit_status = 0
        self.monitor: libjack.JackMonitor | None = None
        self.input: inport.InputPort | None = None
        self.clock_input: inport.InputPort | None = None  # midi.clock, when set
        self.output: outport.OutputPort | None = None
        self.scheduler = None
        self.engine = None
        self.osc = None  # daemon/io/osc.py, when osc.enabled
        self.recorder: SessionRecorder | None = None
        self.events: collections.deque | None = collections.deque(maxlen=10000) if verbose else None
        self.answers = 0
        self.start_s = now()
        self.sink: _InputSink | None = None
        self.stats_requested = False
        self._stats_mark = 0  # scheduler events sent at the previous window
        self._dropped_seen = 0
        self._overloaded = False
        self._last_drop_s = 0.0
        self._flush_s = config.record.flush_seconds  # [record] is read at start only
        self._server_gone = False
        self._writer: _RecordWriter | None = None
        self._reloading: threading.Thread | None = None
        self._server_stalled = False  # at shutdown: make no request to the JACK server
        self._client_watches: list = []  # (port, jackwatch.ClientWatch) of improvd's own JACK clients
        self.progress = jackwatch.ProgressWatch(JACK_STALL_S)
        self.watchdog = ThreadWatch(THREAD_STALL_S)

    # ---- start-up ---------------------------------------------------------------------------------------
    def start(self) -> None:
        """Load the model, open the ports, start the scheduler and the engine. Raises ImprovdError on failure."""
        from improvd.daemon.live.engine import Engine
        from improvd.daemon.live.scheduler import Scheduler

        config = self.config
        if config.record.dir:  # a cheap check first: an unusable record.dir fails before the model is loaded
            record_dir = check_directory(config.record.dir)
        model = _load_model(config)
        _warm_up_numpy()
        api = portnames.choose_api(config.midi.api)
        self.api = api
        if config.record.dir:
            self.recorder = SessionRecorder(
                record_dir, start_s=self.start_s, now=self.now,
                player_channels=tuple(c - 1 for c in config.midi.input_channels),
                output_channel=config.midi.output_channel - 1, rotate_s=config.record.rotate_minutes * 60.0)
        self.output = outport.OutputPort(api, config.midi.output, client_name=config.midi.client_name)
        if config.osc.enabled:  # the only network port improvd opens, and only when asked to
            from improvd.daemon.io.osc import OscServer
            self.osc = OscServer(config.osc, lambda action: self.engine.control(action),
                                 output_channel=config.midi.output_channel - 1)
        hook = self._on_sent if (self.recorder is not None or self.events is not None
                                 or self.osc is not None) else None
        self.scheduler = Scheduler(self.output.send, now=self.now, on_sent=hook,
                                   realtime_priority=SCHEDULER_RT_PRIORITY)
        # A lost output: release what sounds while improvd's port still reaches its other connections.
        self.output.on_lost = self.scheduler.release_all
        self.engine = Engine(config, model, self.scheduler, now=self.now, on_answer=self._on_answer,
                             on_reload_request=self._on_reload_request,
                             on_state=self.osc.state if self.osc is not None else None)
        self.sink = _InputSink(self.engine.input_queue, self.recorder, self.events)
        follow_clock = config.timing.follow_clock
        self.input = inport.InputPort(api, config.midi.input, self.sink, client_name=config.midi.client_name,
                                      now=self.now, clock=follow_clock and not config.midi.clock)
        # with a separate clock port, the main input ignores clock: a source wired to both must not count twice
        if config.midi.clock and follow_clock:
            clock_sink = _InputSink(self.engine.input_queue, None, self.events, clock_only=True)
            self.clock_input = inport.InputPort(api, config.midi.clock, clock_sink,
                                                client_name=config.midi.client_name, now=self.now, clock=True,
                                                port_name="improvd clock")
        for port in (self.input, self.clock_input):
            if port is not None:
                port.server_stalled = lambda: self.progress.stalled  # its EOX guard sends nothing then
        if api == "jack":
            # After the MIDI clients: the monitor is never activated, so it cannot inherit a dead client's synchro
            # (libjack.stale_jack_synchros); it reads the server's progress for the output and the stall watch.
            self.monitor = libjack.JackMonitor(f"{config.midi.client_name}-monitor")
            self.output.frame_source = self.monitor.frame
            self.scheduler.realtime_priority = self._jack_scheduler_priority(self.monitor)
        if self.monitor is not None:
            self._client_watches = [(port, jackwatch.ClientWatch(THREAD_STALL_S))
                                    for port in (self.output, self.input, self.clock_input)
                                    if port is not None and port.jack_threads]
        self.watchdog.watch("engine", lambda: self.engine.thread, self.engine.heartbeat)
        self.watchdog.watch("scheduler", lambda: self.scheduler.thread, self.scheduler.heartbeat)
        for port in (self.input, self.clock_input):
            if port is not None:
                self.watchdog.watch(f"{port.describe()} poller", lambda p=port: p.thread, port.heartbeat)
        self.scheduler.start()
        self.engine.start()
        if self.osc is not None:
            self.osc.start()
        # What exists now lives as long as the daemon: keep it out of the collector's full passes.
        gc.collect()
        gc.freeze()
        log.info("ready: input %s, output %s, model %s (context %s), mode %s%s%s", self.input.describe(),
                 self.output.describe(), config.model.path, getattr(model, "context", "?"), config.improvise.mode,
                 f", clock from {self.clock_input.describe()}" if self.clock_input else "",
                 f", recording to {self.recorder.path}" if self.recorder else "")

    @staticmethod
    def _jack_scheduler_priority(monitor: "libjack.JackMonitor") -> int | None:
        """The scheduler's SCHED_FIFO priority beside this JACK server: below its clients' real-time threads, or
        none (normal priority) where the server does not run them real-time."""
        if not monitor.realtime or monitor.client_priority is None or monitor.client_priority <= 1:
            log.info("the JACK server runs without real-time scheduling: improvd's scheduler stays at normal "
                     "priority (a real-time thread would preempt the cycles of every JACK client)")
            return None
        return min(SCHEDULER_RT_PRIORITY, monitor.client_priority - 1)

    # ---- hooks called from other threads (append or log only) ---------------------------------------------
    def _on_sent(self, t_s: float, msg) -> None:
        """Scheduler thread, after each message is written."""
        if self.recorder is not None:
            self.recorder.add_improvd(t_s, msg)
        if self.osc is not None:
            self.osc.sent(t_s, msg)
        if self.events is not None:
            self.events.append(("sent", t_s, msg))

    def _on_reload_request(self) -> None:
        """Engine thread, when the reload CC is pressed: the main thread reloads, as on SIGHUP."""
        self.reload_requested = True
        self.wake.set()

    def _on_answer(self, summary: dict) -> None:
        """Engine thread, once per answer."""
        self.answers += 1
        log.info(_format_answer(summary))

    # ---- signals (main thread, between bytecodes) --------------------------------------------------------
    def install_signals(self) -> None:
        signal.signal(signal.SIGINT, self._on_stop_signal)
        signal.signal(signal.SIGTERM, self._on_stop_signal)
        if hasattr(signal, "SIGHUP"):
            signal.signal(signal.SIGHUP, self._on_hup)
        if hasattr(signal, "SIGUSR1"):
            signal.signal(signal.SIGUSR1, self._on_usr1)

    def _on_stop_signal(self, signum, _frame) -> None:
        self.stop_requested = True
        self.wake.set()

    def _on_hup(self, _signum, _frame) -> None:
        self.reload_requested = True
        self.wake.set()

    def _on_usr1(self, _signum, _frame) -> None:
        self.stats_requested = True
        self.wake.set()

    # ---- the main loop -------------------------------------------------------------------------------------
    def run(self) -> int:
        """Watch until a stop signal or the loss of the JACK server; returns the exit status."""
        next_check = self.now() + PORT_CHECK_S
        if self.recorder is not None and self._writer is None:
            self._writer = _RecordWriter(self.recorder, self._flush_s)
            self._writer.start()
        while True:
            self.wake.wait(TICK_S)
            self.wake.clear()
            if self.stop_requested:
                log.info("stopping")
                return 0
            if self.reload_requested and not (self._reloading is not None and self._reloading.is_alive()):
                # Off the main thread: reading the config and loading and warming up a model can take seconds.
                # A request while one runs waits for it (the flag stays set).
                self.reload_requested = False
                self._reloading = threading.Thread(target=self.reload, name="improvd-reload", daemon=True)
                self._reloading.start()
            if self.monitor is not None and self.monitor.gone.is_set():
                self._server_gone = True
                log.error("the JACK server went away; improvd exits (status %d) so that it can be restarted "
                          "once the server is back", EXIT_SERVER_GONE)
                return EXIT_SERVER_GONE
            self._watch_server()
            problems = self.watchdog.check() + self._stuck_clients()
            if problems:
                log.error("%s; improvd releases what sounds and exits (status %d) so that it can be restarted",
                          "; ".join(problems), EXIT_THREAD_FAILED)
                self.exit_status = EXIT_THREAD_FAILED
                return EXIT_THREAD_FAILED
            self._log_events()
            self._watch_input()
            if self.stats_requested:
                self.stats_requested = False
                self._log_window_stats()
            if self.now() >= next_check:
                next_check = self.now() + PORT_CHECK_S
                self._check_ports()

    def _watch_server(self) -> None:
        """JACK: notice the server stalling (no cycle for JACK_STALL_S) and moving again; the output writes
        nothing meanwhile (`OutputPort.suspend`)."""
        if self.monitor is None:
            return
        change = self.progress.update(self.now(), self.monitor.frame())
        if change == "stalled":
            self.output.suspend()
            log.error("the JACK server stalled: no cycle for %.1f s; improvd writes nothing to its output until "
                      "the server moves again", self.progress.stalled_for_s(self.now()))
        elif change == "moving":
            owed = self.output.resume()
            log.warning("the JACK server moves again; output resumed (%d note-off(s) owed sent first, %d messages "
                        "refused meanwhile)", owed, self.output.refused)

    def _stuck_clients(self) -> list[str]:
        """JACK: improvd's own clients that stopped running their cycle while the server runs (`ClientWatch`)."""
        if self.monitor is None or self.progress.stalled:
            return []
        frame, now = self.monitor.frame(), self.now()
        stuck = []
        for port, watch in self._client_watches:
            if watch.update(now, frame, self.monitor.rate, jackwatch.thread_switches(port.jack_threads)):
                if port is self.output:
                    self.output.suspend()
                stuck.append(f"improvd's JACK client for its {port.describe()} has not run its cycle for "
                             f"{watch.stall_after_s:.0f} s while the server ran (it "
                             f"{'plays' if port is self.output else 'hears'} nothing)")
        return stuck

    def _jack_stalled_now(self) -> bool:
        """Shutdown: whether the JACK server is stalled right now (known, or its frame time does not move over
        SHUTDOWN_STALL_PROBE_S)."""
        if self.monitor is None or self._server_gone:
            return False
        if self.progress.stalled:
            return True
        first = self.monitor.frame()
        time.sleep(SHUTDOWN_STALL_PROBE_S)
        return first is not None and self.monitor.frame() == first

    def _check_ports(self) -> None:
        for port in (self.input, self.clock_input, self.output):
            if port is None:
                continue
            try:
                change = port.check()
            except ImprovdError as err:
                log.warning("%s", err)
                continue
            except Exception as err:  # the watchdog must not take the daemon down
                log.warning("checking MIDI %s failed: %s: %s", port.kind, type(err).__name__, err)
                continue
            if change == "lost" and port is self.input and self.sink is not None:
                released = self.sink.release_held(self.now())
                if released:
                    log.info("released %d key(s) held on the lost input", released)

    def _watch_input(self) -> None:
        """Log an input overload once when it starts and once when it is over (no drop for OVERLOAD_OVER_S)."""
        if self.sink is None:
            return
        dropped = self.sink.dropped
        if dropped > self._dropped_seen:
            self._last_drop_s = self.now()
            if not self._overloaded:
                self._overloaded = True
                log.warning("input overload: more than %d messages wait for the engine; new input is dropped "
                            "(releases of held keys are kept) until it catches up", INPUT_QUEUE_LIMIT)
        elif self._overloaded and self.now() - self._last_drop_s >= OVERLOAD_OVER_S:
            self._overloaded = False
            log.warning("input overload over: %d messages dropped so far", dropped)
        self._dropped_seen = dropped

    def _log_window_stats(self) -> None:
        """SIGUSR1: lateness of the events sent since the previous SIGUSR1, input counts and memory."""
        stats = self.scheduler.stats(since=self._stats_mark) if self.scheduler is not None else {}
        self._stats_mark = stats.get("sent", 0)
        rss = _rss_mb()
        memory = f", rss {rss[0]:.1f} MB (peak {rss[1]:.1f} MB)" if rss else ""
        received = self.sink.received if self.sink is not None else 0
        dropped = self.sink.dropped if self.sink is not None else 0
        log.info("%s, input %d received, %d dropped%s", _format_stats(stats, "window stats"), received, dropped,
                 memory)

    def _log_events(self) -> None:
        if self.events is None:
            return
        while self.events:
            what, t_s, msg = self.events.popleft()
            log.debug("%-5s t=%.6f s %s", what, t_s - self.start_s, _describe_message(msg))

    def reload(self) -> bool:
        """SIGHUP: the config file again (with the same overrides) and its model, swapped in between phrases.

        `run` calls it on a thread of its own ("improvd-reload"), so the main thread stays free to stop. [midi] and
        [record] are read at start only: the running ones are kept (and the engine keeps its [midi] too)."""
        log.info("reloading %s", self.config.source or "(built-in defaults)")
        try:
            new_config = load_config(self.config.source, self.overrides)
            new_model = _load_model(new_config)
        except ImprovdError as err:
            log.error("reload failed, improvd keeps the running config and model: %s", err)
            return False
        except Exception as err:  # a reload must never take the running daemon down
            log.error("reload failed, improvd keeps the running config and model: %s: %s", type(err).__name__, err)
            return False
        if new_config.midi != self.config.midi or new_config.record != self.config.record \
                or new_config.osc != self.config.osc:
            log.warning("changes to [midi], [record] and [osc] take effect when improvd restarts")
        new_config = new_config.replace(midi=self.config.midi, record=self.config.record, osc=self.config.osc)
        self.engine.request_swap(new_config, new_model)
        self.config = new_config
        log.info("reloaded: model %s, mode %s, temperature %s (in effect from the next phrase)",
                 new_config.model.path, new_config.improvise.mode, new_config.improvise.temperature)
        return True

    # ---- shutdown ----------------------------------------------------------------------------------------
    def shutdown(self) -> None:
        """Stop the engine, release every sounding note, stop the scheduler, close the ports, write the recording.

        Safe to call after a partial start. With the JACK server stalled, no request is made to it (the ports
        are left open; the process's exit closes its connections) and the notes that could not be released are
        logged."""
        if self.osc is not None:
            try:
                self.osc.stop()
            except Exception:
                log.exception("the OSC endpoint did not stop cleanly")
        if self._jack_stalled_now():
            self._server_stalled = True
            if self.output is not None:
                self.output.suspend()
            log.error("the JACK server is stalled: improvd stops without closing its JACK clients (the server "
                      "drops them when it moves again)")
        if self.engine is not None:
            try:
                self.engine.stop(timeout=STOP_TIMEOUT_S)
            except Exception:
                log.exception("the engine did not stop cleanly")
        if self.scheduler is not None:
            try:
                if self.exit_status == EXIT_THREAD_FAILED:  # a stuck thread may hold the scheduler's lock
                    if not self.scheduler.release_all(lock_timeout_s=STOP_TIMEOUT_S):
                        log.error("the scheduler's lock is held by a stuck thread: sounding notes not released")
                else:
                    self.scheduler.cancel()
                    self.scheduler.release_all()
                    self.scheduler.stop(STOP_TIMEOUT_S)
            except Exception:
                log.exception("the scheduler did not stop cleanly")
            try:
                log.info(_format_stats(self.scheduler.stats()))
            except Exception:
                log.exception("no scheduler stats")
        # Close the JACK clients properly: a client that just exits is dropped by the server only once it misses
        # cycles, and every missed cycle is an xrun for the whole graph (a DAW's audio glitches). Once the server
        # is gone, leave rtmidi alone: libjack crashes closing clients of a dead server.
        leave_ports = self._server_gone or self._server_stalled
        if self._server_stalled and self.output is not None and self.output.owed:
            log.error("%d note-off(s) could not be written while the JACK server stalled", self.output.owed)
        for port in (self.input, self.clock_input, self.output):
            if port is not None:
                port.close(server_gone=leave_ports)
        if self.sink is not None:
            log.info("input: %d messages received, %d dropped in overloads, %d invalid, %d recovered from "
                     "unterminated SysEx", self.sink.received, self.sink.dropped, getattr(self.input, "invalid", 0),
                     getattr(self.input, "recovered", 0))
        if self.monitor is not None and not leave_ports:
            self.monitor.close()
        self._log_events()
        if self.recorder is not None:
            writer = self._writer or _RecordWriter(self.recorder, self._flush_s)
            if not writer.stop(RECORD_STOP_WAIT_S):
                log.error("the recording's last write did not finish within %.1f s (the disk does not answer): the "
                          "last interval is not written; %s holds what the previous write put there",
                          RECORD_STOP_WAIT_S, self.recorder.path)
            elif writer.written:
                log.info("recording written to %s (%s)", self.recorder.path,
                         ", ".join(f"{k} {v} notes" for k, v in self.recorder.note_counts.items()))


def cmd_run(args, config: Config) -> int:
    """`improvd run`: start, watch, stop; returns the exit status (0 after SIGINT/SIGTERM)."""
    service = Service(config, overrides=getattr(args, "overrides", None), verbose=getattr(args, "verbose", False))
    service.install_signals()
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    status = 0
    try:
        service.start()
        status = service.run()
    finally:
        service.shutdown()
    if service._server_gone or service._server_stalled or status == EXIT_THREAD_FAILED:
        # libjack crashes while freeing clients of a server that is gone, and waits for ever on one that is
        # stopped; a stuck worker thread may hold what the interpreter's exit waits for. Everything is released
        # and written by now, so leave without running destructors.
        logging.shutdown()
        sys.stderr.flush()
        os._exit(status)
    return status
