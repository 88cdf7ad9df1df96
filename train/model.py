"""Keras models for the presets (core/presets.py): the tutorial's window model and our sequence model.

Two kinds of model share one interface (`predict_next`):
- `window` (the `tutorial` preset, TensorFlow's "Generate music with an RNN" exactly): input [N, 25, 3] with pitch
  already scaled by 1/128, one LSTM(128) that returns its last state, and three heads for the next note only.
- `sequence` (our presets): input [N, T, F] in raw units (normalisation inside the graph, `NoteEncoder`), stacked
  LSTMs that return every position, and heads at every position, so one pass over T notes trains T targets.

Both are exported to the same step format (`export/onnx.py`) from their weights.

Threads: the main thread of `improvd train`, `improvd export` and `improvd eval`.
"""

from __future__ import annotations

import numpy as np

from improvd.core import notes as nt
from improvd.core.modelformat import FEATURES_3, FEATURES_4
from improvd.core.presets import Preset

TIME_SCALE_S = 0.1  # step and duration enter the network as log1p(t / 0.1 s): 0..~3 for 0..2 s


# --- Keras pieces (TensorFlow imported only here and below) --------------------------------------------------

def _keras():
    import keras
    return keras


def mse_with_positive_pressure(y_true, y_pred):
    """The tutorial's loss: mean of (y − ŷ)² + 10·max(−ŷ, 0), which pushes predictions to be non-negative."""
    import keras.ops as ops
    mse = (y_true - y_pred) ** 2
    positive_pressure = 10 * ops.maximum(-y_pred, 0.0)
    return ops.mean(mse + positive_pressure, axis=-1)


def mae_with_positive_pressure(y_true, y_pred):
    """|y − ŷ| + 10·max(−ŷ, 0): the median instead of the mean, so a chord's zero step is not averaged away."""
    import keras.ops as ops
    return ops.mean(ops.abs(y_true - y_pred) + 10 * ops.maximum(-y_pred, 0.0), axis=-1)


def _register():
    keras = _keras()

    @keras.saving.register_keras_serializable(package="improvd")
    class NoteEncoder(keras.layers.Layer):
        """Raw notes [.., F] (pitch 0..127, step s, duration s[, velocity 0..127]) → network input.

        Pitch goes through an embedding; step and duration through log1p(t / 0.1 s); velocity is scaled by 1/127.
        """

        def __init__(self, embedding: int, num_features: int, **kwargs):
            super().__init__(**kwargs)
            self.embedding = embedding
            self.num_features = num_features
            self.table = keras.layers.Embedding(128, embedding, name="pitch_embedding", dtype=self.dtype_policy)

        def build(self, input_shape):
            self.table.build((None,))
            super().build(input_shape)

        def call(self, x):
            import keras.ops as ops
            pitch = ops.cast(ops.clip(ops.round(x[..., 0]), 0, 127), "int32")
            # log1p(t / 0.1 s), written as log(t + 0.1) - log(0.1): ONNX has no Log1p.
            times = ops.log(ops.maximum(x[..., 1:3], 0.0) + TIME_SCALE_S) - float(np.log(TIME_SCALE_S))
            parts = [self.table(pitch), times]
            if self.num_features > 3:
                parts.append(x[..., 3:4] / 127.0)
            # under mixed precision every part is computed in float16 (a no-op in float32)
            return ops.concatenate([ops.cast(p, self.compute_dtype) for p in parts], axis=-1)

        def get_config(self):
            return {**super().get_config(), "embedding": self.embedding, "num_features": self.num_features}

    return NoteEncoder


_NOTE_ENCODER = None


def note_encoder_class():
    """The registered `NoteEncoder` layer class (registered once, needed before loading a .keras file)."""
    global _NOTE_ENCODER
    if _NOTE_ENCODER is None:
        _NOTE_ENCODER = _register()
    return _NOTE_ENCODER


MIXED = "mixed_float16"


