"""`improvd config`: print the effective configuration with where each value came from, or write the default file.

`improvd config` prints every key of every section as TOML, each with a comment saying where its value came from
(built-in, the config file, or --set), so the output can be read, or saved and edited. `improvd config --init
[PATH]` writes the commented default config that ships with improvd (to `~/.config/improvd/config.toml` without a
PATH) and never overwrites a file unless `--force` is given. Main thread; nothing here is live.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path
from typing import Any, TextIO

from improvd.core.atomic import atomic_writer
from improvd.core.config import Config, load_config_with_origins
from improvd.core.errors import ConfigError
from improvd.core.paths import DEFAULT_CONFIG, USER_CONFIG


def toml_value(value: Any) -> str:
    """A config value written as TOML (tuples as arrays, strings quoted and escaped)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        if isinstance(value, float) and not math.isfinite(value):
            return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
        return repr(value)
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\t", "\\t")
        return f'"{escaped}"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML form for {value!r} ({type(value).__name__})")


def format_effective(config: Config, origins: dict[str, str]) -> str:
    """Every section and key as TOML, each line ending in a comment that says where its value came from
    ("built-in", "file": the config file named in the first line, or "--set")."""
    source = config.source or "none (no config file found: ./config.toml, then ~/.config/improvd/config.toml)"
    lines = [f"# improvd's effective configuration. Config file: {source}"]
    for name, section in config.to_dict().items():
        lines += ["", f"[{name}]"]
        for key, value in section.items():
            lines.append(f"{key} = {toml_value(value)}  # {origins[f'{name}.{key}']}")
    return "\n".join(lines) + "\n"


def write_default_config(path: str | os.PathLike, *, force: bool = False) -> Path:
    """Write the commented default config to `path` (its folders are created); returns the path written.

    Raises:
        ConfigError: `path` exists (and `force` is false) or is a folder, or it cannot be written.
    """
    target = Path(path).expanduser()
    if target.is_dir():
        raise ConfigError(f"{str(target)!r} is a folder; give the path of the config file to write, "
                          f"e.g. {str(target / 'config.toml')!r}")
    if target.exists() and not force:
        raise ConfigError(f"{str(target)!r} already exists; add --force to overwrite it")
    try:
        text = DEFAULT_CONFIG.read_bytes()
        with atomic_writer(target) as fh:
            fh.write(text)
    except OSError as err:
        raise ConfigError(f"cannot write the default config to {str(target)!r}: {err.strerror or err}") from err
    return target


def cmd_config(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """The `improvd config` subcommand; returns the exit status."""
    out = out or sys.stdout
    if args.init is not None:
        written = write_default_config(args.init or USER_CONFIG, force=args.force)
        print(f"wrote the default config to {written}", file=out)
        return 0
    config, origins = load_config_with_origins(args.config, args.overrides)
    out.write(format_effective(config, origins))
    return 0
