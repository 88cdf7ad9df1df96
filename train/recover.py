"""A trainable Keras model from a window-format ONNX export (`improvd export --format window`).

The window format keeps every weight of the Keras model unchanged (tf2onnx writes the embedding, one ONNX `LSTM`
node per layer and the dense heads), so the Keras model can be rebuilt exactly: this is how the shipped model's
`models/bach.keras` was made from `models/bach.window.onnx` when the original run directory was not at hand, and
what `improvd train --init` uses when it is given a window-format `.onnx` file. The step format cannot be used:
it folds the pitch embedding into the first LSTM kernel.

ONNX LSTM gates are ordered i, o, f, c (weights [4u, in], biases split into input and recurrent halves); Keras
orders them i, f, c, o (kernel [in, 4u], one bias). The rebuilt model is checked against the ONNX one on random
windows before it is returned.

Called from the main thread of `improvd train` (TensorFlow and onnx needed: the `train` extra).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from improvd.core.modelformat import FEATURES_4, META_CARD, META_FEATURES, META_FORMAT, WINDOW_FORMAT

HEADS = ("pitch", "step", "duration", "velocity")
PARITY_TOLERANCE = 1e-3  # largest |keras - onnx| allowed on the pitch logits of random windows


def _onnx_to_keras_gates(w: np.ndarray, units: int) -> np.ndarray:
    """ONNX gate blocks (i, o, f, c) along axis 0 → Keras order (i, f, c, o)."""
    i, o, f, c = (w[k * units:(k + 1) * units] for k in range(4))
    return np.concatenate([i, f, c, o], axis=0)


def _card(model_proto) -> dict:
    props = {p.key: p.value for p in model_proto.metadata_props}
    if props.get(META_FORMAT) != WINDOW_FORMAT:
        raise ValueError(f"format {props.get(META_FORMAT)!r}: only a window-format export ({WINDOW_FORMAT}) keeps "
                         f"the weights a Keras model needs; export the run with --format window, or pass its "
                         f"run directory or .keras file")
    return {"card": json.loads(props.get(META_CARD, "{}")),
            "features": tuple(props.get(META_FEATURES, ",".join(FEATURES_4)).split(","))}


def keras_from_window_onnx(path: str | Path):
    """The Keras model (improvd's sequence kind) whose window-format export is `path`; ValueError if it is not one.

    The preset's recipe (loss weights, learning rate...) is the card's preset's; the architecture (units,
    embedding, features) is read from the weights.
    """
    import onnx
    from onnx import numpy_helper

    from improvd.core.presets import Preset, get_preset
    from improvd.train.model import build_model

    path = Path(path)
    proto = onnx.load(str(path))
    meta = _card(proto)
    init = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    lstms = [n for n in proto.graph.node if n.op_type == "LSTM"]
    if not lstms:
        raise ValueError(f"{path}: no LSTM node; not an improvd sequence model")
    layers = []
    for node in lstms:
        units = next(onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == "hidden_size")
        w, r = init[node.input[1]][0], init[node.input[2]][0]
        b = init[node.input[3]][0] if len(node.input) > 3 and node.input[3] else np.zeros(8 * units, np.float32)
        bias = b[:4 * units] + b[4 * units:]
        layers.append((units, _onnx_to_keras_gates(w, units).T, _onnx_to_keras_gates(r, units).T,
                       _onnx_to_keras_gates(bias, units)))
    tables = [v for k, v in init.items() if "pitch_embedding" in k and v.ndim == 2]
    if len(tables) != 1:
        raise ValueError(f"{path}: expected one pitch embedding table, found {len(tables)}: not an improvd "
                         f"sequence model (the tutorial's window model has none)")
    table = tables[0]
    heads: dict[str, dict[str, np.ndarray]] = {}
    for name, value in init.items():
        m = re.search(r"/(pitch|step|duration|velocity)_\d+/", name)
        if m and value.ndim in (1, 2) and "Tensordot" not in name:
            heads.setdefault(m.group(1), {})["kernel" if value.ndim == 2 else "bias"] = value
    try:
        base = get_preset(meta["card"].get("preset", "default"))
    except ValueError:
        base = get_preset("default")
    preset = Preset(**{**base.to_dict(), "name": base.name, "kind": "sequence", "features": meta["features"],
                       "units": tuple(u for u, *_ in layers), "embedding": int(table.shape[1])})
    preset = Preset(**{k: tuple(v) if isinstance(v, list) else v for k, v in preset.to_dict().items()})
    model = build_model(preset)
    model.get_layer("note_encoder").table.set_weights([table])
    for i, (_, kernel, recurrent, bias) in enumerate(layers):
        model.get_layer(f"lstm_{i}").set_weights([kernel, recurrent, bias])
    for name in HEADS:
        if name in model.output:
            if name not in heads or set(heads[name]) != {"kernel", "bias"}:
                raise ValueError(f"{path}: the {name!r} head's weights were not found")
            model.get_layer(name).set_weights([heads[name]["kernel"], heads[name]["bias"]])
    _check_parity(model, proto, len(meta["features"]), int(meta["card"].get("context", 25)), path)
    return model, preset


def _check_parity(model, proto, num_features: int, context: int, path: Path) -> None:
    import onnxruntime as ort

    from improvd.train.model import predict_next

    rng = np.random.default_rng(0)
    windows = np.zeros((8, context, 4), np.float32)
    windows[..., 0] = rng.integers(40, 80, (8, context))
    windows[..., 1] = rng.uniform(0, 1, (8, context))
    windows[..., 2] = rng.uniform(0.1, 1, (8, context))
    windows[..., 3] = rng.integers(40, 110, (8, context))
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    outputs = [o.name for o in session.get_outputs()]
    got = dict(zip(outputs, session.run(None, {name: windows[..., :num_features]})))
    want = predict_next(model, windows)
    err = float(np.abs(got["pitch_logits"] - want["pitch_logits"]).max())
    if err > PARITY_TOLERANCE:
        raise ValueError(f"{path}: the rebuilt Keras model differs from the ONNX one by {err:.2e} on the pitch "
                         f"logits (allowed {PARITY_TOLERANCE:g})")
