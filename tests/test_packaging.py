"""improvd as users get it: the sdist and the wheel built from the checkout, the wheel installed into a fresh venv
outside the checkout, and the `improvd` command run from an empty folder with no config file anywhere.

The slow tests share one build and one venv (module fixtures): `python -m build` makes the sdist, then the wheel
from that sdist (so the sdist is proven to hold what rebuilds the wheel), and pip installs the wheel with its
dependencies (from pip's cache where they are). The last test answers a phrase over a real JACK server with the
installed command and the packaged model.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import mido
import numpy as np
import pytest

from harness.install import Installed, install_wheel
from improvd.core import midifile
from improvd.daemon.cli import HANDLERS, build_parser

REPO = Path(__file__).resolve().parents[1]
UNIT = REPO / "contrib" / "improvd.service"
MAN_PAGE = REPO / "docs" / "improvd.1"


def run(cmd: list[str], *, timeout: float = 600, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL, **kwargs)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
    return done


# ---- fast: what the package says about itself ----------------------------------------------------------------------

def test_the_manual_page_names_every_subcommand_and_option():
    text = MAN_PAGE.read_text(encoding="utf-8")
    for command in HANDLERS:
        assert re.search(rf"^\.B {command}\b", text, re.M), f"docs/improvd.1 does not describe 'improvd {command}'"
    for option in ("--config", "--set", "--version", "--init", "--force"):
        assert option.replace("-", r"\-") in text, f"docs/improvd.1 does not mention {option}"
    assert set(build_parser()._subparsers._group_actions[0].choices) == set(HANDLERS)


def test_the_unit_runs_the_pipx_command_and_documents_itself_with_the_manual_page():
    text = UNIT.read_text(encoding="utf-8")
    assert "ExecStart=%h/.local/bin/improvd run" in text
    assert "Documentation=man:improvd(1)" in text
    assert "cp config.toml" not in text and ".local/share/doc" not in text  # no checkout, nothing uninstalled


# ---- slow: build, install, run --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> Path:
    """The sdist and, built from it, the wheel."""
    out = tmp_path_factory.mktemp("dist")
    run([sys.executable, "-m", "build", "--outdir", str(out), str(REPO)])
    return out


@pytest.fixture(scope="module")
def installed(dist, tmp_path_factory) -> Installed:
    """A fresh venv outside the checkout with the wheel installed; a home and a folder with no config in them."""
    return install_wheel(next(dist.glob("improvd-*.whl")), tmp_path_factory.mktemp("user"))


def improvd(installed, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    return run([str(installed.improvd), *args], cwd=installed.work, env=installed.env, check=check,
               timeout=timeout)


@pytest.mark.slow
def test_the_wheel_holds_one_import_package_its_data_and_the_manual_page(dist):
    wheel = next(dist.glob("improvd-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"improvd", f"{wheel.name.split('-py3')[0]}.dist-info",
                                                f"{wheel.name.split('-py3')[0]}.data"}
    for data in ("improvd/config.toml", "improvd/models/bach.onnx", "improvd/models/bach.card.json",
                 "improvd/models/bach.keras"):
        assert data in names
    assert not any(n.startswith("improvd/models/") and "window" in n for n in names)  # step format only
    assert any(n.endswith(".data/data/share/man/man1/improvd.1") for n in names)
    assert not any(n.startswith(("improvd/tests/", "improvd/bench/", "improvd/harness/")) for n in names)
    sdist = next(dist.glob("improvd-*.tar.gz"))
    members = {m.split("/", 1)[1] for m in tarfile.open(sdist).getnames() if "/" in m}
    for needed in ("pyproject.toml", "MANIFEST.in", "config.toml", "models/bach.onnx", "models/bach.card.json",
                   "models/bach.keras",
                   "docs/improvd.1", "daemon/cli.py", "train/fit.py", "export/onnx.py", "contrib/improvd.service"):
        assert needed in members, f"the sdist lacks {needed}"
    assert not any(m.startswith("harness/") for m in members), "the sdist holds the test harness"


@pytest.mark.slow
def test_site_packages_gets_improvd_and_its_dist_info_only(installed):
    site = installed.site
    ours = {p.name for p in site.iterdir() if p.name.lower().startswith("improvd")}
    assert ours == {"improvd", f"{installed.wheel.name.split('-py3')[0]}.dist-info"}
    for generic in ("daemon", "train", "export", "models", "tests", "harness"):
        assert not (site / generic).exists(), f"the wheel installed a top-level '{generic}'"
    assert (installed.venv / "share" / "man" / "man1" / "improvd.1").is_file()


@pytest.mark.slow
def test_version_config_and_help_work_from_any_folder_without_a_config_file(installed):
    version = improvd(installed, "--version").stdout.strip()
    assert re.fullmatch(r"improvd \d+\.\d+\.\d+\S*", version), version
    shown = improvd(installed, "config").stdout
    assert "Config file: none" in shown
    packaged = installed.site / "improvd" / "models" / "bach.onnx"
    assert f'path = "{packaged}"  # built-in' in shown
    assert re.search(r'^temperature = 0\.5  # --set$',
                     improvd(installed, "config", "--set", "improvise.temperature=0.5").stdout, re.M)
    assert "usage: improvd run" in improvd(installed, "run", "--help").stdout

    written = installed.home / ".config" / "improvd" / "config.toml"
    assert "wrote the default config" in improvd(installed, "config", "--init").stdout
    assert written.read_text(encoding="utf-8") == (REPO / "config.toml").read_text(encoding="utf-8")
    again = improvd(installed, "config", "--init", check=False)
    assert again.returncode == 2 and "--force" in again.stderr
    assert improvd(installed, "config", "--init", "--force").returncode == 0
    shown = improvd(installed, "config").stdout  # the home's config is found now, and it still uses the packaged model
    assert f"Config file: {written}" in shown and f'path = "{packaged}"  # built-in' in shown
    assert re.search(r'^temperature = 0\.9  # file$', shown, re.M)
    written.unlink()


@pytest.mark.slow
def test_generate_continues_a_prime_with_the_packaged_model(installed):
    prime = installed.work / "prime.mid"
    notes = np.array([[60 + 2 * i, 0.25 if i else 0.0, 0.2, 80] for i in range(8)], dtype=np.float64)
    midifile.write_notes(prime, [midifile.Track("prime", notes)])
    out = installed.work / "out.mid"
    improvd(installed, "generate", "--prime", "prime.mid", "--out", "out.mid", "--notes", "16", "--seed", "3")
    ons = [m for track in mido.MidiFile(out).tracks for m in track if m.type == "note_on" and m.velocity > 0]
    assert len(ons) >= 8 + 16


@pytest.mark.slow
def test_the_unit_file_verifies_against_the_installed_command(installed, tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    home = tmp_path / "home"
    (home / ".local" / "bin").mkdir(parents=True)
    (home / ".local" / "bin" / "improvd").symlink_to(installed.improvd)
    shutil.copy(UNIT, tmp_path / "improvd.service")
    env = dict(os.environ, HOME=str(home), MANPATH=str(installed.venv / "share" / "man"))
    done = run([analyze, "verify", str(tmp_path / "improvd.service")], env=env, check=False, cwd=tmp_path)
    assert done.returncode == 0 and done.stderr.strip() == "", done.stderr  # unknown keys are only warnings


@pytest.mark.slow
@pytest.mark.jack
def test_improvd_run_answers_a_phrase_with_the_packaged_model(installed, tmp_path):
    from harness.clients import Player, Receiver, phrase
    from harness.daemon import Daemon
    from harness.jack import JackServer, wire
    server = JackServer().start(tmp_path)
    daemon = receiver = player = None
    try:
        receiver = Receiver(server)
        player = Player(server)
        # As the systemd unit runs it: no --config, no config file, the user's umask 0077.
        daemon = Daemon(server, None, command=["/bin/sh", "-c", f'umask 077; exec "{installed.improvd}" "$@"',
                                               "improvd"], cwd=installed.work, env=installed.env)
        daemon.wait_ready()
        assert any("bach.onnx" in line for line in daemon.lines), daemon.log()
        listed = run([str(installed.improvd), "ports"], cwd=installed.work,
                     env={**server.env, **installed.env}, timeout=60).stdout
        assert "improvd in" in listed and "improvd out" in listed, listed
        wire(server, [player], [receiver])
        time.sleep(0.3)
        player.play(phrase([60, 62, 64, 65, 67, 65, 64, 62], step_s=0.15, duration_s=0.1))
        answered = receiver.wait_events(lambda evs: sum(e.kind == "on" for e in evs) >= 4, timeout=15.0)
        assert answered, "no answer from the installed improvd:\n" + daemon.log()
        assert daemon.stop() == 0, daemon.log()
        receiver.wait_quiet(0.3, 5.0)
        ons = sum(e.kind == "on" for e in receiver.events)
        offs = sum(e.kind == "off" for e in receiver.events)
        assert ons == offs, (f"{ons} note-ons, {offs} note-offs at the receiver: "
                             f"{[(round(e.t_s, 4), e.data) for e in receiver.events]}\n" + daemon.log())
    finally:
        for part in (daemon, player, receiver):
            if part is not None:
                part.stop()
        server.stop()