def build_model(preset: Preset, seed: int = 0, mixed_precision: bool = False):
    """A compiled Keras model for `preset`.

    With `mixed_precision`, the encoder and LSTMs compute in float16 (weights stay float32: the
    `mixed_float16` policy, for GPUs with tensor cores) while the heads, so the pitch logits and every loss,
    stay float32, and the optimizer scales the loss against float16 underflow. Without it, all float32.
    """
    keras = _keras()
    keras.utils.set_random_seed(seed)
    f = len(preset.features)
    body = MIXED if mixed_precision else "float32"
    if preset.kind == "window":
        inputs = keras.Input((preset.context, f), name="notes")
        x = inputs
        for i, units in enumerate(preset.units):
            x = keras.layers.LSTM(units, return_sequences=i < len(preset.units) - 1, name=f"lstm_{i}",
                                  dtype=body)(x)
    else:
        inputs = keras.Input((None, f), name="notes")
        x = note_encoder_class()(preset.embedding, f, name="note_encoder", dtype=body)(inputs)
        for i, units in enumerate(preset.units):
            x = keras.layers.LSTM(units, return_sequences=True, name=f"lstm_{i}", dtype=body)(x)
            if preset.dropout:
                x = keras.layers.Dropout(preset.dropout, name=f"dropout_{i}", dtype=body)(x)
    outputs = {"pitch": keras.layers.Dense(128, name="pitch", dtype="float32")(x),
               "step": keras.layers.Dense(1, name="step", dtype="float32")(x),
               "duration": keras.layers.Dense(1, name="duration", dtype="float32")(x)}
    if "velocity" in preset.features:
        outputs["velocity"] = keras.layers.Dense(1, name="velocity", dtype="float32")(x)
    model = keras.Model(inputs, outputs, name=f"improvd_{preset.name}")
    compile_model(model, preset, mixed_precision)
    return model


def is_mixed(model) -> bool:
    """True if any layer of `model` computes in float16 (trained with `train.mixed_precision`)."""
    return any(getattr(layer, "compute_dtype", "float32") == "float16" for layer in model.layers)


def float32_copy(model, preset: Preset):
    """The same weights in an all-float32 model (what is evaluated and exported after mixed-precision training)."""
    copy = build_model(preset, mixed_precision=False)
    copy.set_weights(model.get_weights())
    return copy


def compile_model(model, preset: Preset, mixed_precision: bool = False) -> None:
    keras = _keras()
    time_loss = mae_with_positive_pressure if preset.time_loss == "mae" else mse_with_positive_pressure
    losses = {"pitch": keras.losses.SparseCategoricalCrossentropy(from_logits=True),
              "step": time_loss, "duration": time_loss}
    if "velocity" in model.output:
        losses["velocity"] = keras.losses.MeanSquaredError()
    weights = {k: preset.loss_weights.get(k, 1.0) for k in losses}
    optimizer = keras.optimizers.Adam(learning_rate=preset.learning_rate, clipnorm=preset.clipnorm)
    if mixed_precision:
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    # `weighted_metrics`, not `metrics`: Keras leaves sample weights out of the latter, so the padding rows (weight
    # 0) of a short batch counted as misses (a validation set of 6 tunes in one padded batch of 128 rows showed a
    # pitch accuracy of 0.04 where improvd eval measured 0.36 on the same files)
    model.compile(optimizer=optimizer, loss=losses, loss_weights=weights,
                  weighted_metrics={"pitch": [keras.metrics.SparseCategoricalAccuracy(name="acc")]})


def load_keras(path):
    """Load a `.keras` file written by improvd or by the tutorial (its custom loss needs no registration)."""
    keras = _keras()
    note_encoder_class()
    custom = {"mse_with_positive_pressure": mse_with_positive_pressure,
              "mae_with_positive_pressure": mae_with_positive_pressure}
    return keras.models.load_model(path, custom_objects=custom, compile=False, safe_mode=True)


def model_kind(model) -> str:
    """"sequence" for improvd's models (a `NoteEncoder` inside), "window" for the tutorial's shape."""
    if any(type(layer).__name__ == "NoteEncoder" for layer in model.layers):
        return "sequence"
    shape = model.inputs[0].shape
    if len(shape) != 3 or shape[1] is None or shape[2] != 3:
        raise ValueError(f"model input shape {tuple(shape)} is neither improvd's sequence model nor the "
                         f"tutorial's (None, 25, 3)")
    return "window"


def model_features(model) -> tuple[str, ...]:
    return FEATURES_4 if model.inputs[0].shape[-1] == 4 else FEATURES_3


def window_inputs(windows: np.ndarray, kind: str, num_features: int) -> np.ndarray:
    """Raw note windows [N, T, 4] → what the Keras model takes (the tutorial's model wants pitch / 128)."""
    x = np.asarray(windows[..., :num_features], dtype=np.float32).copy()
    if kind == "window":
        x[..., nt.PITCH] /= 128.0
    return x


def predict_next(model, windows: np.ndarray) -> dict[str, np.ndarray]:
    """Next-note outputs after each window of raw notes [N, T, 4]: pitch_logits [N, 128], step, duration
    (and velocity) [N]."""
    kind = model_kind(model)
    f = model.inputs[0].shape[-1]
    out = model(window_inputs(windows, kind, f), training=False)
    result = {}
    for name, value in out.items():
        value = np.asarray(value)
        if kind == "sequence":
            value = value[:, -1]
        result["pitch_logits" if name == "pitch" else name] = value if name == "pitch" else value.reshape(-1)
    return result
