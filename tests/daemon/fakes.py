"""Small fakes shared by the daemon's unit tests: a settable clock and note messages."""

import mido


class Clock:
    """A clock the test sets by hand (`clock.t = ...`); call it for the time in seconds."""

    def __init__(self, t=100.0):
        self.t = t

    def __call__(self):
        return self.t


def on(p, v=90, ch=0):
    return mido.Message("note_on", note=p, velocity=v, channel=ch)


def off(p, ch=0):
    return mido.Message("note_off", note=p, channel=ch)
