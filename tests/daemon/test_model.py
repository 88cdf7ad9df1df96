import logging

import numpy as np
import onnx
import pytest

from improvd.core.errors import ModelError
from improvd.daemon.predict.model import StepModel
from harness.modelfactory import make_step_model


@pytest.mark.parametrize("features,layers", [(3, 1), (4, 2)])
def test_loads_and_matches_numpy_reference(tmp_path, features, layers):
    ref = make_step_model(tmp_path / "m.onnx", num_features=features, layers=layers, context=17,
                          card={"data": "x", "metrics": {"acc": 0.5}})
    model = StepModel(ref.path, threads=1)
    assert model.features == ("pitch", "step", "duration", "velocity")[:features]
    assert model.num_features == features
    assert model.state_size == ref.state_size
    assert model.context == 17
    assert model.card == {"data": "x", "metrics": {"acc": 0.5}}
    assert model.path == ref.path
    assert model.has_velocity == (features == 4)

    rng = np.random.default_rng(3)
    note = np.array([[60, 0.0, 0.3, 90], [72, 0.25, 0.1, 40]], dtype=np.float32)
    state = rng.normal(size=(2, model.state_size)).astype(np.float32)
    pred = model.run(note, state)
    expected = ref.step(note[:, :features], state)
    np.testing.assert_allclose(pred.pitch_logits, expected["pitch_logits"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(pred.step, expected["step"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(pred.duration, expected["duration"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(pred.state, expected["state_out"], rtol=1e-5, atol=1e-6)
    assert pred.pitch_logits.shape == (2, 128) and pred.step.shape == (2,) and pred.state.shape == state.shape
    if features == 4:
        np.testing.assert_allclose(pred.velocity, expected["velocity"], rtol=1e-5, atol=1e-4)
    else:
        assert pred.velocity is None


def test_zero_state_and_extra_columns_ignored(tmp_path):
    ref = make_step_model(tmp_path / "m.onnx")
    model = StepModel(ref.path)
    assert model.zero_state(3).shape == (3, ref.state_size)
    assert not model.zero_state().any()
    wide = np.array([[60, 0.1, 0.2, 99]], dtype=np.float64)
    a = model.run(wide, model.zero_state())
    b = model.run(wide[:, :3], model.zero_state())
    np.testing.assert_array_equal(a.pitch_logits, b.pitch_logits)


def test_card_absent_is_empty(tmp_path):
    ref = make_step_model(tmp_path / "m.onnx", drop_metadata=("improvd.card",))
    assert StepModel(ref.path).card == {}


def test_missing_file(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        StepModel(tmp_path / "nope.onnx")
    with pytest.raises(ModelError, match="is a directory"):
        StepModel(tmp_path)


def test_not_onnx(tmp_path):
    path = tmp_path / "junk.onnx"
    path.write_bytes(b"this is not a protobuf \x00\x01\x02" * 10)
    with pytest.raises(ModelError, match="not a loadable ONNX model"):
        StepModel(path)


@pytest.mark.parametrize("kwargs,message", [
    ({"format_tag": "window-1"}, "improvd.format = 'window-1'"),
    ({"drop_metadata": ("improvd.format",)}, "no improvd.format"),
    ({"features_meta": "pitch,step"}, "improvd.features"),
    ({"features_meta": "pitch,step,duration,velocity"}, "has 3 features"),
    ({"drop_metadata": ("improvd.context",)}, "improvd.context"),
    ({"drop_outputs": ("state_out",)}, "state_out"),
    ({"drop_outputs": ("pitch_logits",)}, "pitch_logits"),
    ({"num_features": 4, "drop_outputs": ("velocity",)}, "velocity"),
])
def test_wrong_format(tmp_path, kwargs, message):
    ref = make_step_model(tmp_path / "m.onnx", **kwargs)
    with pytest.raises(ModelError, match="not a step-format model") as info:
        StepModel(ref.path)
    assert message in str(info.value)


def test_wrong_inputs(tmp_path):
    ref = make_step_model(tmp_path / "m.onnx")
    proto = onnx.load(str(ref.path))
    proto.graph.input[1].name = "hidden"
    for node in proto.graph.node:
        node.input[:] = ["hidden" if i == "state" else i for i in node.input]
    onnx.save(proto, str(ref.path))
    with pytest.raises(ModelError, match="inputs are"):
        StepModel(ref.path)


def test_bad_card_json(tmp_path):
    ref = make_step_model(tmp_path / "m.onnx")
    proto = onnx.load(str(ref.path))
    for prop in proto.metadata_props:
        if prop.key == "improvd.card":
            prop.value = "{not json"
    onnx.save(proto, str(ref.path))
    with pytest.raises(ModelError, match="improvd.card"):
        StepModel(ref.path)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nonfinite_outputs_replaced_and_logged_once(tmp_path, caplog, value):
    ref = make_step_model(tmp_path / "m.onnx", num_features=4,
                          nonfinite_outputs=("pitch_logits", "step", "duration", "velocity", "state_out"),
                          nonfinite_value=value)
    model = StepModel(ref.path)
    with caplog.at_level(logging.WARNING, logger="improvd.model"):
        for _ in range(3):
            pred = model.run(np.array([[60, 0.1, 0.2, 80]]), model.zero_state())
    assert np.all(pred.pitch_logits == 0)
    assert pred.step[0] == 0 and pred.duration[0] == 0 and pred.velocity[0] == 64
    assert not pred.state.any()
    assert sum("non-finite" in r.message for r in caplog.records) == 1


def test_nonfinite_only_state(tmp_path):
    ref = make_step_model(tmp_path / "m.onnx", nonfinite_outputs=("state_out",))
    model = StepModel(ref.path)
    pred = model.run(np.array([[60, 0.1, 0.2]]), model.zero_state())
    assert np.isfinite(pred.pitch_logits).all() and pred.pitch_logits.std() > 0
    assert not pred.state.any()
