"""Where improvd's own files are: the package root, the shipped model, the commented default config, the version.

pyproject.toml maps the import package `improvd` to the repository's root folder, so `improvd.daemon` is
`daemon/` and the package data keeps its repository path: `config.toml` and `models/bach.onnx` lie under the
package root in a checkout, in an editable install and in an installed wheel alike. Pure; read at start-up by the
CLI and the config loader (main thread).
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = PACKAGE_ROOT / "config.toml"  # the commented default config (`improvd config --init` copies it)
SHIPPED_MODEL = PACKAGE_ROOT / "models" / "bach.onnx"  # step format; its card is bach.card.json beside it
SHIPPED_KERAS = SHIPPED_MODEL.with_suffix(".keras")  # its Keras weights, for `improvd train --init shipped`
USER_CONFIG = "~/.config/improvd/config.toml"
DISTRIBUTION = "improvd"


def version() -> str:
    """The installed distribution's version ("unknown" when improvd runs from a checkout that is not installed)."""
    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed)"
