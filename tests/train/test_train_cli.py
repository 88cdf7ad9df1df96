"""`improvd train`, `improvd eval` and `improvd export` end to end on a few synthetic files (tiny models, 1-3 epochs).

Every test here needs TensorFlow (the `train` extra).
"""

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from improvd.daemon.cli import main
from harness.trainfiles import GOOD_FILES, REPO, improvd, read_history

pytestmark = [pytest.mark.tf,
              pytest.mark.skipif(importlib.util.find_spec("tensorflow") is None,
                                 reason="needs TensorFlow (pip install 'improvd[train]')")]


def test_train_writes_the_run_directory(work, run):
    for name in ("model.keras", "config.json", "split.json", "metrics.json", "history.csv", "curves.png"):
        assert (run / name).is_file(), name
    assert (run / "curves.png").read_bytes()[:4] == b"\x89PNG"
    history = read_history(run)
    assert len(history) == 2 and "val_loss" in history[0] and "pitch_loss" in history[0]

    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["preset"] == "tiny"
    assert metrics["data"]["files"] == GOOD_FILES and metrics["data"]["skipped"] == len(work["bad"])
    skipped = {Path(s["path"]).name: s["reason"] for s in metrics["data"]["skipped_files"]}
    assert set(skipped) == set(work["bad"])
    for name, word in work["bad"].items():
        assert word in skipped[name]
    val = metrics["val"]
    assert val["notes"] > 0 and val["context"] == 25 and np.isfinite(val["cross_entropy"])
    assert metrics["training"]["epochs"] == 2

    split = json.loads((run / "split.json").read_text())
    assert len(split["train"]) + len(split["val"]) == GOOD_FILES and split["val"]
    assert not set(split["train"]) & set(split["val"])
    assert len(split["val_sha256"]) == len(split["val"])

    config = json.loads((run / "config.json").read_text())
    assert config["preset"]["name"] == "tiny" and config["epochs"] == 2
    assert config["data_source"] == {"kind": "dir", "path": str(work["data"].resolve())}


def test_resume_continues_the_history(work, run):
    resumed = work["root"] / "resumed"
    shutil.copytree(run, resumed)
    assert improvd(work, "train", "--resume", resumed, "--epochs", 3, "--no-progress") == 0
    history = read_history(resumed)
    assert len(history) == 3
    assert [row["epoch"] for row in history] == ["0", "1", "2"]
    split = json.loads((run / "split.json").read_text())
    assert json.loads((resumed / "split.json").read_text())["val"] == split["val"]
    assert json.loads((resumed / "metrics.json").read_text())["training"]["epochs"] == 3


def test_eval_model_and_markov_baseline(work, run):
    out = work["root"] / "eval_keras.json"
    assert improvd(work, "eval", "--model", run, "--data", work["data"], "--json", out, "--no-progress") == 0
    report = json.loads(out.read_text())
    metrics = json.loads((run / "metrics.json").read_text())["val"]
    for key in ("cross_entropy", "accuracy", "step_mae_s", "duration_mae_s", "notes"):
        assert report["metrics"][key] == pytest.approx(metrics[key], abs=1e-5), key

    markov = work["root"] / "eval_markov.json"
    assert improvd(work, "eval", "--baseline", "markov", "--data", work["data"], "--json", markov,
                   "--no-progress") == 0
    report = json.loads(markov.read_text())
    for variant in ("plain", "transposed"):
        m = report["markov"][variant]
        assert 1 <= m["best_order"] <= 8 and np.isfinite(m["cross_entropy"]) and m["notes"] > 0


def test_export_writes_both_models_with_metadata_and_passes_parity(work, run, exported):
    window = exported.with_name("M.window.onnx")
    assert exported.is_file() and window.is_file()
    meta = {p.key: p.value for p in onnx.load(str(exported)).metadata_props}
    assert meta["improvd.format"] == "step-1"
    assert meta["improvd.features"] == "pitch,step,duration,velocity"
    assert meta["improvd.context"] == "25"
    card = json.loads(meta["improvd.card"])
    run_metrics = json.loads((run / "metrics.json").read_text())
    assert card["metrics"]["val"] == pytest.approx(run_metrics["val"])
    assert card["split"]["val_sha256"] == json.loads((run / "split.json").read_text())["val_sha256"]
    assert "created" in card and "data" in card
    assert {p.key: p.value for p in onnx.load(str(window)).metadata_props}["improvd.format"] == "window-1"

    from improvd.daemon.predict.model import StepModel
    model = StepModel(exported)
    assert model.num_features == 4 and model.has_velocity and model.state_size == 2 * 16 and model.context == 25


def test_eval_onnx_reproduces_keras(work, run, exported):
    keras_json, onnx_json = work["root"] / "k.json", work["root"] / "o.json"
    assert improvd(work, "eval", "--model", run, "--data", work["data"], "--json", keras_json, "--no-progress") == 0
    # The ONNX file sits outside the run directory: its card's split picks the same validation files.
    assert improvd(work, "eval", "--model", exported, "--data", work["data"], "--json", onnx_json,
                   "--no-progress") == 0
    k, o = json.loads(keras_json.read_text())["metrics"], json.loads(onnx_json.read_text())["metrics"]
    assert o["notes"] == k["notes"]
    for key in ("cross_entropy", "accuracy", "step_mae_s", "duration_mae_s"):
        assert abs(o[key] - k[key]) <= 1e-4, (key, o[key], k[key])


