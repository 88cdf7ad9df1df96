"""The fine-tuning recipe's logic (`train.recipe`): learning-rate factor, budget progress, weight averaging.

Pure numpy: no TensorFlow needed.
"""

import math

import numpy as np
import pytest

from improvd.train.recipe import ANNEAL_FLOOR, average_into, budget_progress, lr_factor


def test_warmup_rises_linearly_then_holds():
    assert lr_factor(0, 0.0, 10, False) == pytest.approx(0.1)
    assert lr_factor(4, 0.0, 10, False) == pytest.approx(0.5)
    assert lr_factor(9, 0.0, 10, False) == pytest.approx(1.0)
    assert lr_factor(500, 0.9, 10, False) == 1.0
    assert lr_factor(0, 0.0, 0, False) == 1.0


def test_anneal_is_a_cosine_from_one_to_the_floor():
    assert lr_factor(100, 0.0, 0, True) == pytest.approx(1.0)
    assert lr_factor(100, 0.5, 0, True) == pytest.approx(ANNEAL_FLOOR + (1 - ANNEAL_FLOOR) / 2)
    assert lr_factor(100, 1.0, 0, True) == pytest.approx(ANNEAL_FLOOR)
    assert lr_factor(100, 7.0, 0, True) == pytest.approx(ANNEAL_FLOOR)  # past the budget: stays at the floor
    values = [lr_factor(100, p, 0, True) for p in np.linspace(0, 1, 50)]
    assert all(a > b for a, b in zip(values, values[1:]))


def test_warmup_and_anneal_multiply():
    assert lr_factor(1, 0.5, 4, True) == pytest.approx(0.5 * lr_factor(100, 0.5, 0, True))


def test_lr_factor_rejects_nonsense():
    with pytest.raises(ValueError, match="step -1"):
        lr_factor(-1, 0.0, 0, True)
    with pytest.raises(ValueError, match="progress nan"):
        lr_factor(0, math.nan, 0, True)


def test_progress_is_wall_time_with_a_limit_else_epochs():
    assert budget_progress(90.0, 3.0, 7, 0, 5, 400) == pytest.approx(0.5)
    assert budget_progress(900.0, 3.0, 7, 0, 5, 400) == 1.0
    assert budget_progress(90.0, 0.0, 1, 2, 4, 10) == pytest.approx(0.15)
    assert budget_progress(90.0, 0.0, 20, 0, 4, 10) == 1.0
    assert budget_progress(90.0, 0.0, 3, 0, 4, 0) == 0.0


def test_average_moves_float_weights_towards_the_current_ones():
    average = [np.zeros(3, np.float32), np.array([5], np.int64)]
    average_into(average, [np.ones(3, np.float32), np.array([9], np.int64)], 0.9)
    np.testing.assert_allclose(average[0], 0.1)
    assert average[1][0] == 5  # counters and other integer state are not averaged
    for _ in range(200):
        average_into(average, [np.ones(3, np.float32), np.array([9], np.int64)], 0.9)
    np.testing.assert_allclose(average[0], 1.0, atol=1e-6)
