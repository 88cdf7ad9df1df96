"""Keras model → ONNX with tf2onnx, in the step format of DESIGN.md §3 (and optionally the window format).

The step model is rebuilt from the Keras model's weights: the input normalisation (the tutorial's pitch / 128, or
improvd's `NoteEncoder`), one LSTM cell per layer written out as matrix products (Keras' gate order i, f, c, o),
and the dense heads. All layers' h and c travel in one `state` tensor, laid out [h_0, c_0, h_1, c_1, ...].
Models of the tutorial's shape (input (None, 25, 3), pitch pre-scaled by 1/128, outputs pitch/step/duration)
export the same way.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FORMAT = "step-1"
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
    from train.model import model_features, model_kind
    kind = model_kind(model)
    if context is None:
        context = int(model.inputs[0].shape[1]) if kind == "window" else 25
    return StepSpec(kind, model_features(model), tuple(layer.units for layer in _lstm_layers(model)), context)


def step_function(model, spec: StepSpec):
    """A `tf.function(note [N, F], state [N, S]) -> dict` computing one step with the model's weights."""
    import tensorflow as tf

    # numpy weights, made constants inside the function: tf2onnx turns constants captured from outside into inputs
    lstms = [(k, r, b, layer.units)
             for layer in _lstm_layers(model) for k, r, b in [[np.asarray(w) for w in layer.get_weights()]]]
    heads = {name: [np.asarray(w) for w in _head(model, name).get_weights()]
             for name in ("pitch", "step", "duration") + (("velocity",) if "velocity" in spec.features else ())}
    encoder = model.get_layer("note_encoder") if spec.kind == "sequence" else None
    f, s = len(spec.features), spec.state_size

    @tf.function(input_signature=[tf.TensorSpec([None, f], tf.float32, name="note"),
                                  tf.TensorSpec([None, s], tf.float32, name="state")])
    def step(note, state):
        if encoder is None:
            x = note * tf.constant([1.0 / 128.0] + [1.0] * (f - 1), dtype=tf.float32)
        else:
            x = encoder(note[:, None, :])[:, 0, :]
        new_state, offset = [], 0
        for kernel, recurrent, bias, units in lstms:
            h = state[:, offset:offset + units]
            c = state[:, offset + units:offset + 2 * units]
            z = tf.matmul(x, tf.constant(kernel)) + tf.matmul(h, tf.constant(recurrent)) + tf.constant(bias)
            i, fg, g, o = tf.split(z, 4, axis=1)
            c = tf.sigmoid(fg) * c + tf.sigmoid(i) * tf.tanh(g)
            h = tf.sigmoid(o) * tf.tanh(c)
            new_state += [h, c]
            offset += 2 * units
            x = h
        out = {"pitch_logits": tf.matmul(x, tf.constant(heads["pitch"][0])) + tf.constant(heads["pitch"][1])}
        for name in ("step", "duration", "velocity"):
            if name in heads:
                value = (tf.matmul(x, tf.constant(heads[name][0])) + tf.constant(heads[name][1]))[:, 0]
                out[name] = value * 127.0 if name == "velocity" else value
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
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(onnx_model.SerializeToString())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def metadata(spec: StepSpec, card: dict) -> dict[str, str]:
    return {"improvd.format": FORMAT, "improvd.features": ",".join(spec.features),
            "improvd.context": str(spec.context), "improvd.card": json.dumps(card, sort_keys=True)}


def export_step(model, spec: StepSpec, card: dict, out: Path) -> None:
    """Write the step-format ONNX model to `out` (atomically)."""
    save_atomic(_convert(step_function(model, spec), metadata(spec, card)), out)


def export_window(model, spec: StepSpec, card: dict, out: Path) -> None:
    """Write the window-format ONNX model ([N, context, F] in, next-note outputs) to `out`."""
    meta = metadata(spec, card) | {"improvd.format": "window-1"}
    save_atomic(_convert(window_function(model, spec), meta), out)
