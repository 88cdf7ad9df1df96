"""`improvd train --init`: the trained model a fine-tuning run starts from, and the preset that keeps its shape.

A starting point is a run directory (its `model.keras` and its `config.json` preset), a `.keras` file, a
window-format `.onnx` export (rebuilt exactly by `train.recover`), a step-format `.onnx` with a `.keras` of the same
name beside it (as `models/bach.onnx` has `models/bach.keras`), or `shipped`: the model improvd ships
(`models/bach.keras`, the Keras weights of `models/bach.onnx`).

The fine-tuning run trains the starting model's architecture (kind, features, LSTM units, embedding, context);
the recipe (learning rate, dropout, augmentation...) is the chosen preset's, with `FINETUNE` on top (the
fine-tuning recipe, chosen on a development set: docs/training.md, "Fine-tuning").

Called from the main thread of `improvd train`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from improvd.core.errors import ImprovdError
from improvd.core.paths import SHIPPED_KERAS

SHIPPED = "shipped"

# What `--init` changes in the preset's recipe (train.recipe; docs/training.md says how it was chosen).
FINETUNE = {"learning_rate": 0.006, "warmup_steps": 10, "average": 0.98, "transpose": 12, "epoch_rows": 640}


def finetune_preset(preset):
    """`preset` with the fine-tuning recipe `FINETUNE` on top (the architecture and the rest unchanged)."""
    return dataclasses.replace(preset, **FINETUNE)


@dataclass
class InitModel:
    """A starting model: its Keras model, its architecture as a preset, and what the run card says about it."""

    model: object
    preset: object
    info: dict


def weights_sha256(model) -> str:
    """SHA-256 of a Keras model's weights (float32, in layer order): names the exact starting point."""
    return hashlib.sha256(b"".join(np.asarray(w, np.float32).tobytes() for w in model.get_weights())).hexdigest()


def _architecture(model) -> dict:
    """kind, features, units, embedding (and context for the window kind) of a Keras model."""
    import keras

    from improvd.train.model import model_features, model_kind

    kind = model_kind(model)
    arch = {"kind": kind, "features": model_features(model),
            "units": tuple(int(layer.units) for layer in model.layers if isinstance(layer, keras.layers.LSTM))}
    if kind == "sequence":
        arch["embedding"] = int(model.get_layer("note_encoder").embedding)
    else:
        arch["context"] = int(model.inputs[0].shape[1])
    return arch


def resolve(spec: str) -> tuple[Path, str]:
    """(the file to load, how it was named) for an `--init` argument; ImprovdError when nothing fits."""
    if spec == SHIPPED:
        if not SHIPPED_KERAS.exists():
            raise ImprovdError(f"--init shipped: {SHIPPED_KERAS} is missing (the shipped model's Keras weights); "
                               f"reinstall improvd or rebuild it with `make model`")
        return SHIPPED_KERAS, "shipped"
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "model.keras").exists():
            raise ImprovdError(f"--init {spec!r}: no model.keras in that folder (expected a run directory)")
        return path / "model.keras", "run directory"
    if not path.exists():
        raise ImprovdError(f"--init {spec!r} does not exist; expected a run directory, a .keras file, a "
                           f"window-format .onnx or 'shipped'")
    if path.suffix == ".keras":
        return path, "keras file"
    if path.suffix == ".onnx":
        beside = path.with_suffix(".keras")
        return (beside, "keras file beside the onnx") if beside.exists() else (path, "window-format onnx")
    raise ImprovdError(f"--init {spec!r}: expected a run directory, a .keras or .onnx file, or 'shipped'")


def load_init(spec: str, base_preset):
    """The starting model of `--init spec` and the preset to train it with (`base_preset`'s recipe, the model's
    architecture). ImprovdError names the problem."""
    from improvd.train.model import load_keras

    path, how = resolve(spec)
    try:
        if path.suffix == ".onnx":
            from improvd.train.recover import keras_from_window_onnx
            model, _ = keras_from_window_onnx(path)
        else:
            model = load_keras(path)
        arch = _architecture(model)
    except (ValueError, OSError) as err:
        raise ImprovdError(f"--init {spec!r}: {err}") from err
    run_dir = path.parent if path.name == "model.keras" and (path.parent / "config.json").exists() else None
    recipe = base_preset
    if run_dir is not None and base_preset is None:
        from improvd.core.presets import Preset
        saved = json.loads((run_dir / "config.json").read_text())["preset"]
        recipe = Preset(**{k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()})
    if recipe is None:
        from improvd.core.presets import get_preset
        recipe = get_preset("default" if arch["kind"] == "sequence" else "tutorial")
    preset = finetune_preset(dataclasses.replace(recipe, **arch))
    info = {"spec": spec, "path": str(path.resolve()), "how": how, "weights_sha256": weights_sha256(model),
            "architecture": {k: list(v) if isinstance(v, tuple) else v for k, v in arch.items()},
            "parameters": int(model.count_params())}
    card = path.parent / (path.stem + ".card.json")
    if card.exists():  # the shipped model's card: what it was trained on
        try:
            data = json.loads(card.read_text())
            info["card"] = {k: data.get(k) for k in ("preset", "trained", "train_command", "data")}
        except (OSError, ValueError):
            pass
    if run_dir is not None:
        metrics = run_dir / "metrics.json"
        if metrics.exists():
            data = json.loads(metrics.read_text())
            info["card"] = {"preset": data.get("preset"), "trained": data.get("created"),
                            "train_command": data.get("command"), "data": data.get("data_source")}
    return InitModel(model, preset, info)
