"""`improvd run`: the daemon's lifecycle. Wires the model, the ports, the scheduler and the engine; owns the main
thread, signals and the exit status.

Start-up fails fast (config, model, ports) with an error that names the problem. Then the main thread only
watches: it waits on an event with a short timeout (`TICK_S`), and on each tick

- stops on SIGINT or SIGTERM: the engine stops, every sounding note is released, the ports close, the recording is
  written, exit status 0, all within a second;
- reloads on SIGHUP (or when the `control.reload` CC is pressed), on a thread of its own so that a slow model load
  never delays a stop (`daemon/live/reload.py`): the config file is read again (with the same `--set` overrides)
  and the model built beside the running one, then handed to the engine, which swaps them between phrases; a
  reload that fails keeps the old ones and logs why. MIDI ports and `record.dir` are not reopened by a reload;
- polls the port lists every `PORT_CHECK_S` (0.5 s): a port improvd is connected to that goes away is logged once
  and reconnected when a port of that name returns; if the JACK server itself goes away, improvd says so and exits
  with status 3 (`EXIT_SERVER_GONE`) so that a service manager restarts it;
- leaves the session recording (`record.dir`) to the recorder's thread (`daemon/io/recordwriter.py`), which writes
  it at least every `record.flush_seconds` (10 s): a slow or hung disk never delays a stop (at stop, the last write
  gets `RECORD_STOP_WAIT_S`, after every note is released);
- watches the JACK server's progress and improvd's own JACK clients (`daemon/live/stallwatch.py`): while the server
  stalls, the output writes nothing (rtmidi would block holding the GIL once its ring is full), and a stop during a
  stall makes no request to it;
- watches its worker threads (`daemon/live/watchdog.py`): one that died or made no progress for `THREAD_STALL_S`, or
  one of improvd's JACK clients that stopped running its cycle, is logged, the sounding notes are released and
  improvd exits with status 4 (`EXIT_THREAD_FAILED`);
- logs an input overload (`daemon/live/inputsink.py`: the engine more than `INPUT_QUEUE_LIMIT` messages behind, new
  input is dropped, but never the release of a key that was let through) once when it starts and once when it ends;
- on SIGUSR1, logs the lateness of the events sent since the previous SIGUSR1 (`window stats:`) and the memory
  in use (benchmarks read lateness and memory over time with it; the log lines are `daemon/live/statslog.py`'s);
- with `--verbose`, logs every event heard and sent (from queues filled by the MIDI threads, so logging never
  delays a note).

Real-time measures: the scheduler thread asks for real-time priority (`SCHEDULER_RT_PRIORITY`, below JACK's own
threads), the GIL switch interval is short, and the objects that exist after start-up are moved out of the garbage
collector's reach (`gc.freeze`), so that a full collection cannot stall the scheduler for milliseconds.

Threads (docs/architecture.md): the MIDI input's poller stamps and enqueues (`InputSink`), the engine thread decides
what to play, the scheduler thread writes what is played to the output port at its deadline. Releases are written
by the thread that asks for them, under the scheduler's lock (and the port's): this main thread when the output is
lost (`OutputPort.on_lost` is `Scheduler.release_all`), at stop and from the watchdog; a `Scheduler.cancel` queues
its note-offs for the scheduler thread while that runs. The recorder's thread writes the recording, a reload loads
on a thread of its own, and this main thread does everything else.
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

from improvd.core.config import Config
from improvd.core.errors import ImprovdError
from improvd.daemon.io import inport, libjack, outport, portnames
from improvd.daemon.io.recorder import SessionRecorder, check_directory
from improvd.daemon.io.recordwriter import RecordWriter
from improvd.daemon.live import statslog
from improvd.daemon.live.inputsink import InputSink, OverloadWatch
from improvd.daemon.live.stallwatch import JackWatch
from improvd.daemon.live.reload import load_model, reload_config
from improvd.daemon.live.watchdog import THREAD_STALL_S, ThreadWatch

log = logging.getLogger("improvd")

TICK_S = 0.1  # the main loop's period when nothing wakes it (seconds)
PORT_CHECK_S = 0.5  # how often the port lists are read for ports that went away or came back (seconds)
STOP_TIMEOUT_S = 0.5  # at stop, how long the engine's and the scheduler's threads each get to end (seconds)
# At stop, how long the recording's last write may take (the notes are released before it): a disk that does not
# answer by then keeps what the previous write put there, and improvd exits well within systemd's 5 s.
RECORD_STOP_WAIT_S = 0.4
EXIT_SERVER_GONE = 3
EXIT_THREAD_FAILED = 4  # a worker thread died or stopped making progress (the watchdog)
# How long a Python thread may hold the GIL while another waits for it (CPython's default is 5 ms). The engine, the
# scheduler and the MIDI input poller share one interpreter; a short interval lets the scheduler send a release or a
# due note within a fraction of a millisecond of being woken, instead of up to several milliseconds later.
GIL_SWITCH_INTERVAL_S = 0.0002
# SCHED_FIFO priority of the scheduler thread where the OS allows it: above every normal program, below JACK's
# threads (jackd's default is 10, and clients' process threads run near it), so improvd never delays JACK's cycle.
# On JACK it is taken only where the server itself runs its clients real-time, and below their priority: beside a
# server without real-time scheduling, a real-time improvd thread would preempt every JACK client's cycle.
SCHEDULER_RT_PRIORITY = 5


def _warm_up_numpy() -> None:
    """numpy imports parts of itself on first use (np.median pulls in numpy.ma: ~20-90 ms). The scheduler's
    stats use them, at the end of an answer, possibly right after an interruption: import them at start-up."""
    import numpy as np
    values = np.arange(3.0)
    np.median(values)
    np.percentile(values, 99)


def jack_scheduler_priority(monitor: "libjack.JackMonitor") -> int | None:
    """The scheduler's SCHED_FIFO priority beside this JACK server: below its clients' real-time threads, or none
    (normal priority) where the server does not run them real-time."""
    if not monitor.realtime or monitor.client_priority is None or monitor.client_priority <= 1:
        log.info("the JACK server runs without real-time scheduling: improvd's scheduler stays at normal "
                 "priority (a real-time thread would preempt the cycles of every JACK client)")
        return None
    return min(SCHEDULER_RT_PRIORITY, monitor.client_priority - 1)


class Service:
    """The running daemon: built by `start()`, watched by `run()`, taken apart by `shutdown()` (main thread).

    Args:
        config: the checked config.
        overrides: the `--set` overrides, re-applied on reload.
        verbose: log every event.
        now: the clock shared by every part (`time.perf_counter`).
        load_model: loads, checks and warms up a model (`daemon/live/reload.py`), at start and on every reload.
    """

    def __init__(self, config: Config, *, overrides: list[str] | None = None, verbose: bool = False,
                 now=time.perf_counter, load_model=load_model) -> None:
        self.config = config
        self.overrides = list(overrides or [])
        self.verbose = verbose
        self.now = now
        self.load_model = load_model
        self.wake = threading.Event()
        self.stop_requested = False
        self.reload_requested = False
        self.stats_requested = False
        self.exit_status = 0
        self.monitor: libjack.JackMonitor | None = None
        self.jack: JackWatch | None = None  # the stall watch, on JACK
        self.input: inport.InputPort | None = None
        self.clock_input: inport.InputPort | None = None  # midi.clock, when set
        self.output: outport.OutputPort | None = None
        self.scheduler = None
        self.engine = None
        self.osc = None  # daemon/io/osc.py, when osc.enabled
        self.recorder: SessionRecorder | None = None
        self.events: collections.deque | None = collections.deque(maxlen=10000) if verbose else None
        self.start_s = now()
        self.sink: InputSink | None = None
        self.overload: OverloadWatch | None = None
        self._stats_mark = 0  # scheduler events sent at the previous window
        self._flush_s = config.record.flush_seconds  # [record] is read at start only
        self._server_gone = False
        self._writer: RecordWriter | None = None
        self._reloading: threading.Thread | None = None
        self._server_stalled = False  # at shutdown: make no request to the JACK server
        self.watchdog = ThreadWatch(THREAD_STALL_S)

    # ---- start-up ---------------------------------------------------------------------------------------
    def start(self) -> None:
        """Load the model, open the ports, start the scheduler and the engine. Raises ImprovdError on failure."""
        from improvd.daemon.live.engine import Engine
        from improvd.daemon.live.scheduler import Scheduler

        config = self.config
        if config.record.dir:  # a cheap check first: an unusable record.dir fails before the model is loaded
            record_dir = check_directory(config.record.dir)
        model = self.load_model(config)
        _warm_up_numpy()
        api = portnames.choose_api(config.midi.api)
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
        # A lost output: release what sounds while improvd's port still reaches its other connections (the port
        # calls this on the main thread, from its check; the note-offs are written there, under its lock).
        self.output.on_lost = self.scheduler.release_all
        self.engine = Engine(config, model, self.scheduler, now=self.now, on_answer=self._on_answer,
                             on_reload_request=self.request_reload,
                             on_state=self.osc.state if self.osc is not None else None)
        self.sink = InputSink(self.engine.input_queue, self.recorder, self.events)
        self.overload = OverloadWatch(self.sink, self.now)
        follow_clock = config.timing.follow_clock
        self.input = inport.InputPort(api, config.midi.input, self.sink, client_name=config.midi.client_name,
                                     now=self.now, clock=follow_clock and not config.midi.clock)
        # with a separate clock port, the main input ignores clock: a source wired to both must not count twice
        if config.midi.clock and follow_clock:
            clock_sink = InputSink(self.engine.input_queue, None, self.events, clock_only=True)
            self.clock_input = inport.InputPort(api, config.midi.clock, clock_sink,
                                               client_name=config.midi.client_name, now=self.now, clock=True,
                                               port_name="improvd clock")
        for port in (self.input, self.clock_input):
            if port is not None:  # its EOX guard sends nothing while the server stalls
                port.server_stalled = lambda: self.jack is not None and self.jack.stalled
        if api == "jack":
            # After the MIDI clients: the monitor is never activated, so it cannot inherit a dead client's synchro
            # (libjack.stale_jack_synchros); it reads the server's progress for the output and the stall watch.
            self.monitor = libjack.JackMonitor(f"{config.midi.client_name}-monitor")
            self.jack = JackWatch(self.monitor, self.output, (self.output, self.input, self.clock_input),
                                  now=self.now)
            self.output.frame_source = self.monitor.frame
            self.scheduler.realtime_priority = jack_scheduler_priority(self.monitor)
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

    # ---- hooks called from other threads (append or log only) ---------------------------------------------
    def _on_sent(self, t_s: float, msg) -> None:
        """Scheduler thread (or whichever thread releases notes, see the module docstring), after each message is
        written."""
        if self.recorder is not None:
            self.recorder.add_improvd(t_s, msg)
        if self.osc is not None:
            self.osc.sent(t_s, msg)
        if self.events is not None:
            self.events.append(("sent", t_s, msg))

    def _on_answer(self, summary: dict) -> None:
        """Engine thread, once per answer."""
        log.info("%s", statslog.format_answer(summary))

    # ---- requests: from signal handlers (main thread, between bytecodes) and the engine's reload CC ---------------
    def request_stop(self) -> None:
        """SIGINT or SIGTERM: stop at the next tick."""
        self.stop_requested = True
        self.wake.set()

    def request_reload(self) -> None:
        """SIGHUP, or the engine thread when the `control.reload` CC is pressed: reload on a thread of its own."""
        self.reload_requested = True
        self.wake.set()

    def request_stats(self) -> None:
        """SIGUSR1: log the window's stats line."""
        self.stats_requested = True
        self.wake.set()

    def install_signals(self) -> None:
        signal.signal(signal.SIGINT, lambda _signum, _frame: self.request_stop())
        signal.signal(signal.SIGTERM, lambda _signum, _frame: self.request_stop())
        if hasattr(signal, "SIGHUP"):
            signal.signal(signal.SIGHUP, lambda _signum, _frame: self.request_reload())
        if hasattr(signal, "SIGUSR1"):
            signal.signal(signal.SIGUSR1, lambda _signum, _frame: self.request_stats())

    # ---- the main loop -------------------------------------------------------------------------------------
    def run(self) -> int:
        """Watch until a stop signal or the loss of the JACK server; returns the exit status."""
        next_check = self.now() + PORT_CHECK_S
        if self.recorder is not None and self._writer is None:
            self._writer = RecordWriter(self.recorder, self._flush_s)
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
            if self.jack is not None and self.jack.gone:
                self._server_gone = True
                log.error("the JACK server went away; improvd exits (status %d) so that it can be restarted "
                          "once the server is back", EXIT_SERVER_GONE)
                return EXIT_SERVER_GONE
            stuck = self.jack.check() if self.jack is not None else []
            problems = self.watchdog.check() + stuck
            if problems:
                log.error("%s; improvd releases what sounds and exits (status %d) so that it can be restarted",
                          "; ".join(problems), EXIT_THREAD_FAILED)
                self.exit_status = EXIT_THREAD_FAILED
                return EXIT_THREAD_FAILED
            self._log_events()
            if self.overload is not None:
                self.overload.check()
            if self.stats_requested:
                self.stats_requested = False
                self._log_window_stats()
            if self.now() >= next_check:
                next_check = self.now() + PORT_CHECK_S
                self.check_ports()

    def check_ports(self) -> None:
        """Main thread, every PORT_CHECK_S: notice ports that went away or came back (a lost output releases what
        sounds through its `on_lost`; the keys held on a lost input are released here)."""
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

    def _log_window_stats(self) -> None:
        """SIGUSR1: lateness of the events sent since the previous SIGUSR1, input counts and memory."""
        stats = self.scheduler.stats(since=self._stats_mark) if self.scheduler is not None else {}
        self._stats_mark = stats.get("sent", 0)
        received = self.sink.received if self.sink is not None else 0
        dropped = self.sink.dropped if self.sink is not None else 0
        log.info("%s", statslog.format_window_stats(stats, received, dropped, statslog.rss_mb()))

    def _log_events(self) -> None:
        if self.events is None:
            return
        while self.events:
            what, t_s, msg = self.events.popleft()
            log.debug("%s", statslog.format_event(what, t_s - self.start_s, msg))

    def reload(self) -> bool:
        """SIGHUP: the config file again (with the same overrides) and its model, swapped in between phrases.

        `run` calls it on a thread of its own ("improvd-reload"), so the main thread stays free to stop
        (`daemon/live/reload.py`). [midi], [record] and [osc] are read at start only: the running ones are kept
        (and the engine keeps its [midi] too)."""
        loaded = reload_config(self.config, self.overrides, load=self.load_model)
        if loaded is None:
            return False
        new_config, new_model = loaded
        self.config = new_config
        self.engine.request_swap(new_config, new_model)
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
        if self.jack is not None and not self._server_gone and self.jack.stalled_now():
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
                log.info("%s", statslog.format_stats(self.scheduler.stats()))
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
            log.info("%s", statslog.format_input_totals(self.sink.received, self.sink.dropped,
                                                        getattr(self.input, "invalid", 0),
                                                        getattr(self.input, "recovered", 0)))
        if self.monitor is not None and not leave_ports:
            self.monitor.close()
        self._log_events()
        if self.recorder is not None:
            writer = self._writer or RecordWriter(self.recorder, self._flush_s)
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
