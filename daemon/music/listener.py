"""Listening: the keys and the sustain pedal the player holds, and the pending phrase (the player's completed notes
not yet answered) with the time it ends. Pure (the time is passed in); the engine thread owns one `Listener`.

A phrase is over after `improvise.silence` (a fixed silence, or "auto", measured in the player's pulse) once nothing
sounds: never while a key or the sustain pedal holds the sound (daemon/music/turns.py). Under an input flood (no
silence, no end of phrase) the pending phrase keeps only its last notes: max(`improvise.window`, the model's
context).
"""

from __future__ import annotations

import mido

from improvd.core.config import ImproviseConfig, MidiConfig
from improvd.daemon.music import turns
from improvd.daemon.music.tracker import HeardNote, NoteTracker, Update


class Listener:
    """The note tracker (rolling window), the sustain pedal and the pending phrase.

    Args:
        improvise: the [improvise] config (window, max_hold).
        midi: the [midi] config (the channels listened to).
    """

    def __init__(self, improvise: ImproviseConfig, midi: MidiConfig):
        self.tracker = NoteTracker.from_config(improvise, midi)
        self.sustain = turns.Sustain(improvise.max_hold)
        self.phrase: list[HeardNote] = []

    def configure(self, channels: list[int], window: int, max_hold_s: float, pedal_max_hold_s: float) -> None:
        """Take new settings (reload): the listened `channels` (0-based), the window, how long a key or the pedal
        may be held."""
        self.tracker.configure(channels, window, max_hold_s)
        self.sustain.max_hold_s = pedal_max_hold_s

    def handle(self, t_s: float, msg: mido.Message) -> Update:
        """A stamped message from the player: what it started or completed (`NoteTracker.handle`)."""
        if msg.type == "control_change":
            self.sustain.handle(t_s, msg, self.tracker.channels)
        return self.tracker.handle(t_s, msg)

    def expire(self, now: float) -> tuple[HeardNote, ...]:
        """The notes whose keys were held past max_hold, now completed; the pedal likewise released."""
        completed = self.tracker.expire(now)
        self.sustain.expire(now)
        return completed

    def next_expiry_s(self) -> float | None:
        """When a held key or the pedal next expires, or None."""
        due = [t for t in (self.tracker.next_expiry_s(), self.sustain.next_expiry_s()) if t is not None]
        return min(due) if due else None

    @property
    def listening(self) -> bool:
        """Whether a key is held or a phrase is pending."""
        return bool(self.tracker.held or self.phrase)

    def add(self, note: HeardNote, cap: int) -> None:
        """A completed note joins the pending phrase, which keeps its last `cap` notes."""
        self.phrase.append(note)
        if len(self.phrase) > cap:
            del self.phrase[:len(self.phrase) - cap]

    def phrase_end_s(self, silence) -> float | None:
        """When the pending phrase is over (`silence`: improvise.silence), or None (no phrase, or something held)."""
        if not self.phrase:
            return None
        quiet = self.sustain.quiet_since_s(self.tracker.quiet_since_s())
        return turns.phrase_end_s(silence, [n.onset_s for n in self.phrase], quiet)

    def take_phrase(self) -> list[HeardNote]:
        """The pending phrase, which is then empty."""
        phrase, self.phrase = self.phrase, []
        return phrase
