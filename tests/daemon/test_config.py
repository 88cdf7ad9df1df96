"""Tests for the configuration (core/config.py): loading, checking, --set overrides and paths."""

from pathlib import Path

import pytest

from improvd.core.config import Config, load_config, parse_override
from improvd.core.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str, name: str = "config.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_repo_config_loads_and_matches_the_defaults():
    config = load_config(REPO / "config.toml")
    assert config.source == str((REPO / "config.toml").resolve())
    assert config.improvise.temperature == 0.9
    assert config.improvise.pitch_range == (21, 108)
    assert config.improvise.step_range == (0.0, 2.0)
    assert config.model.path == str(REPO / "models" / "bach.onnx")
    # Every key of the file is one the code knows, with the value the dataclass defaults carry (paths aside).
    defaults = Config().to_dict()
    loaded = config.to_dict()
    assert set(loaded) == set(defaults)
    for section, keys in defaults.items():
        for key, value in keys.items():
            if key not in ("path", "cache_dir", "runs_dir", "dir"):
                assert loaded[section][key] == value, f"{section}.{key}"


def test_config_objects_are_frozen():
    config = load_config(REPO / "config.toml")
    with pytest.raises(AttributeError):
        config.improvise.temperature = 0.0  # type: ignore[misc]


def test_missing_file_and_bad_toml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
    bad = write(tmp_path, "[improvise\ntemperature = ")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


@pytest.mark.parametrize("text, names", [
    ("[improvize]\ntemperature = 0.5\n", ["improvize"]),
    ("[improvise]\ntemprature = 0.5\n", ["improvise.temprature", "0.5"]),
    ("[improvise]\ntemperature = \"hot\"\n", ["improvise.temperature", "'hot'", "number"]),
    ("[improvise]\nmax_notes = 2.5\n", ["improvise.max_notes", "2.5", "integer"]),
    ("[data]\ngroup_melodies = 1\n", ["data.group_melodies", "1", "true or false"]),
    ("[model]\nthreads = true\n", ["model.threads", "True", "integer"]),
    ("[improvise]\npitch_range = 60\n", ["improvise.pitch_range", "60", "list"]),
    ("[improvise]\ntemperature = 11.0\n", ["improvise.temperature", "11.0", "0.0..10.0"]),
    ("[improvise]\ntop_p = 0\n", ["improvise.top_p", "0", "0.01..1.0"]),
    ("[midi]\noutput_channel = 17\n", ["midi.output_channel", "17", "1..16"]),
    ("[midi]\ninput_channels = [1, 0]\n", ["midi.input_channels", "0", "1..16"]),
    ("[improvise]\nmode = \"solo\"\n", ["improvise.mode", "'solo'", "'respond'", "'continuous'"]),
    ("[log]\nlevel = \"loud\"\n", ["log.level", "'loud'", "'debug'"]),
    ("[improvise]\npitch_range = [80, 40]\n", ["improvise.pitch_range", "[80, 40]", "low <= high"]),
    ("[improvise]\nstep_range = [0.1]\n", ["improvise.step_range", "[0.1]", "[low, high]"]),
    ("[improvise]\nduration_range = [0.1, 0.2, 0.3]\n", ["improvise.duration_range", "[0.1, 0.2, 0.3]"]),
    ("improvise = 3\n", ["improvise", "3"]),
])
def test_bad_values_name_the_key_and_the_value(tmp_path, text, names):
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    message = str(info.value)
    for name in names:
        assert name in message, f"{name!r} not in {message!r}"


def test_unknown_key_lists_the_valid_ones(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, "[improvise]\ntemprature = 0.5\n"))
    assert "temperature" in str(info.value).split("valid keys", 1)[1]


@pytest.mark.parametrize("text, expected", [
    ("0.5", 0.5), ("0", 0), ("true", True), ("[1, 2]", [1, 2]), ("\"quoted\"", "quoted"),
    ("virtual:my port", "virtual:my port"), ("-1", -1), ("[0.0, 1.5]", [0.0, 1.5]),
])
def test_parse_override_reads_toml_values(text, expected):
    section, key, value = parse_override(f"improvise.x={text}")
    assert (section, key) == ("improvise", "x")
    assert value == expected and type(value) is type(expected)


