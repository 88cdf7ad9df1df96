"""Small fakes shared by the daemon's unit tests: a settable clock, note messages, and rtmidi for the ports."""

import mido
import rtmidi


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


class FakeRt:
    """python-rtmidi's MidiIn/MidiOut, the surface the ports use: a port list the test changes (`names`), a queue of
    input (`messages` of (bytes, delta_s), popped by `get_message`), and every open, close, send and delete in
    `calls`. With `fail_open`, opening a port raises as rtmidi does for a port it cannot open."""

    def __init__(self, names=(), messages=()):
        self.names = list(names)
        self.messages = list(messages)
        self.calls = []
        self.fail_open = False
        self.ignored_types = None

    @property
    def sent(self):
        """The bytes of every message sent, in order."""
        return [call[1] for call in self.calls if call[0] == "send"]

    @property
    def deleted(self):
        return ("delete",) in self.calls

    def get_ports(self):
        return list(self.names)

    def open_port(self, index, name):
        if self.fail_open:
            raise rtmidi.SystemError("busy")
        self.calls.append(("open", self.names[index]))

    def open_virtual_port(self, name):
        self.calls.append(("virtual", name))

    def close_port(self):
        self.calls.append(("close",))

    def send_message(self, data):
        self.calls.append(("send", tuple(data)))

    def get_message(self):
        return self.messages.pop(0) if self.messages else None

    def ignore_types(self, **kwargs):
        self.ignored_types = kwargs

    def delete(self):
        self.calls.append(("delete",))


class FakeMidi:
    """Stands for `open_rt_client` (daemon/io/port.py) when a test builds a port: the clients opened are `rts` in
    order (the port's own first, then e.g. an input's EOX guard on JACK), and any further one a new FakeRt without
    ports (an EOX guard then finds nothing to connect to). `opened` lists what was asked: (direction, api,
    client_name, keyword arguments)."""

    def __init__(self, *rts):
        self.rts = list(rts)
        self.opened = []

    def __call__(self, direction, api, client_name, **kwargs):
        self.opened.append((direction, api, client_name, kwargs))
        return (self.rts.pop(0) if self.rts else FakeRt()), frozenset()
