"""improvd as a new user installs it: a fresh venv outside the checkout with a wheel installed by pip, and an empty
home and working folder, with a clean environment (no VIRTUAL_ENV or PYTHON* variables of the caller's; the venv's
bin first on PATH). Shared by tests/test_packaging.py and bench/install.py. Called from the caller's thread.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Installed:
    """A fresh install: the venv, its `improvd` command, an empty home and working folder, the environment to run
    the command in (`env`), the venv's site-packages, and how long the venv and `pip install` took (s)."""

    venv: Path
    improvd: Path
    home: Path
    work: Path
    env: dict
    site: Path
    wheel: Path
    venv_s: float
    install_s: float


def _run(cmd: list, **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, stdin=subprocess.DEVNULL,
                          timeout=600, **kwargs)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
    return done


def clean_env(venv: Path, home: Path) -> dict[str, str]:
    """The caller's environment without VIRTUAL_ENV* and PYTHON* variables, with `home` as HOME and the venv's bin
    first on PATH: what a user's shell gives the installed command."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHON"))}
    env.update(HOME=str(home), PATH=f"{venv / 'bin'}:{env.get('PATH', '/usr/bin:/bin')}")
    return env


def install_wheel(wheel: Path, root: Path) -> Installed:
    """Make `root`/venv with this Python, pip-install `wheel` into it (its dependencies from pip's cache where they
    are), and make `root`/home and `root`/work, both empty. RuntimeError with pip's output when a step fails."""
    root = Path(root)
    venv = root / "venv"
    started = time.perf_counter()
    _run([sys.executable, "-m", "venv", venv])
    venv_s = time.perf_counter() - started
    started = time.perf_counter()
    _run([venv / "bin" / "python", "-m", "pip", "install", "-q", "--disable-pip-version-check", wheel])
    install_s = time.perf_counter() - started
    home, work = root / "home", root / "work"
    home.mkdir()
    work.mkdir()
    env = clean_env(venv, home)
    site = Path(_run([venv / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                     cwd=work, env=env).stdout.strip())
    return Installed(venv=venv, improvd=venv / "bin" / "improvd", home=home, work=work, env=env, site=site,
                     wheel=Path(wheel), venv_s=venv_s, install_s=install_s)
