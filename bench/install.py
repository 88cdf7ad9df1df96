"""From `pip install` to the first answered note, as a new user gets there; prints JSON.

Builds the wheel from this checkout (not timed), then times: a fresh venv, `pip install` of the wheel (its
dependencies come from pip's cache where they are), `improvd run` with no config file from an empty folder on a
JACK dummy server until its 'ready' line, and a played phrase until the first note improvd answers at an
independent receiver. Usage:

    .venv/bin/python bench/install.py [--wheel dist/improvd-X.whl]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from harness.clients import Player, Receiver, phrase  # noqa: E402
from harness.daemon import Daemon  # noqa: E402
from harness.install import install_wheel  # noqa: E402
from harness.jack import JackServer, wire  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wheel", type=Path, help="an improvd wheel (default: build one from this checkout)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="improvd-install-") as tmp:
        root = Path(tmp)
        wheel = args.wheel
        if wheel is None:
            subprocess.run([sys.executable, "-m", "build", "--wheel", "--outdir", str(root / "dist"), str(REPO)],
                           check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            wheel = next((root / "dist").glob("improvd-*.whl"))
        user = install_wheel(wheel, root)
        venv_s, pip_s = user.venv_s, user.install_s
        server = JackServer().start(root)
        try:
            receiver, player = Receiver(server), Player(server)
            started = time.perf_counter()
            daemon = Daemon(server, None, command=[str(user.improvd)], cwd=user.work, env=user.env)
            daemon.wait_ready(60.0)
            ready_s = time.perf_counter() - started
            wire(server, [player], [receiver])
            time.sleep(0.3)
            player.play(phrase([60, 62, 64, 65, 67, 65, 64, 62], step_s=0.15, duration_s=0.1))
            played = time.perf_counter()
            answered = receiver.wait_events(lambda evs: any(e.kind == "on" for e in evs), 15.0)
            answer_s = time.perf_counter() - played if answered else None
            rc = daemon.stop()
            player.stop()
            receiver.stop()
        finally:
            server.stop()
        print(json.dumps({
            "wheel": wheel.name, "wheel_mb": round(wheel.stat().st_size / 1e6, 2),
            "wheel_top_level": sorted({n.split("/")[0] for n in zipfile.ZipFile(wheel).namelist()}),
            "venv_s": round(venv_s, 2), "pip_install_s": round(pip_s, 2), "start_to_ready_s": round(ready_s, 2),
            "phrase_end_to_first_answer_s": None if answer_s is None else round(answer_s, 3),
            "install_to_first_answer_s": None if answer_s is None else round(venv_s + pip_s + ready_s + answer_s, 2),
            "improvd_exit": rc, "loadavg": Path("/proc/loadavg").read_text().split()[:3],
        }, indent=2))
        return 0 if answered and rc == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