def test_overrides_apply_and_are_checked(tmp_path):
    config = load_config(REPO / "config.toml", ["improvise.temperature=0", "improvise.pitch_range=[40, 90]",
                                                "midi.input=virtual:test in", "record.dir=rec",
                                                "data.group_melodies=false", "improvise.step_range=[0, 1]"])
    assert config.improvise.temperature == 0.0 and isinstance(config.improvise.temperature, float)
    assert config.improvise.pitch_range == (40, 90)
    assert config.improvise.step_range == (0.0, 1.0)
    assert config.midi.input == "virtual:test in"
    assert config.data.group_melodies is False
    assert config.record.dir == str(REPO / "rec")
    # Later overrides win.
    assert load_config(REPO / "config.toml", ["eval.context=10", "eval.context=12"]).eval.context == 12
    for bad, names in (("improvise.temperature=-1", ["improvise.temperature", "-1"]),
                       ("improvise.nope=1", ["improvise.nope", "1"]),
                       ("nope.key=1", ["nope"]),
                       ("improvise.temperature", ["improvise.temperature", "section.key=value"]),
                       ("temperature=0", ["temperature=0", "section.key=value"]),
                       ("improvise.mode=solo", ["improvise.mode", "'solo'"])):
        with pytest.raises(ConfigError) as info:
            load_config(REPO / "config.toml", [bad])
        for name in names:
            assert name in str(info.value), f"{name!r} not in {info.value}"


def test_relative_paths_resolve_against_the_config_folder(tmp_path, monkeypatch):
    folder = tmp_path / "conf"
    folder.mkdir()
    path = write(folder, "[model]\npath = \"m/x.onnx\"\n[record]\ndir = \"/abs/rec\"\n[data]\ncache_dir = \"~/c\"\n")
    monkeypatch.chdir(tmp_path)  # not the config's folder
    config = load_config(path, ["train.runs_dir=runs"])
    assert config.model.path == str(folder.resolve() / "m" / "x.onnx")
    assert config.train.runs_dir == str(folder.resolve() / "runs")
    assert config.record.dir == "/abs/rec"
    assert config.data.cache_dir == "~/c"  # a home path stays as written; it is expanded where it is used
    # Loading the resolved values again (as overrides do) keeps them.
    again = config.with_overrides(["improvise.temperature=0.1"])
    assert again.model.path == config.model.path


def test_no_file_gives_the_defaults(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    config = load_config(None, ["improvise.seed=7"])
    assert config.source is None
    assert config.improvise.seed == 7
    assert config.improvise.temperature == Config().improvise.temperature


# ---- improvd config: the effective configuration and its origins --------------------------------------------------

def test_the_printed_configuration_reads_back_as_the_same_config(tmp_path):
    import tomllib

    from improvd.core.config import from_dict, load_config_with_origins
    from improvd.daemon.config_cmd import format_effective

    path = write(tmp_path, '[improvise]\ntemperature = 0.3\nkey = "D dorian"\n[midi]\noutput = "a \\"quoted\\" port"\n')
    config, origins = load_config_with_origins(path, ["improvise.temperature=0.7", "record.dir=rec"])
    text = format_effective(config, origins)
    assert from_dict(tomllib.loads(text)) == config.replace(source=None)
    shown, section = {}, ""
    for line in text.splitlines():
        if line.startswith("["):
            section = line.strip("[]")
        elif " = " in line:
            shown[f"{section}.{line.split(' = ')[0]}"] = line.rsplit("  # ", 1)[1]
    assert shown == origins
    assert shown["improvise.temperature"] == "--set" and shown["improvise.key"] == "file"
    assert shown["midi.output"] == "file" and shown["record.dir"] == "--set"
    assert shown["improvise.max_notes"] == "built-in" and shown["control.temperature"] == "built-in"
    assert f"Config file: {path.resolve()}" in text.splitlines()[0]


def test_origins_name_every_key_of_every_section():
    from improvd.core.config import ORIGIN_BUILT_IN, load_config_with_origins

    config, origins = load_config_with_origins(REPO / "config.toml", ["log.level=debug"])
    assert set(origins) == {f"{s}.{k}" for s, keys in config.to_dict().items() for k in keys}
    assert origins["log.level"] == "--set" and origins["model.path"] == ORIGIN_BUILT_IN
    assert origins["improvise.temperature"] == "file"


def test_config_init_writes_the_commented_default_and_never_overwrites_without_force(tmp_path):
    from improvd.daemon.config_cmd import write_default_config

    target = tmp_path / "a" / "b" / "config.toml"
    assert write_default_config(target) == target
    assert target.read_text(encoding="utf-8") == (REPO / "config.toml").read_text(encoding="utf-8")
    target.write_text("mine", encoding="utf-8")
    with pytest.raises(ConfigError, match="already exists; add --force"):
        write_default_config(target)
    assert target.read_text(encoding="utf-8") == "mine"
    write_default_config(target, force=True)
    assert load_config(target).improvise.temperature == 0.9
    with pytest.raises(ConfigError, match="is a folder"):
        write_default_config(tmp_path)
