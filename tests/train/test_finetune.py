"""`improvd train --init` (fine-tuning), `--tracks`, and `improvd eval --adapt`, on small synthetic files."""

import importlib.util
import json

import numpy as np
import pytest

from improvd.core import notes as nt
from improvd.core.errors import MidiFileError
from improvd.core.midifile import Track, read_notes, write_notes
from harness.trainfiles import REPO, improvd, read_history, song

pytestmark = [pytest.mark.tf,
              pytest.mark.skipif(importlib.util.find_spec("tensorflow") is None,
                                 reason="needs TensorFlow (pip install 'improvd[train]')")]


def _weights(path):
    from improvd.train.model import load_keras
    return load_keras(path).get_weights()


def test_init_starts_from_the_given_weights_and_resumes(work, run):
    from improvd.train.init import weights_sha256
    from improvd.train.model import load_keras

    out = work["root"] / "ft"
    # a learning rate of ~0: the fine-tuned weights must be the starting ones (dropout does not change weights)
    assert improvd(work, "train", "--data", work["data"], "--init", run, "--epochs", 1, "--out", out,
                   "--set", "train.learning_rate=1e-12", "--no-progress") == 0
    for a, b in zip(_weights(run / "model.keras"), _weights(out / "model.keras")):
        np.testing.assert_allclose(a, b, atol=1e-6)
    metrics = json.loads((out / "metrics.json").read_text())
    init = metrics["init"]
    assert init["how"] == "run directory" and init["path"] == str((run / "model.keras").resolve())
    assert init["weights_sha256"] == weights_sha256(load_keras(run / "model.keras"))
    assert init["architecture"]["units"] == [16] and init["card"]["preset"] == "tiny"
    config = json.loads((out / "config.json").read_text())
    assert config["preset"]["name"] == "tiny" and config["init"] == init

    assert improvd(work, "train", "--resume", out, "--init", run, "--epochs", 2, "--no-progress") == 2
    assert improvd(work, "train", "--resume", out, "--epochs", 2, "--no-progress") == 0
    assert len(read_history(out)) == 2
    assert json.loads((out / "metrics.json").read_text())["init"] == init


def test_init_fine_tunes_with_the_recipe_and_keeps_the_averaged_weights(work, run):
    """--init adds the fine-tuning recipe (warm-up, weight averaging); model.keras holds the moving average of
    the weights, last.keras the raw ones. With one batch per epoch and one epoch, the average after that batch
    is exactly decay × start + (1 − decay) × raw."""
    from improvd.train.init import FINETUNE

    out = work["root"] / "ft-average"
    assert improvd(work, "train", "--data", work["data"], "--init", run, "--epochs", 1, "--out", out,
                   "--set", "train.batch_size=4096", "--set", "train.learning_rate=0.05", "--no-progress") == 0
    preset = json.loads((out / "config.json").read_text())["preset"]
    assert preset["warmup_steps"] == FINETUNE["warmup_steps"] and preset["average"] == FINETUNE["average"]
    assert preset["learning_rate"] == 0.05  # [train] learning_rate still overrides the recipe's
    decay = preset["average"]
    start, raw, best = _weights(run / "model.keras"), _weights(out / "last.keras"), _weights(out / "model.keras")
    assert max(np.abs(r - s).max() for r, s in zip(raw, start)) > 1e-3  # it did train
    for s, r, b in zip(start, raw, best):
        np.testing.assert_allclose(b, decay * s + (1 - decay) * r, atol=1e-6)
    # training from scratch has no recipe of its own
    scratch = work["root"] / "no-init"
    assert improvd(work, "train", "--data", work["data"], "--preset", "tiny", "--epochs", 1, "--out", scratch,
                   "--no-progress") == 0
    preset = json.loads((scratch / "config.json").read_text())["preset"]
    assert preset["average"] == 0 and preset["warmup_steps"] == 0 and not preset["anneal"]


def test_init_keeps_the_architecture_of_the_starting_model(work, run, capsys):
    from improvd.train.init import FINETUNE

    out = work["root"] / "ft-units"
    # the default preset's recipe on the tiny model's shape
    assert improvd(work, "train", "--data", work["data"], "--init", run / "model.keras", "--preset", "default",
                   "--epochs", 1, "--out", out, "--no-progress") == 0
    config = json.loads((out / "config.json").read_text())
    assert config["preset"]["units"] == [16] and config["preset"]["embedding"] == 8
    # the default preset's recipe (dropout) with --init's own learning rate, transposition and epoch length
    assert config["preset"]["dropout"] == 0.3
    assert config["preset"]["learning_rate"] == FINETUNE["learning_rate"] != 0.002
    assert config["preset"]["transpose"] == FINETUNE["transpose"] != 6
    assert config["preset"]["epoch_rows"] == FINETUNE["epoch_rows"] > 0
    rc = improvd(work, "train", "--data", work["data"], "--init", run, "--set", "train.units=[32]", "--epochs", 1,
                 "--out", work["root"] / "ft-bad", "--no-progress")
    assert rc == 2
    assert "fine-tuning keeps the starting model's architecture" in capsys.readouterr().err
    rc = improvd(work, "train", "--data", work["data"], "--init", work["root"] / "nowhere", "--epochs", 1,
                 "--no-progress")
    assert rc == 2 and "does not exist" in capsys.readouterr().err


