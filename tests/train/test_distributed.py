"""`improvd train --distributed` for real: two worker processes on this machine (loopback, CPU) train together
under `MultiWorkerMirroredStrategy`."""

import csv
import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from improvd.core.midifile import Track, write_notes
from harness.trainfiles import melody
from improvd.train.distribute import Cluster, read_tf_config

REPO = Path(__file__).resolve().parents[2]
needs_tf = pytest.mark.skipif(importlib.util.find_spec("tensorflow") is None,
                              reason="needs TensorFlow (pip install 'improvd[train]')")


def free_ports(n):
    """`n` distinct free TCP ports on 127.0.0.1 (bound together, so they differ, then released)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def test_read_tf_config_roles():
    assert read_tf_config({}) == Cluster(1, None, 0)
    two = {"cluster": {"worker": ["127.0.0.1:1", "127.0.0.1:2"]}, "task": {"type": "worker", "index": 1}}
    c = read_tf_config({"TF_CONFIG": json.dumps(two)})
    assert (c.workers, c.task_index, c.is_chief) == (2, 1, False)
    two["task"]["index"] = 0
    assert read_tf_config({"TF_CONFIG": json.dumps(two)}).is_chief
    with_chief = {"cluster": {"chief": ["127.0.0.1:1"], "worker": ["127.0.0.1:2"]}, "task": {"type": "worker",
                                                                                              "index": 0}}
    c = read_tf_config({"TF_CONFIG": json.dumps(with_chief)})
    assert c.workers == 2 and not c.is_chief
    with pytest.raises(ValueError, match="TF_CONFIG is not valid"):
        read_tf_config({"TF_CONFIG": "{not json"})
    with pytest.raises(ValueError, match="'ps'"):
        read_tf_config({"TF_CONFIG": json.dumps({**two, "task": {"type": "ps", "index": 0}})})


@pytest.mark.tf
@pytest.mark.slow
@needs_tf
def test_two_workers_train_together(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for i in range(10):
        write_notes(data / f"m{i}.mid", [Track("t", melody(i))])
    runs = tmp_path / "runs"
    ports = free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    procs, logs = [], []
    try:
        for index in range(2):
            tmp = tmp_path / f"tmp{index}"
            tmp.mkdir()
            env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TF_CPP_MIN_LOG_LEVEL": "2", "TMPDIR": str(tmp),
                   "TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}}),
                   "PYTHONPATH": str(REPO)}
            log = open(tmp_path / f"worker{index}.log", "w")
            logs.append(log)
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "improvd.daemon.cli", "train", "--distributed", "--data", str(data), "--preset",
                 "tiny", "--epochs", "3", "--no-progress", "--config", str(REPO / "config.toml"),
                 "--set", f"data.cache_dir={tmp_path / 'cache'}", "--set", "data.workers=1",
                 "--set", f"train.runs_dir={runs}", "--set", "eval.batch_size=256",
                 "--set", "train.batch_size=4"],
                cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT))
        for proc in procs:
            proc.wait(timeout=240)  # about 40 s on an idle 2-core machine; margin for a loaded one
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for log in logs:
            log.close()
    out = [(tmp_path / f"worker{i}.log").read_text() for i in range(2)]
    for i, proc in enumerate(procs):
        assert proc.returncode == 0, f"worker {i} failed:\n{out[i][-4000:]}"
        assert f"listens on port {ports[i]} of every network interface, unauthenticated" in out[i]

    # The same weights on each worker after training.
    sums = [next(line.split()[-1] for line in text.splitlines() if "trained weights sha256" in line)
            for text in out]
    assert sums[0] == sums[1] and len(sums[0]) == 64

    # Exactly one run directory, written by the chief; the other worker left nothing behind.
    assert len(list(runs.iterdir())) == 1
    run = next(runs.iterdir())
    for name in ("model.keras", "last.keras", "config.json", "split.json", "metrics.json", "history.csv"):
        assert (run / name).is_file(), name
    assert not list((tmp_path / "tmp1").iterdir()), "the non-chief worker's temporary checkpoints remain"

    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["training"]["replicas"] == 2 and metrics["training"]["global_batch"] == 2 * 4
    assert json.loads((run / "config.json").read_text())["distributed"] == {"workers": 2, "replicas": 2}
    with open(run / "history.csv", newline="") as fh:
        losses = [float(row["loss"]) for row in csv.DictReader(fh)]
    assert len(losses) == 3 and losses[-1] < losses[0], losses
    steps = [int(line.split("/")[0]) for line in out[0].splitlines() if "/step" in line]
    assert len(steps) == 3 and min(steps) >= 2, steps  # several steps per epoch, taken together
