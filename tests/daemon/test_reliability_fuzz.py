"""Property and fuzz tests (hypothesis) for what faces the outside world: the config loader (any TOML-ish data,
any `--set`, any file), the note tracker (any note-on/note-off/timing) and the bounded input sink (any input under
any backlog). The MIDI file reader's fuzz test is in test_midifile.py; the scheduler's in test_scheduler.py.
"""

from __future__ import annotations

import dataclasses
import math
import queue
import typing

import mido
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from improvd.core import config as cfg
from improvd.core.config import Config, from_dict, load_config, parse_override
from improvd.core.errors import ConfigError
from improvd.daemon.live.inputsink import InputSink
from improvd.daemon.music.tracker import NoteTracker

SECTIONS = cfg._section_types()
KEYS = {name: [f.name for f in dataclasses.fields(cls)] for name, cls in SECTIONS.items()}
ALL_KEYS = sorted({k for keys in KEYS.values() for k in keys})

scalars = st.one_of(
    st.booleans(), st.integers(), st.integers(-2**70, 2**70), st.sampled_from([10**400, -10**400]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20), st.sampled_from(["", "auto", "jack", "respond", "continuous", "model", "off", "1/8", "C",
                                           "C major", "a minor", "none", "debug", "virtual:x", "~/x", "../x"]),
    st.datetimes(), st.dates(), st.times(), st.none())
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                      max_leaves=8)


def _typed_value(tp):
    """Values of roughly the right type, so that range and cross-key checks are reached too."""
    if typing.get_origin(tp) is tuple:
        return st.lists(_typed_value(typing.get_args(tp)[0]), max_size=4)
    if tp is bool:
        return st.booleans()
    if tp is int:
        return st.one_of(st.integers(-3, 130), st.integers())
    if tp is float:
        return st.one_of(st.floats(-5, 500), st.floats(allow_nan=True, allow_infinity=True), st.integers(-3, 130))
    return st.one_of(st.text(max_size=12), st.sampled_from(["auto", "respond", "continuous", "C", "D minor",
                                                             "none", "1/16", "fixed", "follow", ""]))


@st.composite
def sections(draw):
    raw = {}
    for _ in range(draw(st.integers(0, 4))):
        if draw(st.integers(0, 9)) == 0:
            raw[draw(st.text(max_size=8))] = draw(values)  # an unknown section or a section that is no table
            continue
        name = draw(st.sampled_from(sorted(SECTIONS)))
        hints = typing.get_type_hints(SECTIONS[name])
        table = raw.setdefault(name, {})
        if not isinstance(table, dict):
            continue
        for _ in range(draw(st.integers(0, 5))):
            if draw(st.integers(0, 9)) == 0:
                table[draw(st.sampled_from(ALL_KEYS + ["nope"]))] = draw(values)
            else:
                key = draw(st.sampled_from(KEYS[name]))
                table[key] = draw(st.one_of(_typed_value(hints[key]), values))
    return raw


def _check_valid(config: Config) -> None:
    """What a Config that loaded must satisfy: every number finite and within its range, tuples of the right type."""
    for name, cls in SECTIONS.items():
        section = getattr(config, name)
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            value = getattr(section, f.name)
            items = value if isinstance(value, tuple) else (value,)
            for v in items:
                if isinstance(v, float):
                    assert math.isfinite(v), (name, f.name, v)
                if f.metadata.get("lo") is not None and not isinstance(v, str):
                    assert v >= f.metadata["lo"], (name, f.name, v)
                if f.metadata.get("hi") is not None and not isinstance(v, str):
                    assert v <= f.metadata["hi"], (name, f.name, v)
            if typing.get_origin(hints[f.name]) is tuple:
                assert isinstance(value, tuple)


@settings(max_examples=600, deadline=None)
@given(raw=sections())
def test_any_toml_ish_data_gives_a_config_or_a_config_error(raw):
    """Any parsed-TOML-like data (including values TOML cannot hold: None, huge ints) -> Config or ConfigError."""
    try:
        config = from_dict(raw)
    except ConfigError as err:
        assert str(err)
        return
    _check_valid(config)


@settings(max_examples=300, deadline=None)
@given(items=st.lists(st.one_of(
    st.text(max_size=40),
    st.builds(lambda s, k, v: f"{s}.{k}={v}", st.sampled_from(sorted(SECTIONS) + ["x"]),
              st.sampled_from(ALL_KEYS + ["y"]),
              st.one_of(st.text(max_size=12), st.sampled_from(["nan", "inf", "-inf", "1e999", "[1, 2]", "[]", "true",
                                                                 "{a = 1}", "1979-05-27", "0x10", "9" * 400]))),
), max_size=4))
def test_any_set_override_gives_a_config_or_a_config_error(items):
    try:
        for item in items:
            parse_override(item)
        config = Config().with_overrides(items)
    except ConfigError as err:
        assert str(err)
        return
    _check_valid(config)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.one_of(st.text(max_size=200), st.binary(max_size=100).map(lambda b: b.decode("latin-1")),
                      st.builds(lambda s, k, v: f"[{s}]\n{k} = {v}\n", st.sampled_from(sorted(SECTIONS)),
                                st.sampled_from(ALL_KEYS), st.sampled_from(["nan", "inf", "1", "-1", '"x"', "[1, 2]",
                                                                            "true", "1979-05-27T07:32:00Z", "{}"]))))
