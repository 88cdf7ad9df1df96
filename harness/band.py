"""A band on a JACK server for end-to-end tests: improvd with its timing, control and MIDI clock settings, a
`Source` that sends MIDI clock, the player's notes and CCs at their times, and a receiver that timestamps what the
source and improvd send on one clock (`Band`); with the builders of what the source sends (`notes`, `clock`) and
the reading of the clock a receiver saw (`tick_timeline`).

Called from the test's thread.
"""

from __future__ import annotations

import numpy as np

from harness.clients import Receiver, Source
from harness.daemon import Daemon, toml_config
from harness.graph import assert_graph_clean
from harness.jack import wire
from harness.procs import unique_id
from harness.session import IMPROVD_CH, PLAYER_CH

START, TICK, STOP = 0xFA, 0xF8, 0xFC
C_MAJOR = {0, 2, 4, 5, 7, 9, 11}


def notes(pitches, start_s, step_s, duration_s, channel=PLAYER_CH, velocity=90):
    """(t_s, [MIDI bytes]) of a monophonic phrase for a `Source`: a note-on and a note-off for each pitch."""
    out = []
    for i, p in enumerate(pitches):
        t = start_s + i * step_s
        out += [(t, [0x90 | channel, p, velocity]), (t + duration_s, [0x80 | channel, p, 0])]
    return out


def clock(start_s, bpm, beats, *, transport: bool = False):
    """Ticks (24 per beat) from start_s, and when the next tick would be; with `transport`, a Start 1 ms before
    the first tick."""
    tick_s = 60.0 / (bpm * 24)
    n = int(round(beats * 24))
    events = [(start_s + i * tick_s, [TICK]) for i in range(n)]
    if transport:
        events.insert(0, (max(0.0, start_s - 0.001), [START]))
    return events, start_s + n * tick_s


def tick_timeline(seen, n_first: int, tick_first_s: float, tick_then_s: float) -> np.ndarray:
    """The time of every tick position from the ticks a receiver saw (a dropped one is interpolated): positions
    from the intervals, in nominal tick lengths (`tick_first_s` for the first `n_first` positions, then
    `tick_then_s`)."""
    positions = [0]
    for interval in np.diff(seen):
        nominal = tick_first_s if positions[-1] < n_first else tick_then_s
        positions.append(positions[-1] + max(1, int(round(interval / nominal))))
    return np.interp(np.arange(positions[-1] + 1), positions, seen)


class Band:
    """improvd, a source and a receiver on the module's JACK server; the source reaches improvd's input (and its
    clock port, when there is one) and the receiver; so does improvd's output."""

    def __init__(self, server, tmp_path, model_path, *, improvise=None, timing=None, control=None, midi=None):
        self.server = server
        self.server_log_start = server.log_size()  # the driver's late wake-ups after this mark are this band's
        self.client = f"improvd-band-{unique_id()}"
        sections = {
            "model": {"path": str(model_path)},
            "midi": {"api": "jack", "client_name": self.client, **(midi or {})},
            "improvise": {"temperature": 0.0, "silence": 0.4, "max_notes": 12, "answer_length": "max",
                          "velocity": "fixed",
                          **(improvise or {})},
            "timing": timing or {},
            "control": control or {},
        }
        config = toml_config(tmp_path / f"{self.client}.toml", sections)
        self.receiver = Receiver(server)
        self.source = Source(server, "band")
        self.daemon = Daemon(server, config, "--verbose")
        try:
            self.daemon.wait_ready()
            self.in_port, self.out_port = wire(server, [self.source], [self.receiver], client=self.client,
                                               monitor=True)
            clock_port = [p for p in server.ports() if p.startswith(self.client) and p.endswith(":improvd clock")]
            if clock_port:
                server.connect(self.source.port, clock_port[0])
        except BaseException:
            self.close()
            raise

    def improvd_ons(self, after=-np.inf):
        return [e for e in list(self.receiver.events)
                if e.kind == "on" and e.channel == IMPROVD_CH and e.t_s >= after]

    def close(self):
        self.daemon.stop()
        self.source.stop()
        self.receiver.stop()
        # whatever the test checked, improvd's clients must not have cost the graph its cycles
        assert_graph_clean(self.server, self.server_log_start)
