"""`evaluate_adapted` (the session protocol of `improvd eval --adapt`) scores timing as well as pitch."""

import numpy as np
import pytest

from improvd.train.evaluate import evaluate_adapted


def constant_model(windows):
    """A model that knows nothing: uniform pitch, every step and duration 0.3 s."""
    n = len(windows)
    return {"pitch_logits": np.zeros((n, 128), np.float32), "step": np.full(n, 0.3, np.float32),
            "duration": np.full(n, 0.3, np.float32)}


def test_a_piece_that_repeats_its_rhythm_is_timed_better_with_adaptation():
    rng = np.random.default_rng(0)
    motif = np.column_stack([rng.integers(55, 75, 8), rng.choice([0.125, 0.25, 0.5], 8),
                             rng.choice([0.1, 0.2, 0.4], 8), np.full(8, 80)]).astype(np.float64)
    pieces = [np.tile(motif, (12, 1)), np.tile(motif[::-1], (10, 1))]
    r = evaluate_adapted(constant_model, pieces, context=25, memory=500)
    assert r["notes"] == sum(len(p) - max(len(p) // 2, 25) for p in pieces)
    truth = np.concatenate([p[max(len(p) // 2, 25):] for p in pieces])
    assert r["step_mae_s"] == pytest.approx(np.abs(0.3 - truth[:, 1]).mean())
    assert r["duration_mae_s"] == pytest.approx(np.abs(0.3 - truth[:, 2]).mean())
    assert r["adapted"]["step_mae_s"] < 0.2 * r["step_mae_s"]  # the rhythm came back: learned
    assert r["adapted"]["duration_mae_s"] < 0.2 * r["duration_mae_s"]
    assert r["adapted"]["step_ratio"] == pytest.approx(r["adapted"]["step_mae_s"] / r["step_mae_s"])
    assert {"step_mae_s", "adapted_step_mae_s", "duration_mae_s", "adapted_duration_mae_s"} <= set(r["per_file"][0])
