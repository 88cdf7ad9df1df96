"""Configuration: one TOML file, one frozen dataclass per section, every value checked.

`load_config(path, overrides)` reads the file (or the built-in defaults when there is none), applies the
`--set section.key=value` overrides and returns a `Config`. Unknown sections or keys, wrong types and values out
of range raise `ConfigError` naming the key, the value and what is allowed. The objects are passed down to the
parts; there are no module-level globals.

Threads: pure parsing and checks, called by the main thread (start-up, `improvd config`, `improvd train`) and by
the daemon's reload thread (daemon/live/reload.py reads the file again).
"""

from __future__ import annotations

import dataclasses
import math
import os
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from improvd.core.errors import ConfigError
from improvd.core.presets import PRESETS
from improvd.core.paths import SHIPPED_MODEL, USER_CONFIG

DEFAULT_CONFIG_NAMES = ("config.toml", USER_CONFIG)


def _opt(default: Any, *, lo: float | None = None, hi: float | None = None,
         choices: tuple | None = None, path: bool = False, words: tuple = ()) -> Any:
    """A dataclass field with its allowed range or choices (checked by `_check`); `words` are strings a number-typed
    key also accepts (its annotation is then `number | str`, e.g. improvise.silence = "auto")."""
    meta = {"lo": lo, "hi": hi, "choices": choices, "path": path, "words": tuple(words)}
    if isinstance(default, (list, tuple)):
        return field(default=tuple(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class DataConfig:
    """Where training data comes from and how it is split."""

    corpus: str = _opt("bach", choices=("bach",))
    cache_dir: str = _opt("~/.cache/improvd", path=True)
    cache_max_mb: int = _opt(4096, lo=1, hi=1 << 24)
    val_fraction: float = _opt(0.15, lo=0.01, hi=0.9)
    seed: int = _opt(1234, lo=0)
    workers: int = _opt(0, lo=0, hi=256)
    group_melodies: bool = _opt(True)


@dataclass(frozen=True)
class TrainConfig:
    """How a model is trained; the preset fixes the architecture and its hyper-parameters."""

    preset: str = _opt("default", choices=tuple(PRESETS))
    epochs: int = _opt(0, lo=0, hi=100000)
    max_minutes: float = _opt(0.0, lo=0.0)
    batch_size: int = _opt(0, lo=0, hi=65536)
    seed: int = _opt(1234, lo=0)
    runs_dir: str = _opt("runs", path=True)
    units: tuple[int, ...] = _opt((), lo=1, hi=4096)
    learning_rate: float = _opt(0.0, lo=0.0, hi=1.0)
    seq_length: int = _opt(0, lo=0, hi=100000)
    mixed_precision: bool = _opt(False)


@dataclass(frozen=True)
class EvalConfig:
    """The evaluation protocol shared by every model and baseline."""

    context: int = _opt(25, lo=1, hi=4096)
    batch_size: int = _opt(512, lo=1, hi=1 << 20)


@dataclass(frozen=True)
class ModelConfig:
    """The ONNX model the daemon and `improvd generate` run."""

    path: str = _opt(str(SHIPPED_MODEL), path=True)
    threads: int = _opt(1, lo=1, hi=64)


@dataclass(frozen=True)
class MidiConfig:
    """MIDI ports and channels. Channels are 1-based here, as a musician reads them."""

    api: str = _opt("auto", choices=("auto", "alsa", "jack", "coremidi", "winmm"))
    client_name: str = _opt("improvd")
    input: str = _opt("virtual:improvd in")
    output: str = _opt("virtual:improvd out")
    input_channels: tuple[int, ...] = _opt((), lo=1, hi=16)
    output_channel: int = _opt(1, lo=1, hi=16)
    clock: str = _opt("")
    thru: bool = _opt(False)
    program: int = _opt(-1, lo=-1, hi=127)


@dataclass(frozen=True)
class ImproviseConfig:
    """What improvd plays and when."""

    mode: str = _opt("respond", choices=("respond", "continuous"))
    silence: float | str = _opt("auto", lo=0.05, hi=60.0, words=("auto",))
    answer_length: str = _opt("match")
    polyphony: int | str = _opt(0, lo=0, hi=16, words=("match",))
    register: str = _opt("free", choices=("free", "match"))
    max_notes: int = _opt(128, lo=1, hi=10000)
    max_seconds: float = _opt(8.0, lo=0.1, hi=3600.0)
    temperature: float = _opt(0.9, lo=0.0, hi=10.0)
    top_p: float = _opt(0.95, lo=0.01, hi=1.0)
    pitch_range: tuple[int, ...] = _opt((21, 108), lo=0, hi=127)
    step_range: tuple[float, ...] = _opt((0.0, 2.0), lo=0.0, hi=60.0)
    duration_range: tuple[float, ...] = _opt((0.03, 4.0), lo=0.001, hi=60.0)
    velocity: str = _opt("follow", choices=("model", "follow", "fixed"))
    fixed_velocity: int = _opt(90, lo=1, hi=127)
    window: int = _opt(64, lo=1, hi=100000)
    seed: int = _opt(-1, lo=-1)
    max_hold: float = _opt(8.0, lo=0.1, hi=3600.0)
    key: str = _opt("none")
    key_strength: float = _opt(1.0, lo=0.0, hi=1.0)
    adapt: str = _opt("off", choices=("off", "cache", "pitch"))
    adapt_memory: int = _opt(1000, lo=1, hi=100000)


QUANTIZE_CHOICES = ("off", "1/1", "1/2", "1/4", "1/8", "1/16", "1/32", "1/2t", "1/4t", "1/8t", "1/16t", "1/32t",
                    "1/2d", "1/4d", "1/8d", "1/16d")


@dataclass(frozen=True)
class TimingConfig:
    """Tempo: MIDI clock, the grid answers are quantized to, and following the player's pulse."""

    follow_clock: bool = _opt(True)
    bpm: float = _opt(120.0, lo=0.0, hi=400.0)
    quantize: str = _opt("off", choices=QUANTIZE_CHOICES)
    follow_tempo: bool = _opt(False)
    reference_ioi: float = _opt(0.0, lo=0.0, hi=10.0)
    time_scale_range: tuple[float, ...] = _opt((0.25, 4.0), lo=0.05, hi=20.0)


@dataclass(frozen=True)
class ControlConfig:
    """Live control by MIDI control change (CC numbers 0..127; -1 = not mapped) and the state-out CC."""

    channel: int = _opt(0, lo=0, hi=16)
    temperature: int = _opt(-1, lo=-1, hi=127)
    temperature_range: tuple[float, ...] = _opt((0.0, 2.0), lo=0.0, hi=10.0)
    top_p: int = _opt(-1, lo=-1, hi=127)
    top_p_range: tuple[float, ...] = _opt((0.5, 1.0), lo=0.01, hi=1.0)
    max_notes: int = _opt(-1, lo=-1, hi=127)
    max_notes_range: tuple[int, ...] = _opt((1, 64), lo=1, hi=10000)
    key_strength: int = _opt(-1, lo=-1, hi=127)
    mode: int = _opt(-1, lo=-1, hi=127)
    mute: int = _opt(-1, lo=-1, hi=127)
    panic: int = _opt(-1, lo=-1, hi=127)
    reload: int = _opt(-1, lo=-1, hi=127)
    forget: int = _opt(-1, lo=-1, hi=127)
    state_cc: int = _opt(-1, lo=-1, hi=127)
    state_values: tuple[int, ...] = _opt((0, 64, 127), lo=0, hi=127)


CONTROL_FUNCTIONS = ("temperature", "top_p", "max_notes", "key_strength", "mode", "mute", "panic", "reload",
                     "forget")


@dataclass(frozen=True)
class OscConfig:
    """OSC control and state messages over UDP (daemon/io/osc.py); off by default."""

    enabled: bool = _opt(False)
    listen: str = _opt("127.0.0.1")
    port: int = _opt(9000, lo=0, hi=65535)
    allow_network: bool = _opt(False)
    send_to: str = _opt("")


@dataclass(frozen=True)
class RecordConfig:
    """Session recordings."""

    dir: str = _opt("", path=True)
    flush_seconds: float = _opt(10.0, lo=0.2, hi=10.0)
    rotate_minutes: float = _opt(60.0, lo=1.0, hi=10080.0)


@dataclass(frozen=True)
class LogConfig:
    """Logging to stderr."""

    level: str = _opt("info", choices=("debug", "info", "warning", "error"))


@dataclass(frozen=True)
class Config:
    """The whole configuration; `source` is the file it came from (None for the built-in defaults)."""

    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    midi: MidiConfig = field(default_factory=MidiConfig)
    improvise: ImproviseConfig = field(default_factory=ImproviseConfig)
    timing: TimingConfig = field(default_factory=TimingConfig)
    control: ControlConfig = field(default_factory=ControlConfig)
    osc: OscConfig = field(default_factory=OscConfig)
    record: RecordConfig = field(default_factory=RecordConfig)
    log: LogConfig = field(default_factory=LogConfig)
    source: str | None = None

    def replace(self, **sections: Any) -> "Config":
        """A copy with whole sections replaced."""
        return dataclasses.replace(self, **sections)

    def with_overrides(self, overrides: list[str]) -> "Config":
        """A copy with `section.key=value` overrides applied and checked."""
        raw = self.to_dict()
        for item in overrides:
            section, key, value = parse_override(item)
            raw.setdefault(section, {})[key] = value
        base = Path(self.source).parent if self.source else None
        return from_dict(raw, base_dir=base, source=self.source)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Plain data (lists for tuples), the form written into run directories and model cards."""
        out: dict[str, dict[str, Any]] = {}
        for name in _section_types():
            section = getattr(self, name)
            out[name] = {k: list(v) if isinstance(v, tuple) else v
                         for k, v in dataclasses.asdict(section).items()}
        return out


def _section_types() -> dict[str, type]:
    hints = typing.get_type_hints(Config)
    return {f.name: hints[f.name] for f in dataclasses.fields(Config) if f.name != "source"}


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is tuple:
        return f"a list of {typing.get_args(tp)[0].__name__}"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[tp]


def _coerce(where: str, tp: Any, value: Any) -> Any:
    """Check `value` against the annotated type; ints are accepted where floats are expected."""
    if typing.get_origin(tp) is tuple:
        item_tp = typing.get_args(tp)[0]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} = {value!r} is not valid: expected {_type_name(tp)}")
        return tuple(_coerce(f"{where}[{i}]", item_tp, v) for i, v in enumerate(value))
    if tp is bool:
        ok = isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok:
            try:
                number = float(value)
            except OverflowError:
                number = math.inf
            if not math.isfinite(number):  # nan passes every range check, inf means nothing here
                raise ConfigError(f"{where} = {value!r} is not valid: expected a finite number")
            value = number
    else:
        ok = isinstance(value, str)
    if not ok:
        raise ConfigError(f"{where} = {value!r} is not valid: expected {_type_name(tp)}")
    return value


def _check_range(where: str, value: Any, meta: dict) -> None:
    items = value if isinstance(value, tuple) else (value,)
    for v in items:
        if meta["choices"] is not None and v not in meta["choices"]:
            allowed = ", ".join(repr(c) for c in meta["choices"])
            raise ConfigError(f"{where} = {v!r} is not valid: allowed values are {allowed}")
        if meta["lo"] is not None and v < meta["lo"] or meta["hi"] is not None and v > meta["hi"]:
            lo = meta["lo"] if meta["lo"] is not None else "-inf"
            hi = meta["hi"] if meta["hi"] is not None else "inf"
            raise ConfigError(f"{where} = {v!r} is out of range: allowed {lo}..{hi}")


def _check_pairs(name: str, section: Any) -> None:
    """Keys that are [low, high] ranges (`*_range`) need exactly two ordered values."""
    for f in dataclasses.fields(section):
        if f.name.endswith("_range"):
            value = getattr(section, f.name)
            if len(value) != 2 or value[0] > value[1]:
                raise ConfigError(f"{name}.{f.name} = {list(value)!r} is not valid: expected [low, high] with "
                                  f"low <= high")


def _check_special(name: str, section: Any) -> None:
    """Checks that need more than a range: keys, tempo, CC assignments."""
    if name == "improvise":
        from improvd.daemon.music.keys import VALID_FORMS, check_key_setting  # here: numpy stays out of a bare config load
        try:
            check_key_setting(section.key)
        except ValueError:
            raise ConfigError(f"improvise.key = {section.key!r} is not valid: expected {VALID_FORMS}") from None
        from improvd.daemon.music.turns import parse_answer_length
        try:
            parse_answer_length(section.answer_length)
        except ValueError as err:
            raise ConfigError(f"improvise.{err}") from None
    elif name == "timing":
        if 0 < section.bpm < 20:
            raise ConfigError(f"timing.bpm = {section.bpm!r} is out of range: allowed 0 (follow the player's pulse) "
                              f"or 20..400")
    elif name == "osc":
        from improvd.daemon.control.oscaddr import check_osc  # here: kept out of a bare config load
        try:
            check_osc(section)
        except ValueError as err:
            raise ConfigError(str(err)) from None
    elif name == "control":
        if len(section.state_values) != 3:
            raise ConfigError(f"control.state_values = {list(section.state_values)!r} is not valid: expected three "
                              f"CC values [idle, listening, answering], each 0..127")
        used: dict[int, str] = {}
        for function in CONTROL_FUNCTIONS:
            cc = getattr(section, function)
            if cc >= 0 and cc in used:
                raise ConfigError(f"control.{function} = {cc} is not valid: CC {cc} is already mapped to "
                                  f"control.{used[cc]}; give each function its own CC number")
            if cc >= 0:
                used[cc] = function


def _build_section(name: str, cls: type, raw: dict[str, Any], base_dir: Path | None) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"[{name}] must be a table of keys, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values = {}
    for key, value in raw.items():
        if key not in fields:
            raise ConfigError(f"unknown key {name}.{key} = {value!r}; valid keys in [{name}]: {', '.join(fields)}")
        where = f"{name}.{key}"
        meta = fields[key].metadata
        tp = hints[key]
        if meta.get("words"):  # `number | str`: one of the words, or a number
            if isinstance(value, str):
                if value not in meta["words"]:
                    number = next(t for t in typing.get_args(tp) if t is not str)
                    raise ConfigError(f"{where} = {value!r} is not valid: expected {_type_name(number)} or "
                                      f"{' or '.join(repr(w) for w in meta['words'])}")
                values[key] = value
                continue
            tp = next(t for t in typing.get_args(tp) if t is not str)
        value = _coerce(where, tp, value)
        _check_range(where, value, meta)
        if fields[key].metadata.get("path") and value and base_dir is not None:
            expanded = os.path.expanduser(value)
            if not os.path.isabs(expanded):
                value = str(base_dir / expanded)
        values[key] = value
    section = cls(**values)
    _check_pairs(name, section)
    _check_special(name, section)
    return section


def from_dict(raw: dict[str, Any], *, base_dir: Path | None = None, source: str | None = None) -> Config:
    """Build a checked `Config` from parsed TOML; relative paths resolve against `base_dir`."""
    sections = _section_types()
    built = {}
    for name, value in raw.items():
        if name not in sections:
            raise ConfigError(f"unknown section [{name}]; valid sections: {', '.join(sections)}")
        built[name] = _build_section(name, sections[name], value, base_dir)
    return Config(**built, source=source)


def parse_override(item: str) -> tuple[str, str, Any]:
    """Split `section.key=value`; the value is read as TOML (`0.5`, `true`, `[1, 2]`), else taken as a string."""
    if "=" not in item or "." not in item.split("=", 1)[0]:
        raise ConfigError(f"--set {item!r} is not valid: expected section.key=value, e.g. improvise.temperature=0")
    lhs, text = item.split("=", 1)
    section, key = lhs.strip().split(".", 1)
    try:
        value = tomllib.loads(f"v = {text.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = text.strip()
    return section, key, value


def find_default_config() -> Path | None:
    """The first existing file of `DEFAULT_CONFIG_NAMES`, or None."""
    for name in DEFAULT_CONFIG_NAMES:
        path = Path(name).expanduser()
        if path.is_file():
            return path
    return None


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> Config:
    """Read a config file (or the default one, or the built-in defaults) and apply overrides.

    Args:
        path: a TOML file; None looks for `config.toml` here, then `~/.config/improvd/config.toml`.
        overrides: `section.key=value` strings, applied in order.

    Raises:
        ConfigError: the file is missing, unreadable, a directory, not UTF-8 or not TOML, or a key or value is not
            allowed.
    """
    return load_config_with_origins(path, overrides)[0]


ORIGIN_BUILT_IN, ORIGIN_FILE, ORIGIN_SET = "built-in", "file", "--set"


def load_config_with_origins(path: str | os.PathLike | None = None,
                             overrides: list[str] | None = None) -> tuple[Config, dict[str, str]]:
    """`load_config`, and where each key's value came from.

    Returns:
        The config, and {"section.key": origin} for every key of every section, the origin being
        `ORIGIN_BUILT_IN`, `ORIGIN_FILE` (the file named by `Config.source`) or `ORIGIN_SET` (a --set override;
        the last one of a key wins, as it does for the value).
    """
    file = Path(path) if path is not None else find_default_config()
    raw: dict[str, Any] = {}
    if file is not None:
        try:
            data = file.read_bytes()
        except FileNotFoundError as err:
            raise ConfigError(f"config file {str(file)!r} does not exist") from err
        except IsADirectoryError as err:
            raise ConfigError(f"config file {str(file)!r} is a directory, not a TOML file") from err
        except OSError as err:
            raise ConfigError(f"config file {str(file)!r} cannot be read: {err.strerror or err}") from err
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as err:
            line = data.count(b"\n", 0, err.start) + 1
            raise ConfigError(f"config file {str(file)!r} is not UTF-8 text: byte 0x{data[err.start]:02x} at line "
                              f"{line} (TOML files are UTF-8; save it as UTF-8)") from err
        try:
            raw = tomllib.loads(text)
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"config file {str(file)!r} is not valid TOML: {err}") from err
    source = str(file.resolve()) if file is not None else None
    config = from_dict(raw, base_dir=file.resolve().parent if file else None, source=source)
    config = config.with_overrides(overrides or [])
    origins = {f"{name}.{key}": ORIGIN_BUILT_IN for name, section in config.to_dict().items() for key in section}
    for name, section in raw.items():
        for key in section:
            origins[f"{name}.{key}"] = ORIGIN_FILE
    for item in overrides or []:
        name, key, _ = parse_override(item)
        origins[f"{name}.{key}"] = ORIGIN_SET
    return config, origins
