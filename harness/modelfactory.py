"""Step-format ONNX models for tests, built with the `onnx` package only (no TensorFlow), and their numpy twin.

`make_step_model(path, ...)` writes a valid "step" model (docs/model-format.md): the note is normalised inside the graph
(pitch/128 - 0.5, step and duration as they are, velocity/128), goes through one or more LSTM cells written as
MatMul/Add/Sigmoid/Tanh ops (Keras gate order i, f, g, o) with random but seeded weights, and three or four heads:
pitch logits, step = step_scale * sigmoid(.), duration = duration_scale * sigmoid(.) and, when F = 4,
velocity = 127 * sigmoid(.). The state is every layer's h then c, concatenated: S = layers * 2 * hidden.

The returned `FactoryModel` computes the same step function in numpy (`step`), and `greedy_continuation` follows
docs/model-format.md (zero state, feed, argmax within the pitch range, clamp) so tests can check what the daemon answers.
Keyword arguments make broken variants: non-finite outputs, a wrong format tag, missing outputs or metadata.
Pure (it writes only the model file); called from the test's or bench's thread.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 8
FEATURES = ("pitch", "step", "duration", "velocity")
_SCALE = np.array([1 / 128, 1.0, 1.0, 1 / 128], dtype=np.float32)
_OFFSET = np.array([-0.5, 0.0, 0.0, 0.0], dtype=np.float32)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return (1.0 / (1.0 + np.exp(-x))).astype(np.float32)


@dataclass
class FactoryModel:
    """A model written by `make_step_model`: its file, its weights and a numpy implementation of its step."""

    path: Path
    num_features: int
    hidden: int
    layers: int
    context: int
    step_scale: float
    duration_scale: float
    weights: dict[str, np.ndarray] = field(repr=False)

    @property
    def state_size(self) -> int:
        return self.layers * 2 * self.hidden

    def zero_state(self, n: int = 1) -> np.ndarray:
        return np.zeros((n, self.state_size), dtype=np.float32)

    def step(self, note: np.ndarray, state: np.ndarray) -> dict[str, np.ndarray]:
        """One step in numpy; `note` [N, F] raw units, `state` [N, S]. Returns the graph's outputs by name."""
        w = self.weights
        f = self.num_features
        x = np.asarray(note, dtype=np.float32)[:, :f] * _SCALE[:f] + _OFFSET[:f]
        state = np.asarray(state, dtype=np.float32)
        h_dim = self.hidden
        parts = []
        for layer in range(self.layers):
            base = layer * 2 * h_dim
            h_prev = state[:, base:base + h_dim]
            c_prev = state[:, base + h_dim:base + 2 * h_dim]
            z = x @ w[f"W{layer}"] + h_prev @ w[f"U{layer}"] + w[f"b{layer}"]
            i = _sigmoid(z[:, :h_dim])
            fg = _sigmoid(z[:, h_dim:2 * h_dim])
            g = np.tanh(z[:, 2 * h_dim:3 * h_dim])
            o = _sigmoid(z[:, 3 * h_dim:])
            c = fg * c_prev + i * g
            h = o * np.tanh(c)
            parts += [h, c]
            x = h
        out = {
            "pitch_logits": x @ w["Wp"] + w["bp"],
            "step": self.step_scale * _sigmoid((x @ w["ws"] + w["bs"]).reshape(-1)),
            "duration": self.duration_scale * _sigmoid((x @ w["wd"] + w["bd"]).reshape(-1)),
            "state_out": np.concatenate(parts, axis=1),
        }
        if f == 4:
            out["velocity"] = 127.0 * _sigmoid((x @ w["wv"] + w["bv"]).reshape(-1))
        return {k: np.asarray(v, dtype=np.float32) for k, v in out.items()}

    def greedy_continuation(self, prime: np.ndarray, n: int, *, pitch_range=(0, 127), step_range=(0.0, 60.0),
                            duration_range=(0.001, 60.0)) -> np.ndarray:
        """The greedy continuation of `prime` (float [K, 4] notes) by docs/model-format.md, without re-priming.

        Each generated note is [argmax pitch within pitch_range, clamped step, clamped duration, velocity]
        (velocity is the model's, rounded to 1..127, when F = 4, else 0) and is fed back before the next one is
        predicted.
        """
        state = self.zero_state()
        out = None
        for row in np.asarray(prime, dtype=np.float64):
            out = self.step(row[None, :4], state)
            state = out["state_out"]
        result = []
        for _ in range(n):
            logits = out["pitch_logits"][0].astype(np.float64)
            masked = np.full(128, -np.inf)
            lo, hi = pitch_range
            masked[lo:hi + 1] = logits[lo:hi + 1]
            # The velocity played (and fed back) is the model's rounded to a MIDI velocity 1..127.
            vel = float(min(max(round(float(out["velocity"][0])), 1), 127)) if "velocity" in out else 0.0
            row = np.array([float(np.argmax(masked)),
                            float(np.clip(np.float64(out["step"][0]), *step_range)),
                            float(np.clip(np.float64(out["duration"][0]), *duration_range)), vel])
            result.append(row)
            out = self.step(row[None, :4], state)
            state = out["state_out"]
        return np.array(result).reshape(-1, 4)


