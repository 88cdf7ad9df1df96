"""Fixtures shared by the training tests: a small data set with bad files (`work`), a tiny run trained on it
(`run`) and its window-format export (`exported`). Module-scoped: each test module trains its own once."""

from __future__ import annotations

import pytest

from harness.trainfiles import GOOD_FILES, improvd, make_bad_files, song
from improvd.core.midifile import Track, write_notes


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_cli")
    data = root / "data"
    (data / "sub").mkdir(parents=True)
    for i in range(GOOD_FILES):
        write_notes(data / ("sub" if i % 2 else "") / f"song{i}.mid", [Track("t", song(i))])
    bad = make_bad_files(data)
    return {"root": root, "data": data, "bad": bad, "cache": root / "cache"}


@pytest.fixture(scope="module")
def run(work):
    run_dir = work["root"] / "run"
    assert improvd(work, "train", "--data", work["data"], "--preset", "tiny", "--epochs", 2, "--out", run_dir,
                   "--no-progress") == 0
    return run_dir


@pytest.fixture(scope="module")
def exported(work, run):
    out = work["root"] / "export" / "M.onnx"
    assert improvd(work, "export", run, "--out", out, "--format", "window") == 0
    return out
