"""`train.mixed_precision`: float16 inside, float32 logits and losses, float32 on disk. Runs on the CPU (slowly,
but correctly): nothing here needs a GPU."""

import importlib.util

import numpy as np
import pytest

from improvd.core.config import load_config
from improvd.train import batches as tb
from improvd.train.data import NoteSet

pytestmark = [pytest.mark.tf,
              pytest.mark.skipif(importlib.util.find_spec("tensorflow") is None,
                                 reason="needs TensorFlow (pip install 'improvd[train]')")]


def test_config_key_defaults_to_false():
    assert load_config(None).train.mixed_precision is False
    assert load_config(None, ["train.mixed_precision=true"]).train.mixed_precision is True


def test_mixed_precision_model_keeps_logits_and_losses_in_float32(tmp_path):
    import keras

    from improvd.train.fit import fit
    from improvd.core.presets import get_preset
    from improvd.train.model import build_model, is_mixed, load_keras

    preset = get_preset("tiny")
    model = build_model(preset, 1, mixed_precision=True)
    assert is_mixed(model) and isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    assert model.get_layer("lstm_0").compute_dtype == "float16"
    assert model.get_layer("lstm_0").variable_dtype == "float32"  # weights stay float32
    for head in ("pitch", "step", "duration", "velocity"):
        assert model.get_layer(head).compute_dtype == "float32"
    out = model(np.tile(np.array([[60, 0.25, 0.2, 80]], np.float32), (2, 5, 1)), training=False)
    assert all(v.dtype == "float32" for v in out.values())

    rng = np.random.default_rng(0)
    files = NoteSet.from_arrays([np.column_stack([rng.integers(50, 80, 80), rng.uniform(0, .5, 80),
                                                  rng.uniform(.1, .5, 80), rng.integers(40, 100, 80)])
                                 for _ in range(4)])
    result = fit(tmp_path, preset, files.subset([0, 1, 2]), files.subset([3]), epochs=2, max_minutes=0,
                 batch_size=4, seed=1, progress=False, mixed_precision=True)
    assert np.isfinite([h["loss"] for h in result.history]).all()
    saved = load_keras(tmp_path / "model.keras")
    assert not is_mixed(saved)  # evaluated and exported in float32
    x, _, _ = tb.make_batch(files, np.array([[3, 0]]), "sequence", 16, 4)
    np.testing.assert_allclose(np.asarray(saved(x)["pitch"]), np.asarray(result.model(x)["pitch"]), atol=1e-5)