def test_a_window_format_export_rebuilds_the_keras_model(run, exported):
    from improvd.train.recover import keras_from_window_onnx

    model, preset = keras_from_window_onnx(exported.with_name("M.window.onnx"))
    assert preset.units == (16,) and preset.embedding == 8
    for a, b in zip(_weights(run / "model.keras"), model.get_weights()):
        np.testing.assert_allclose(a, b, atol=1e-6)
    with pytest.raises(ValueError, match="only a window-format export"):
        keras_from_window_onnx(exported)  # the step format folds the embedding away


def test_the_shipped_keras_weights_are_the_shipped_model():
    """models/bach.keras (for --init shipped) predicts what models/bach.onnx (what the daemon plays) predicts."""
    from improvd.daemon.predict.model import StepModel
    from improvd.train.evaluate import onnx_predictor
    from improvd.train.init import SHIPPED_KERAS, load_init
    from improvd.train.model import predict_next

    init = load_init("shipped", None)
    assert init.info["path"] == str(SHIPPED_KERAS) and init.info["card"]["preset"] == "default"
    assert init.model.count_params() == json.loads((REPO / "models" / "bach.card.json").read_text())["parameters"]
    windows = np.stack([song(s, 25) for s in range(4)])
    want = onnx_predictor(StepModel(str(REPO / "models" / "bach.onnx")))(windows)["pitch_logits"]
    got = predict_next(init.model, windows)["pitch_logits"]
    np.testing.assert_allclose(got, want, atol=2e-3)


def _recording(path, player, answer):
    write_notes(path, [Track("player", player, channel=1), Track("improvd", answer, channel=0)])


def test_tracks_select_the_recorders_tracks(work, tmp_path):
    from improvd.train.data import load_collection

    player = nt.from_onsets([60, 62, 64, 65], [0, 0.5, 1.0, 1.5], [0.4] * 4, [90] * 4)
    answer = nt.from_onsets([72, 71], [2.0, 2.5], [0.4] * 2, [70] * 2)
    rec, plain = tmp_path / "rec.mid", tmp_path / "plain.mid"
    _recording(rec, player, answer)
    write_notes(plain, [Track("piano", player)])
    assert read_notes(rec, "player")[:, 0].tolist() == [60, 62, 64, 65]
    assert read_notes(rec, "improvd")[:, 0].tolist() == [72, 71]
    np.testing.assert_allclose(read_notes(rec, "improvd")[0, 1], 0.0)  # first step: from the track's own start
    assert len(read_notes(rec)) == 6
    with pytest.raises(MidiFileError, match="no track named 'player' \\(tracks: 'piano'\\)"):
        read_notes(plain, "player")
    cache = tmp_path / "cache"
    for tracks, pitches in (("player", [60, 62, 64, 65]), ("improvd", [72, 71]), ("all", None)):
        got = load_collection([rec, plain], cache, 1, False, tracks)
        if pitches is None:
            assert len(got.files) == 2 and not got.skipped
        else:
            assert [f.notes[:, 0].tolist() for f in got.files] == [pitches]
            assert [(s.path, s.reason) for s in got.skipped] == \
                [(str(plain), f"no track named {tracks!r} (tracks: 'piano')")]
    with pytest.raises(ValueError, match="tracks = 'drums'"):
        load_collection([rec], cache, 1, False, "drums")


def test_eval_adapt_reports_both_cross_entropies(work, run, exported):
    out = work["root"] / "adapt.json"
    data = work["root"] / "repeats"
    data.mkdir(exist_ok=True)
    for i in range(3):  # pieces that repeat their first half: adaptation must help a lot
        half = song(10 + i, 40)
        write_notes(data / f"rep{i}.mid", [Track("t", np.concatenate([half, half]))])
    assert improvd(work, "eval", "--model", exported, "--data", data, "--split", "all", "--adapt", "--json", out,
                   "--no-progress") == 0
    report = json.loads(out.read_text())
    lengths = [len(read_notes(data / f"rep{i}.mid")) for i in range(3)]
    assert report["sessions"] == 3 and report["notes"] == sum(n - max(n // 2, 25) for n in lengths)
    assert np.isfinite(report["cross_entropy"]) and report["adapted"]["cross_entropy"] < 0.5 * report["cross_entropy"]
    assert len(report["per_file"]) == 3
    # the Keras model (run directory) on the same targets agrees with its ONNX export
    out2 = work["root"] / "adapt-keras.json"
    assert improvd(work, "eval", "--model", run, "--data", data, "--split", "all", "--adapt", "--json", out2,
                   "--no-progress") == 0
    keras_report = json.loads(out2.read_text())
    assert keras_report["cross_entropy"] == pytest.approx(report["cross_entropy"], abs=1e-4)
    assert keras_report["adapted"]["cross_entropy"] == pytest.approx(report["adapted"]["cross_entropy"], abs=1e-3)