def test_any_config_file_gives_a_config_or_a_config_error(tmp_path, text):
    path = tmp_path / "c.toml"
    path.write_bytes(text.encode("utf-8", errors="replace"))
    try:
        config = load_config(path)
    except ConfigError as err:
        assert str(err)
        return
    _check_valid(config)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.one_of(
    st.binary(max_size=200),
    st.builds(lambda head, junk, tail: head + junk + tail,
              st.sampled_from([b"", b"[improvise]\ntemperature = 0.5\n", b"[midi]\ninput = \"", b"# comment "]),
              st.binary(min_size=1, max_size=20),
              st.sampled_from([b"", b"\n", b"\"\n", b"\n[model]\npath = \"m.onnx\"\n"]))))
def test_any_bytes_as_a_config_file_give_a_config_or_a_config_error(tmp_path, data):
    """Raw bytes, not only text: invalid UTF-8 (a file saved as latin-1, a binary file given by mistake) is a
    ConfigError naming the file, never a UnicodeDecodeError."""
    path = tmp_path / "c.toml"
    path.write_bytes(data)
    try:
        config = load_config(path)
    except ConfigError as err:
        assert "c.toml" in str(err)
        return
    _check_valid(config)


# ---- the note tracker ------------------------------------------------------------------------------------------

events = st.lists(st.tuples(
    st.floats(-0.002, 2.0),  # time since the previous message (a little jitter backwards: two input threads)
    st.sampled_from(["on", "off", "on0", "cc"]),
    st.integers(0, 3),  # channel
    st.integers(58, 62),  # a few pitches, so that re-triggers and stray releases happen
    st.integers(1, 127)), max_size=80)


@settings(max_examples=500, deadline=None)
@given(evs=events, channels=st.sets(st.integers(0, 3), max_size=2), max_hold=st.floats(0.1, 3.0))
def test_note_tracker_never_loses_a_release_nor_makes_a_negative_duration(evs, channels, max_hold):
    tracker = NoteTracker(channels, window=16, max_hold_s=max_hold)
    t = 100.0
    pressed = 0
    completed = []
    for dt, kind, ch, pitch, vel in evs:
        t += dt
        if kind == "on":
            msg = mido.Message("note_on", channel=ch, note=pitch, velocity=vel)
        elif kind == "on0":
            msg = mido.Message("note_on", channel=ch, note=pitch, velocity=0)
        elif kind == "off":
            msg = mido.Message("note_off", channel=ch, note=pitch)
        else:
            msg = mido.Message("control_change", channel=ch, control=64, value=vel)
        repeats = tracker.repeats
        update = tracker.handle(t, msg)
        # a press, unless the tracker took it for the same note-on read twice (a held key, same velocity, <= 5 ms)
        pressed += kind == "on" and (not channels or ch in channels) and tracker.repeats == repeats
        assert tracker.repeats == repeats or kind == "on" and not update.note_on
        completed += update.completed
        assert tracker.held <= pressed
    completed += tracker.expire(t + max_hold + 1.0)  # the end: every key still held counts as released
    assert tracker.held == 0
    assert len(completed) == pressed  # every press is released exactly once
    assert all(n.duration_s >= 0 and n.duration_s <= max_hold + 1e-9 for n in completed)
    assert len(tracker.window_notes()) == min(pressed, 16)


# ---- the input sink --------------------------------------------------------------------------------------------

@settings(max_examples=300, deadline=None)
@given(ops=st.lists(st.one_of(
    st.tuples(st.just("msg"), st.sampled_from(["on", "off", "on0", "bend"]), st.integers(0, 1), st.integers(60, 62)),
    st.tuples(st.just("drain"), st.integers(0, 5), st.just(0), st.just(0))), max_size=60),
    limit=st.integers(0, 4))
def test_input_sink_passes_every_release_of_a_key_it_let_through(ops, limit):
    q = queue.SimpleQueue()
    sink = InputSink(q, None, None, limit=limit)
    passed = []
    for op, kind, ch, pitch in ops:
        if op == "drain":
            for _ in range(kind):
                try:
                    passed.append(q.get_nowait()[1])
                except queue.Empty:
                    break
            continue
        msg = {"on": mido.Message("note_on", channel=ch, note=pitch, velocity=90),
               "on0": mido.Message("note_on", channel=ch, note=pitch, velocity=0),
               "off": mido.Message("note_off", channel=ch, note=pitch),
               "bend": mido.Message("pitchwheel", channel=ch, pitch=1)}[kind]
        sink.put_nowait((0.0, msg))
        assert q.qsize() <= limit + 2 * 3  # bounded: beyond the limit only releases of held keys (2 ch x 3 keys)
    while True:
        try:
            passed.append(q.get_nowait()[1])
        except queue.Empty:
            break
    # What the engine saw: every key pressed is released afterwards, unless the input itself still holds it.
    held = set()
    for msg in passed:
        if msg.type == "note_on" and msg.velocity > 0:
            held.add((msg.channel, msg.note))
        elif msg.type in ("note_on", "note_off"):
            held.discard((msg.channel, msg.note))
    assert held == sink.held
    assert sink.received == sum(op == "msg" for op, *_ in ops)
    assert sink.received - sink.dropped == len(passed)


def test_the_config_fuzz_reaches_valid_configs_too():
    """Not all rejections: the typed strategies produce configs that load (checked once, deterministically)."""
    assert from_dict({"improvise": {"temperature": 0.5, "pitch_range": [30, 90]}}).improvise.temperature == 0.5
    with pytest.raises(ConfigError, match="finite"):
        from_dict({"improvise": {"silence": float("nan")}})
    with pytest.raises(ConfigError, match="record.flush_seconds"):
        from_dict({"record": {"flush_seconds": 60}})
    with pytest.raises(ConfigError, match="improvise.max_hold .*finite"):
        from_dict({"improvise": {"max_hold": 10**400}})  # too big for a float: once an OverflowError
