"""A daemon under test wired to a player and a receiver on one JACK server (`Session`): the rig of the end-to-end
tests of `improvd run`, with the phrase they play and the channels they use.

The player plays on channel 2 (`PLAYER_CH`, 0-based 1) and improvd answers on channel 1 (`IMPROVD_CH`); both reach
the receiver, so one clock (the server's frames) sees the phrase and the answer.
Called from the test's thread.
"""

from __future__ import annotations

from harness.clients import Player, Receiver, notes_of
from harness.daemon import Daemon, write_config
from harness.graph import assert_graph_clean, midi_lost
from harness.jack import JackServer, wire
from harness.procs import unique_id

PLAYER_CH = 1  # 0-based: channel 2
IMPROVD_CH = 0
PHRASE = [60, 62, 64, 65, 67, 65, 64, 62]
STEP_S, DUR_S = 0.15, 0.1  # the phrase's inter-onset interval and note length
SILENCE_S = 0.4  # the session's `improvise.silence`


class Session:
    """A daemon, a player and a receiver wired together on `server` (the receiver hears the player and improvd).

    `improvise`, `midi` and `record` add to (or replace) the session's config sections; `extra` are more arguments
    for `improvd run`. `close()` also fails when the server's log names improvd's clients in xruns."""

    def __init__(self, server: JackServer, tmp_path, model, *, improvise=None, midi=None, record=None,
                 extra=()):
        self.server = server
        self.daemon_model = model.path
        self.client = f"improvd-e2e-{unique_id()}"
        improvise = {"temperature": 0.0, "silence": SILENCE_S, "max_notes": 12, "answer_length": "max",
                     "velocity": "fixed",
                     **(improvise or {})}
        midi = {"client_name": self.client, **(midi or {})}
        config = write_config(tmp_path / f"{self.client}.toml", model=model.path, midi=midi, improvise=improvise,
                              record=record)
        self.server_log_start = server.log_size()  # xruns after this mark are this session's
        self.receiver = Receiver(server)
        self.player = Player(server)
        self.daemon = Daemon(server, config, *extra)
        try:
            self.daemon.wait_ready()
            self.in_port, self.out_port = wire(server, [self.player], [self.receiver], client=self.client,
                                               monitor=True)
        except BaseException:
            self.close()
            raise

    def events(self, channel):
        """The receiver's note events on one channel."""
        return [e for e in self.receiver.events if e.channel == channel and e.kind != "other"]

    def wait_answer_notes(self, n, timeout=10.0):
        """Wait for `n` note-ons from improvd at the receiver; fewer is a correctness failure (`midi_lost`)."""
        ok = self.receiver.wait_events(
            lambda evs: sum(e.kind == "on" and e.channel == IMPROVD_CH for e in evs) >= n, timeout)
        if not ok:  # notes not answered: a correctness failure, never excused by timing evidence
            midi_lost(self.server, self.server_log_start, f"the receiver saw fewer than {n} notes from improvd "
                                                          f"within {timeout} s\n{self.daemon.log()}")

    def close(self):
        self.daemon.stop()
        self.player.stop()
        self.receiver.stop()
        # whatever the test checked, improvd's clients must not have cost the graph its cycles
        assert_graph_clean(self.server, self.server_log_start)


def heard_notes(s: Session) -> list[list]:
    """The player's notes as the session's receiver saw them, each with its note-off (a missing one is MIDI the
    server lost in a missed cycle, or a failure)."""
    heard = notes_of(s.receiver.events, PLAYER_CH)
    if any(n[2] is None for n in heard):
        midi_lost(s.server, s.server_log_start, f"the receiver saw no note-off for some of the player's notes: {heard}")
    return heard