def _init(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array), name=name)


def make_step_model(path, *, num_features: int = 3, hidden: int = 16, layers: int = 1, seed: int = 0,
                    context: int = 25, step_scale: float = 0.25, duration_scale: float = 0.4,
                    logit_scale: float = 2.0, card: dict | None = None, format_tag: str = "step-1",
                    features_meta: str | None = None, drop_metadata: tuple[str, ...] = (),
                    drop_outputs: tuple[str, ...] = (), nonfinite_outputs: tuple[str, ...] = (),
                    nonfinite_value: float = float("nan"), fixed_batch: bool = False) -> FactoryModel:
    """Write a step-format ONNX model to `path` and return it with its numpy twin.

    Args:
        path: the .onnx file to write.
        num_features: F, 3 (pitch, step, duration) or 4 (and velocity, with a velocity output).
        hidden: units per LSTM layer.
        layers: stacked LSTM layers.
        seed: seed of the weights.
        context: the `improvd.context` metadata.
        step_scale: the step head's upper bound in seconds (the head is step_scale * sigmoid).
        duration_scale: the duration head's upper bound in seconds.
        logit_scale: spread of the pitch head's weights (bigger = peakier distributions).
        card: the `improvd.card` JSON (a small default when None).
        format_tag: the `improvd.format` metadata (`step-1` is valid).
        features_meta: the `improvd.features` metadata (default: the first F feature names).
        drop_metadata: metadata keys to leave out.
        drop_outputs: graph outputs to leave out (their nodes stay in the graph).
        nonfinite_outputs: outputs to which `nonfinite_value` is added (NaN or ±inf make them non-finite).
        nonfinite_value: the value added to `nonfinite_outputs`.
        fixed_batch: declare N = 1 instead of a symbolic batch dimension.
    """
    if num_features not in (3, 4):
        raise ValueError(f"num_features must be 3 or 4, got {num_features}")
    rng = np.random.default_rng(seed)
    f, h = num_features, hidden
    weights: dict[str, np.ndarray] = {}
    in_dim = f
    for layer in range(layers):
        weights[f"W{layer}"] = rng.normal(0, 1.0 / np.sqrt(in_dim), (in_dim, 4 * h)).astype(np.float32)
        weights[f"U{layer}"] = rng.normal(0, 1.0 / np.sqrt(h), (h, 4 * h)).astype(np.float32)
        weights[f"b{layer}"] = rng.normal(0, 0.5, (4 * h,)).astype(np.float32)
        in_dim = h
    weights["Wp"] = rng.normal(0, logit_scale, (h, 128)).astype(np.float32)
    weights["bp"] = rng.normal(0, 0.5, (128,)).astype(np.float32)
    for head in ("s", "d", "v"):
        weights[f"w{head}"] = rng.normal(0, 1.0, (h, 1)).astype(np.float32)
        weights[f"b{head}"] = np.array([0.0], dtype=np.float32)
    model = FactoryModel(Path(path), f, h, layers, context, step_scale, duration_scale, weights)

    inits = [_init(k, v) for k, v in weights.items() if f == 4 or k not in ("wv", "bv")]
    inits += [_init("scale", _SCALE[:f]), _init("offset", _OFFSET[:f]), _init("flat", np.array([-1], np.int64)),
              _init("axis1", np.array([1], np.int64)), _init("step_scale", np.array(step_scale, np.float32)),
              _init("duration_scale", np.array(duration_scale, np.float32)),
              ]
    if f == 4:
        inits.append(_init("vel_scale", np.array(127.0, np.float32)))
    if nonfinite_outputs:
        inits.append(_init("bad", np.array(nonfinite_value, np.float32)))
    nodes = [helper.make_node("Mul", ["note", "scale"], ["x_scaled"]),
             helper.make_node("Add", ["x_scaled", "offset"], ["x0"])]

    def const(name: str, value: int) -> str:
        inits.append(_init(name, np.array([value], np.int64)))
        return name

    def sl(src: str, dst: str, start: int, end: int) -> None:
        nodes.append(helper.make_node("Slice", [src, const(dst + "_s", start), const(dst + "_e", end), "axis1"],
                                      [dst]))

    x = "x0"
    state_parts = []
    for layer in range(layers):
        p = f"l{layer}_"
        base = layer * 2 * h
        sl("state", p + "h", base, base + h)
        sl("state", p + "c", base + h, base + 2 * h)
        nodes += [helper.make_node("MatMul", [x, f"W{layer}"], [p + "xw"]),
                  helper.make_node("MatMul", [p + "h", f"U{layer}"], [p + "hu"]),
                  helper.make_node("Add", [p + "xw", p + "hu"], [p + "z0"]),
                  helper.make_node("Add", [p + "z0", f"b{layer}"], [p + "z"])]
        for k, gate in enumerate("ifgo"):
            sl(p + "z", p + "z" + gate, k * h, (k + 1) * h)
            op = "Tanh" if gate == "g" else "Sigmoid"
            nodes.append(helper.make_node(op, [p + "z" + gate], [p + gate]))
        nodes += [helper.make_node("Mul", [p + "f", p + "c"], [p + "fc"]),
                  helper.make_node("Mul", [p + "i", p + "g"], [p + "ig"]),
                  helper.make_node("Add", [p + "fc", p + "ig"], [p + "c_new"]),
                  helper.make_node("Tanh", [p + "c_new"], [p + "tc"]),
                  helper.make_node("Mul", [p + "o", p + "tc"], [p + "h_new"])]
        state_parts += [p + "h_new", p + "c_new"]
        x = p + "h_new"
    nodes.append(helper.make_node("Concat", state_parts, ["state_raw"], axis=1))
    nodes += [helper.make_node("MatMul", [x, "Wp"], ["logits0"]),
              helper.make_node("Add", ["logits0", "bp"], ["pitch_logits_raw"])]
    heads = [("s", "step", "step_scale"), ("d", "duration", "duration_scale")]
    if f == 4:
        heads.append(("v", "velocity", "vel_scale"))
    for head, name, scale in heads:
        nodes += [helper.make_node("MatMul", [x, f"w{head}"], [name + "_mm"]),
                  helper.make_node("Add", [name + "_mm", f"b{head}"], [name + "_lin"]),
                  helper.make_node("Reshape", [name + "_lin", "flat"], [name + "_flat"]),
                  helper.make_node("Sigmoid", [name + "_flat"], [name + "_sig"]),
                  helper.make_node("Mul", [name + "_sig", scale], [name + "_raw"])]
    out_names = ["pitch_logits", "step", "duration"] + (["velocity"] if f == 4 else []) + ["state_out"]
    for name in out_names:
        src = "state_raw" if name == "state_out" else name + "_raw"
        if name in nonfinite_outputs:
            nodes.append(helper.make_node("Add", [src, "bad"], [name]))
        else:
            nodes.append(helper.make_node("Identity", [src], [name]))

    batch = 1 if fixed_batch else "N"
    s = layers * 2 * h
    shapes = {"pitch_logits": [batch, 128], "step": [batch], "duration": [batch], "velocity": [batch],
              "state_out": [batch, s]}
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, shapes[n]) for n in out_names
               if n not in drop_outputs]
    inputs = [helper.make_tensor_value_info("note", TensorProto.FLOAT, [batch, f]),
              helper.make_tensor_value_info("state", TensorProto.FLOAT, [batch, s])]
    graph = helper.make_graph(nodes, "improvd_step_test", inputs, outputs, initializer=inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="modelfactory")
    proto.ir_version = IR_VERSION
    meta = {"improvd.format": format_tag,
            "improvd.features": features_meta if features_meta is not None else ",".join(FEATURES[:f]),
            "improvd.context": str(context),
            "improvd.card": json.dumps(card if card is not None else {"data": "random weights", "seed": seed})}
    helper.set_model_props(proto, {k: v for k, v in meta.items() if k not in drop_metadata})
    onnx.checker.check_model(proto)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    onnx.save(proto, str(path))
    return model
