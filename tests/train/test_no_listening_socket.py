"""Listening sockets (issue 17 item 10): multi-worker training is the one case where improvd listens (TensorFlow's
unauthenticated gRPC server); it says so when it starts, docs/training.md says how to keep it private, and a
single-machine `improvd train` listens on nothing."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from improvd.core.midifile import Track, write_notes
from improvd.train.distribute import read_tf_config, server_warning
from harness.trainfiles import melody

REPO = Path(__file__).resolve().parents[2]
needs_tf = pytest.mark.skipif(importlib.util.find_spec("tensorflow") is None,
                              reason="needs TensorFlow (pip install 'improvd[train]')")


def test_a_multi_worker_run_warns_that_its_grpc_server_is_open():
    two = {"cluster": {"worker": ["10.0.0.1:12345", "10.0.0.2:23456"]}, "task": {"type": "worker", "index": 1}}
    cluster = read_tf_config({"TF_CONFIG": json.dumps(two)})
    assert cluster.address == "10.0.0.2:23456"
    text = server_warning(cluster)
    assert "port 23456 of every network interface" in text and "unauthenticated" in text
    assert "docs/training.md" in text
    assert server_warning(read_tf_config({})) is None  # one worker: no server


def test_the_docs_say_the_grpc_server_is_open_and_how_to_keep_it_private():
    text = (REPO / "docs" / "training.md").read_text(encoding="utf-8")
    section = text[text.index("### The gRPC server is open"):]
    section = section[:section.index("\n### ", 5)]
    for must in ("no authentication", "every network interface", "private network", "nft add rule",
                 "iptables", "--dport"):
        assert must in section, must


def _listening(pid: int) -> list[str]:
    """The TCP/UDP sockets of `pid` that listen (TCP state 0A) or are bound without a peer (UDP)."""
    inodes = set()
    try:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            m = re.fullmatch(r"socket:\[(\d+)\]", os.readlink(fd)) if fd.is_symlink() else None
            if m:
                inodes.add(m.group(1))
    except OSError:
        return []
    found = []
    for proto in ("tcp", "tcp6", "udp", "udp6"):
        for line in Path(f"/proc/net/{proto}").read_text().splitlines()[1:]:
            f = line.split()
            if f[9] in inodes and (proto.startswith("udp") or f[3] == "0A"):
                found.append(f"{proto} {f[1]}")
    return found


@pytest.mark.tf
@pytest.mark.slow
@needs_tf
@pytest.mark.parametrize("distributed", [False, True], ids=["train", "train --distributed without TF_CONFIG"])
def test_single_machine_training_listens_on_nothing(tmp_path, distributed):
    data = tmp_path / "data"
    data.mkdir()
    for i in range(6):
        write_notes(data / f"m{i}.mid", [Track("t", melody(i))])
    env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
    env.update(CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "improvd.daemon.cli", "train", "--data", str(data), "--preset", "tiny", "--epochs",
           "1", "--no-progress", "--config", str(REPO / "config.toml"), "--set", f"data.cache_dir={tmp_path / 'c'}",
           "--set", "data.workers=1", "--set", f"train.runs_dir={tmp_path / 'runs'}"]
    if distributed:
        cmd.insert(4, "--distributed")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = set()
    try:
        while proc.poll() is None:
            seen.update(_listening(proc.pid))
            time.sleep(0.05)
        out = proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, out[-4000:]
    assert not seen, seen
