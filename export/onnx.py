"""Keras model → ONNX with tf2onnx, in the step format of docs/model-format.md (and optionally the window format).

The step model is rebuilt from the Keras model's weights: the input normalisation (the tutorial's pitch / 128, or
improvd's `NoteEncoder`), one LSTM cell per layer written out as matrix products (Keras' gate order i, f, c, o),
and the dense heads. All layers' h and c travel in one `state` tensor, laid out [h_0, c_0, h_1, c_1, ...].
Models of the tutorial's shape (input (None, 25, 3), pitch pre-scaled by 1/128, outputs pitch/step/duration)
export the same way.

Threads: the main thread of `improvd export`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from improvd.core.atomic import atomic_writer
from improvd.core.modelformat import META_CARD, META_CONTEXT, META_FEATURES, META_FORMAT, STEP_FORMAT, WINDOW_FORMAT

OPSET = 17


@dataclass
class StepSpec:
    """What the exported step model looks like."""

    kind: str                      # "window" (the tutorial's) or "sequence" (improvd's)
    features: tuple[str, ...]
    units: tuple[int, ...]
    context: int

    @property
    def state_size(self) -> int:
        return 2 * sum(self.units)


def _lstm_layers(model):
    import keras
    layers = [layer for layer in model.layers if isinstance(layer, keras.layers.LSTM)]
    if not layers:
        raise ValueError(f"model {model.name!r} has no LSTM layer")
    for layer in layers:
        cfg = layer.get_config()
        if cfg.get("activation") != "tanh" or cfg.get("recurrent_activation") != "sigmoid" or not cfg.get("use_bias"):
            raise ValueError(f"LSTM layer {layer.name!r}: only tanh/sigmoid activations with a bias export, got "
                             f"{cfg.get('activation')}/{cfg.get('recurrent_activation')}")
    return layers


def _head(model, name: str):
    try:
        return model.get_layer(name)
    except ValueError:
        raise ValueError(f"model {model.name!r} has no output layer named {name!r}; expected heads "
                         f"'pitch', 'step', 'duration' (and 'velocity')") from None


def spec_of(model, context: int | None = None) -> StepSpec:
    from improvd.train.model import model_features, model_kind
    kind = model_kind(model)
    if context is None:
        context = int(model.inputs[0].shape[1]) if kind == "window" else 25
    return StepSpec(kind, model_features(model), tuple(layer.units for layer in _lstm_layers(model)), context)


def _folded_layers(model, spec: StepSpec) -> tuple[np.ndarray | None, list[tuple[np.ndarray, np.ndarray, int]]]:
    """Weights rearranged so one step costs few graph nodes (exact algebra; float64 products, then float32).

    Returns (pitch_table, layers): `pitch_table` [128, 4u0] is the first layer's input contribution of each pitch
    (improvd's embedding times the first kernel rows, plus the bias), or None for the tutorial's kind; each layer
    is (W, b, units) with W the input kernel stacked over the recurrent one, so z = concat(x, h) @ W + b.
    """
    layers = [[np.asarray(w, dtype=np.float64) for w in layer.get_weights()] + [layer.units]
              for layer in _lstm_layers(model)]
    table = None
    kernel0, recurrent0, bias0, units0 = layers[0]
    if spec.kind == "sequence":
        encoder = model.get_layer("note_encoder")
        emb = np.asarray(encoder.table.get_weights()[0], dtype=np.float64)
        e = emb.shape[1]
        table = emb @ kernel0[:e] + bias0
        layers[0] = [kernel0[e:], recurrent0, np.zeros_like(bias0), units0]
    else:  # the tutorial's pitch / 128 folded into the kernel's first row
        kernel0 = kernel0.copy()
        kernel0[0] /= 128.0
        layers[0] = [kernel0, recurrent0, bias0, units0]
    folded = [(np.vstack([k, r]).astype(np.float32), b.astype(np.float32), u) for k, r, b, u in layers]
    return (None if table is None else table.astype(np.float32)), folded


def step_function(model, spec: StepSpec):
    """A `tf.function(note [N, F], state [N, S]) -> dict` computing one step with the model's weights."""
    import tensorflow as tf

    from improvd.train.model import TIME_SCALE_S

    # numpy weights, made constants inside the function: tf2onnx turns constants captured from outside into inputs
    table, layers = _folded_layers(model, spec)
    names = ("pitch", "step", "duration") + (("velocity",) if "velocity" in spec.features else ())
    kernels = [np.asarray(_head(model, n).get_weights()[0], dtype=np.float32) for n in names]
    biases = [np.asarray(_head(model, n).get_weights()[1], dtype=np.float32) for n in names]
    head_w, head_b = np.concatenate(kernels, axis=1), np.concatenate(biases)  # one MatMul for every head
    if "velocity" in names:
        head_w[:, -1] *= 127.0  # velocity in MIDI units
        head_b[-1] *= 127.0
    f, s = len(spec.features), spec.state_size
    sizes = [size for _, _, u in layers for size in (u, u)]

    @tf.function(input_signature=[tf.TensorSpec([None, f], tf.float32, name="note"),
                                  tf.TensorSpec([None, s], tf.float32, name="state")])
    def step(note, state):
        parts = tf.split(state, sizes, axis=1)
        if table is None:
            x = note
            base = None
        else:  # improvd's NoteEncoder: embedding (folded into the table), log-scaled times, velocity / 127
            pitch = tf.cast(tf.clip_by_value(tf.round(note[:, 0]), 0.0, 127.0), tf.int32)
            base = tf.gather(tf.constant(table), pitch)
            times = tf.math.log(tf.maximum(note[:, 1:3], 0.0) + TIME_SCALE_S) - float(np.log(TIME_SCALE_S))
            x = tf.concat([times, note[:, 3:4] / 127.0], axis=1) if f > 3 else times
        new_state = []
        for n, (w, b, units) in enumerate(layers):
            h, c = parts[2 * n], parts[2 * n + 1]
            z = tf.matmul(tf.concat([x, h], axis=1), tf.constant(w)) + tf.constant(b)
            if n == 0 and base is not None:
                z = z + base
            i, fg, g, o = tf.split(z, 4, axis=1)
            c = tf.sigmoid(fg) * c + tf.sigmoid(i) * tf.tanh(g)
            h = tf.sigmoid(o) * tf.tanh(c)
            new_state += [h, c]
            x = h
        y = tf.matmul(x, tf.constant(head_w)) + tf.constant(head_b)
        out = {"pitch_logits": y[:, :128], "step": y[:, 128], "duration": y[:, 129]}
        if "velocity" in names:
            out["velocity"] = y[:, 130]
        out["state_out"] = tf.concat(new_state, axis=1)
        return out

    return step


def window_function(model, spec: StepSpec):
    """A `tf.function(notes [N, context, F] raw) -> dict` of the next note's outputs (the tutorial's shape)."""
    import tensorflow as tf

    f = len(spec.features)
    scale = tf.constant([1.0 / 128.0] + [1.0] * (f - 1), dtype=tf.float32)

    @tf.function(input_signature=[tf.TensorSpec([None, spec.context, f], tf.float32, name="notes")])
    def window(notes):
        out = model(notes * scale if spec.kind == "window" else notes, training=False)
        result = {}
        for name in ("pitch", "step", "duration", "velocity"):
            if name in out:
                value = out[name] if spec.kind == "window" else out[name][:, -1]
                value = value if name == "pitch" else value[:, 0]
                result["pitch_logits" if name == "pitch" else name] = value * 127.0 if name == "velocity" \
                    else value
        return result

    return window


def _convert(fn, metadata: dict[str, str]):
    import tf2onnx
    onnx_model, _ = tf2onnx.convert.from_function(fn, input_signature=fn.input_signature, opset=OPSET)
    onnx_model.producer_name = "improvd"
    del onnx_model.metadata_props[:]
    for key, value in metadata.items():
        prop = onnx_model.metadata_props.add()
        prop.key, prop.value = key, value
    return onnx_model


def save_atomic(onnx_model, path: Path) -> None:
    with atomic_writer(path) as fh:
        fh.write(onnx_model.SerializeToString())


def metadata(spec: StepSpec, card: dict) -> dict[str, str]:
    return {META_FORMAT: STEP_FORMAT, META_FEATURES: ",".join(spec.features),
            META_CONTEXT: str(spec.context), META_CARD: json.dumps(card, sort_keys=True)}


def export_step(model, spec: StepSpec, card: dict, out: Path) -> None:
    """Write the step-format ONNX model to `out` (atomically)."""
    save_atomic(_convert(step_function(model, spec), metadata(spec, card)), out)


def export_window(model, spec: StepSpec, card: dict, out: Path) -> None:
    """Write the window-format ONNX model ([N, context, F] in, next-note outputs) to `out`."""
    meta = metadata(spec, card) | {META_FORMAT: WINDOW_FORMAT}
    save_atomic(_convert(window_function(model, spec), meta), out)
