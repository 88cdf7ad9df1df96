"""The model files' format tags and metadata keys: one home for what the exporter writes and the readers check.

docs/model-format.md specifies the formats. `export/onnx.py` writes these keys into an ONNX file's metadata, the
daemon's `StepModel` (daemon/predict/model.py) checks them when it loads a step model, and `train/recover.py`
reads them from a window-format export to rebuild its Keras model. Pure constants, no imports.
"""

STEP_FORMAT = "step-1"      # one note in, the recurrent state carried between calls (what the daemon plays)
WINDOW_FORMAT = "window-1"  # [N, context, F] in, the next note out (keeps every weight; `--format window`)

# ONNX metadata keys (custom_metadata_map / metadata_props), all strings.
META_FORMAT = "improvd.format"      # STEP_FORMAT or WINDOW_FORMAT
META_FEATURES = "improvd.features"  # the input features, comma-separated, in order
META_CONTEXT = "improvd.context"    # the notes of context the model was trained and evaluated with
META_CARD = "improvd.card"          # the model card, JSON

FEATURES_3 = ("pitch", "step", "duration")
FEATURES_4 = ("pitch", "step", "duration", "velocity")
VALID_FEATURES = (FEATURES_3, FEATURES_4)
