"""The daemon's entry point stays light: importing it (or generating with it) loads no TensorFlow, train or export."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
FORBIDDEN = ("tensorflow", "keras", "tf2onnx", "improvd.train", "improvd.export")

PROBE = """
import importlib, json, sys
imported = []
for name in {modules!r}:
    try:
        importlib.import_module(name)
        imported.append(name)
    except ModuleNotFoundError as err:
        if err.name != name:  # the module exists but needs something missing: that is a failure
            raise
{extra}
heavy = sorted(m for m in sys.modules if any(m == f or m.startswith(f + ".") for f in {forbidden!r}))
print(json.dumps({{"imported": imported, "heavy": heavy}}))
"""


def probe(modules, extra=""):
    code = PROBE.format(modules=list(modules), forbidden=FORBIDDEN, extra=extra)
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_importing_the_daemon_loads_no_tensorflow_train_or_export():
    result = probe(["improvd.daemon.cli", "improvd.daemon.live.service", "improvd.daemon.live.engine"])
    assert "improvd.daemon.cli" in result["imported"]
    assert result["heavy"] == []


def test_generate_loads_no_tensorflow_train_or_export(tmp_path):
    extra = f"""
from pathlib import Path
from harness.modelfactory import make_step_model
from improvd.daemon.cli import main
tmp = Path({str(tmp_path)!r})
make_step_model(tmp / "m.onnx")
assert main(["generate", "--config", "config.toml", "--model", str(tmp / "m.onnx"), "--out", str(tmp / "o.mid"),
             "--temperature", "0", "--notes", "4"]) == 0
"""
    result = probe(["improvd.daemon.cli"], extra)
    assert result["heavy"] == []
    assert (tmp_path / "o.mid").exists()
