"""Live controls and thru: the control actions of CCs and OSC applied (mute, panic, reload, forget, [improvise]
values), and the player's notes passed through. Engine thread: the engine hands `LiveControls` the control changes
and actions from its input queue.

- Live control (`[control]`, daemon/control/cc.py): CCs change temperature, top_p, max_notes, key_strength and mode
  (from the next note; they stay across a reload: `LiveSettings`), mute (cancels the answer; phrases are still
  fed), panic (every sounding note released at once, improvd's and thru, an All Notes Off on the output channel,
  the answer and the pending phrase dropped), reload (`on_reload_request()` is called; the service reloads), forget
  (the session memory of `improvise.adapt` is cleared). Each CC is logged at debug.
- OSC (`[osc]`, daemon/io/osc.py): `Engine.control(action)` (any thread) queues a `control.Action`, applied in the
  engine thread as a CC's; besides the CC functions it may set `key` and `answer_length`, and `forget` (with
  adaptation off it logs "forget: no session memory").
- Session adaptation (`improvise.adapt = "cache"`, daemon/predict/adapt.py; what it learns from:
  daemon/live/feed.py): the forget control, and `Engine.forget()` from any thread (at the engine's next wake-up),
  clear its memory. A reload keeps the memory unless `adapt_memory` changed or adaptation was turned off
  (daemon/live/swap.py).
- Thru (`midi.thru`): the player's note-ons and note-offs on the listened channels are sent at once through the
  scheduler, each as a tracked note (so panic, Stop and exit release it; a key held past `improvise.max_hold` is
  released then).
"""

from __future__ import annotations

import logging
from typing import Callable

import mido

from improvd.daemon.control.cc import Action
from improvd.daemon.live.answer import AnswerPlayer
from improvd.daemon.live.feed import ModelFeed, call_hook
from improvd.daemon.live.scheduler import Scheduler
from improvd.daemon.live.settings import LiveSettings
from improvd.daemon.music.context import MusicContext
from improvd.daemon.music.listener import Listener

log = logging.getLogger("improvd.engine")

ALL_NOTES_OFF = 123  # the channel mode message panic sends (CC 123)


def all_notes_off(channel: int) -> mido.Message:
    """The All Notes Off message for `channel` (0-based)."""
    return mido.Message("control_change", control=ALL_NOTES_OFF, value=0, channel=channel)


class Thru:
    """The thru notes sounding, each a scheduler note ended by its note id (the scheduler owner is this object)."""

    def __init__(self, scheduler: Scheduler, now: Callable[[], float]):
        self._scheduler = scheduler
        self._now = now
        self._notes: dict[tuple[int, int], int] = {}  # (channel, pitch) -> the scheduler's note id

    def handle(self, msg: mido.Message, channels, max_hold_s: float) -> None:
        """A player's note-on or note-off: passed through at once (`channels`: those listened to, empty for all)."""
        key = (msg.channel, msg.note)
        if msg.type == "note_on" and msg.velocity > 0:
            if channels and msg.channel not in channels:
                return
            old = self._notes.pop(key, None)
            if old is not None:
                self._scheduler.end_note(old)
            now = self._now()
            self._notes[key] = self._scheduler.schedule_note(now, now + max_hold_s, msg.note, msg.velocity,
                                                             channel=msg.channel, owner=self)
        else:
            note_id = self._notes.pop(key, None)
            if note_id is not None:
                self._scheduler.end_note(note_id)  # O(log n): a flood of releases rebuilds no heap

    def release(self) -> None:
        """Release the thru notes sounding now (transport Stop); a key's later release then sends nothing."""
        for note_id in self._notes.values():
            self._scheduler.end_note(note_id)
        self._notes.clear()

    def forget(self) -> None:
        """Forget the thru notes, which the scheduler has already released (panic)."""
        self._notes.clear()


class LiveControls:
    """Applies the control actions (module docstring) to the engine's parts. Engine thread.

    Args:
        settings: the settings in effect (the CC mapping; the [improvise] values a control sets).
        context, feed, answers, listener, thru: the engine's parts a control acts on.
        scheduler: for panic's releases and All Notes Off.
        now: the clock, seconds.
        on_reload_request: called (no arguments) when the reload control is pressed.
    """

    def __init__(self, settings: LiveSettings, context: MusicContext, feed: ModelFeed, answers: AnswerPlayer,
                 listener: Listener, thru: Thru, scheduler: Scheduler, *, now: Callable[[], float],
                 on_reload_request: Callable[[], None] | None = None):
        self.muted = False
        self.on_reload_request = on_reload_request
        self._settings = settings
        self._context = context
        self._feed = feed
        self._answers = answers
        self._listener = listener
        self._thru = thru
        self._scheduler = scheduler
        self._now = now

    def control_change(self, msg: mido.Message) -> None:
        """A control change from the player: the actions it maps to (daemon/control/cc.py), each applied."""
        control = self._settings.control
        actions = control.handle(msg)
        function = control.function_of(msg)
        log.debug("CC %d = %d on channel %d%s", msg.control, msg.value, msg.channel + 1,
                  f" ({function})" if function else " (not mapped)")
        for action in actions:
            self.apply(action, f"CC {msg.control}")

    def apply(self, action: Action, source: str) -> None:
        """A control action (a CC's, or OSC's); `source` names it in the log."""
        if action.function == "panic":
            self.panic()
        elif action.function == "reload":
            log.info("reload requested by %s", source)
            call_hook(self.on_reload_request)
        elif action.function == "forget":
            self.forget(source)
        elif action.function == "mute":
            if action.value and not self.muted and self._answers.current is not None:
                self._answers.interrupt()
            self.muted = bool(action.value)
        else:
            self._settings.set(action.function, action.value)
            self._context.keep_auto_key(self._settings.improvise.key)
            self._feed.refresh_decoding()
            if action.function == "mode":
                self._answers.set_mode(action.value)
        log.debug("%s: %s%s", source, action.function, "" if action.value is None else f" = {action.value!r}")

    def forget(self, source: str) -> None:
        """The forget control (a CC, OSC, or `Engine.forget()`): clear what this session taught improvd
        (`improvise.adapt`'s session memory)."""
        improviser = self._feed.improviser
        if improviser.adapter is None:
            log.info('forget: no session memory (improvise.adapt = "off"), requested by %s', source)
        else:
            improviser.forget()
            log.info("forget: session memory cleared, requested by %s", source)

    def panic(self) -> None:
        """Release everything now: improvd's notes and the thru notes, then All Notes Off on the output channel; the
        answer and the pending phrase are dropped."""
        released = self._scheduler.cancel()
        self._scheduler.schedule_message(self._now(), all_notes_off(self._settings.config.midi.output_channel - 1))
        self._thru.forget()
        self._listener.phrase.clear()
        if self._answers.current is not None:
            self._answers.interrupt()
        log.info("panic: %d sounding notes released", released)
