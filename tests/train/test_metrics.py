"""What training reports: the pitch accuracy in history.csv counts only the positions that carry weight (not the
padding of a short batch, nor the positions after a file's end)."""

import importlib.util

import numpy as np
import pytest

from improvd.core.presets import get_preset

pytestmark = [pytest.mark.tf,
              pytest.mark.skipif(importlib.util.find_spec("tensorflow") is None,
                                 reason="needs TensorFlow (pip install 'improvd[train]')")]


def test_pitch_accuracy_leaves_out_padding_rows():
    from improvd.train.batches import BatchSource
    from improvd.train.model import build_model

    preset = get_preset("tiny")
    files = [np.column_stack([60 + np.arange(n) % 3, np.full(n, 0.25), np.full(n, 0.2), np.full(n, 80.0)])
             .astype(np.float32) for n in (40, 23)]
    source = BatchSource(files, "sequence", preset.seq_length, 4, 0, 0, False)
    x, y, w = source.batch(source.plan(0), 0, 0, 0, 64, 1)  # a few real rows, the rest padding
    assert (w["pitch"] == 0).mean() > 0.5
    model = build_model(preset, 0)
    model.fit(x, y, sample_weight=w, epochs=30, verbose=0)  # until it gets some pitches right
    got = model.evaluate(x, y, sample_weight=w, verbose=0, return_dict=True)["pitch_acc"]
    predicted = np.asarray(model.predict(x, verbose=0)["pitch"]).argmax(-1)
    real = w["pitch"] > 0
    assert (predicted == y["pitch"])[real].mean() > 0.2  # (else the padding's misses would not show)
    assert got == pytest.approx((predicted == y["pitch"])[real].mean(), abs=1e-6)
