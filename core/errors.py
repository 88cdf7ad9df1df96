"""The exceptions improvd raises: one base class, one subclass per kind of failure.

Messages name the bad value and what would be valid; the CLI prints them without a traceback.

Threads: definitions only; raised on any thread.
"""


class ImprovdError(Exception):
    """Base class of every error improvd raises on purpose."""


class ConfigError(ImprovdError):
    """A configuration file, key or value is wrong."""


class MidiFileError(ImprovdError):
    """A MIDI file cannot be read or holds nothing usable."""


class ModelError(ImprovdError):
    """A model file is missing, unreadable or of the wrong format."""


class PortError(ImprovdError):
    """A MIDI port cannot be found or opened."""
