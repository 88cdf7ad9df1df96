"""The shipped model: its format, size and card, step/window parity, and `improvd eval` reproducing its card."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from improvd.daemon.predict.model import StepModel

REPO = Path(__file__).resolve().parents[2]
MODEL = REPO / "models" / "bach.onnx"
WINDOW = REPO / "models" / "bach.window.onnx"
CARD = REPO / "models" / "bach.card.json"


def test_shipped_model_is_a_small_step_model_with_its_card():
    model = StepModel(MODEL)
    assert MODEL.stat().st_size < 5_000_000
    assert model.features == ("pitch", "step", "duration", "velocity")
    assert model.context == 25
    card = json.loads(CARD.read_text())
    assert card == model.card  # the card file is the one inside the model
    assert card["preset"] == "default"
    assert card["data"]["source"] == {"kind": "corpus", "name": "bach"}
    assert 0 < card["metrics"]["val"]["cross_entropy"] < 2.0
    assert card["split"]["val_sha256"]


def test_step_model_fed_note_by_note_equals_the_window_model():
    import onnxruntime as ort

    from improvd.export.parity import compare, random_windows
    from improvd.train.evaluate import onnx_predictor

    windows = random_windows(64, 25, seed=7)
    got = onnx_predictor(StepModel(MODEL))(windows)
    sess = ort.InferenceSession(str(WINDOW), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    ref = dict(zip(names, sess.run(None, {"notes": windows.astype(np.float32)})))
    row = compare("window vs step", ref, got)
    assert row["ok"], row


@pytest.mark.tf
@pytest.mark.slow
def test_eval_on_the_shipped_model_reproduces_its_card(tmp_path):
    pytest.importorskip("music21")
    from improvd.daemon.cli import main

    out = tmp_path / "eval.json"
    assert main(["eval", "--model", str(MODEL), "--corpus", "bach", "--no-progress", "--json", str(out)]) == 0
    got = json.loads(out.read_text())["metrics"]
    card = json.loads(CARD.read_text())["metrics"]["val"]
    assert got["notes"] == card["notes"]
    for key in ("cross_entropy", "accuracy", "step_mae_s", "duration_mae_s"):
        assert got[key] == pytest.approx(card[key], abs=1e-4), key