def test_generate_runs_the_exported_model(work, exported):
    out = work["root"] / "gen.mid"
    prime = sorted(work["data"].glob("song*.mid"))[0]
    assert main(["generate", "--config", str(REPO / "config.toml"), "--model", str(exported), "--prime", str(prime),
                 "--out", str(out), "--temperature", "0", "--notes", "10"]) == 0
    assert out.is_file()


def tutorial_loss(y_true, y_pred):
    """The tutorial's mse_with_positive_pressure, as a user would have written it (not registered)."""
    import tensorflow as tf
    mse = (y_true - y_pred) ** 2
    positive_pressure = 10 * tf.maximum(-y_pred, 0.0)
    return tf.reduce_mean(mse + positive_pressure)


def test_a_model_built_the_tutorials_way_exports(work, capsys):
    import keras
    keras.utils.set_random_seed(3)
    inputs = keras.Input((25, 3))
    x = keras.layers.LSTM(16)(inputs)
    outputs = {"pitch": keras.layers.Dense(128, name="pitch")(x),
               "step": keras.layers.Dense(1, name="step")(x),
               "duration": keras.layers.Dense(1, name="duration")(x)}
    model = keras.Model(inputs, outputs)
    model.compile(loss={"pitch": keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                        "step": tutorial_loss, "duration": tutorial_loss},
                  loss_weights={"pitch": 0.05, "step": 1.0, "duration": 1.0},
                  optimizer=keras.optimizers.Adam(learning_rate=0.005))
    rng = np.random.default_rng(0)
    xs = np.column_stack([rng.integers(40, 90, 400) / 128, rng.uniform(0, 0.5, 400), rng.uniform(0.1, 1, 400)])
    windows = np.stack([xs[i:i + 25] for i in range(300)]).astype(np.float32)
    model.fit(windows, {"pitch": rng.integers(40, 90, 300), "step": rng.uniform(0, 0.5, 300),
                        "duration": rng.uniform(0.1, 1, 300)}, epochs=1, batch_size=64, verbose=0)
    folder = work["root"] / "tutorial"
    folder.mkdir()
    model.save(folder / "model.keras")
    out = folder / "t.onnx"
    capsys.readouterr()
    assert main(["export", "--config", str(REPO / "config.toml"), str(folder / "model.keras"), "--out",
                 str(out)]) == 0
    printed = capsys.readouterr().out
    assert "OK" in printed and "FAIL" not in printed

    from improvd.daemon.predict.model import StepModel
    step = StepModel(out)
    assert step.features == ("pitch", "step", "duration") and step.state_size == 32 and step.context == 25
    # The step model fed note by note equals the Keras model on a raw window (pitch / 128 inside the graph).
    raw = windows[:4].copy()
    raw[..., 0] *= 128
    state = step.zero_state(4)
    for t in range(25):
        pred = step.run(raw[:, t], state)
        state = pred.state
    ref = model(windows[:4], training=False)
    np.testing.assert_allclose(pred.pitch_logits, np.asarray(ref["pitch"]), atol=1e-4)
    np.testing.assert_allclose(pred.step, np.asarray(ref["step"])[:, 0], atol=1e-5)
    np.testing.assert_allclose(pred.duration, np.asarray(ref["duration"])[:, 0], atol=1e-5)


def test_tutorial_preset_is_the_tutorials_model():
    import keras

    from improvd.core.presets import get_preset
    from improvd.train.model import build_model, mse_with_positive_pressure
    preset = get_preset("tutorial")
    assert (preset.context, preset.batch_size, preset.epochs, preset.patience, preset.monitor) == \
        (25, 64, 50, 5, "loss")
    assert preset.transpose == 0 and preset.dropout == 0 and preset.clipnorm is None
    model = build_model(preset)
    assert tuple(model.input_shape) == (None, 25, 3)
    kinds = sorted(type(layer).__name__ for layer in model.layers)
    assert kinds == ["Dense", "Dense", "Dense", "InputLayer", "LSTM"]
    lstm = next(layer for layer in model.layers if isinstance(layer, keras.layers.LSTM))
    assert lstm.units == 128 and not lstm.return_sequences
    assert lstm.activation.__name__ == "tanh" and lstm.recurrent_activation.__name__ == "sigmoid"
    assert model.get_layer("pitch").units == 128
    assert model.get_layer("step").units == 1 and model.get_layer("duration").units == 1
    assert model.count_params() == 84354  # the tutorial's model summary
    assert model._compile_loss._user_loss_weights == {"pitch": 0.05, "step": 1.0, "duration": 1.0}
    losses = model.loss
    assert losses["step"] is mse_with_positive_pressure and losses["duration"] is mse_with_positive_pressure
    assert losses["pitch"].fn.__name__ == "sparse_categorical_crossentropy" and losses["pitch"]._fn_kwargs[
        "from_logits"]
    assert type(model.optimizer).__name__ == "Adam"
    assert float(model.optimizer.learning_rate) == pytest.approx(0.005)
    # The loss itself: mean of (y - y_hat)^2 + 10 * max(-y_hat, 0).
    y, y_hat = np.array([[0.5], [0.2]], np.float32), np.array([[0.25], [-0.1]], np.float32)
    got = np.asarray(mse_with_positive_pressure(y, y_hat))
    np.testing.assert_allclose(got, [(0.25 ** 2), (0.3 ** 2) + 1.0], rtol=1e-6)
