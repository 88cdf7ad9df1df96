"""The example in docs/model-format.md, run as written, reproduces `improvd generate --temperature 0` exactly.

The example is the Python block between the `model-format-example` marker comments. It knows only onnxruntime and
numpy; it must give the same pitches as the MIDI file `improvd generate` writes, and the same steps and durations
to the millisecond.
"""

import re
from pathlib import Path

import mido
import numpy as np
import pytest

from improvd.core import notes as nt
from improvd.daemon.cli import main
from improvd.core.midifile import Track, notes_from_midi, read_notes, write_notes
from harness.modelfactory import make_step_model

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "model-format.md"
MARKERS = re.compile(r"<!-- model-format-example:start -->\s*```python\n(.*?)```\s*<!-- model-format-example:end -->",
                     re.S)


def doc_example() -> str:
    found = MARKERS.findall(DOC.read_text(encoding="utf-8"))
    assert len(found) == 1, "docs/model-format.md must hold exactly one marked example"
    return found[0]


def test_the_example_is_short_and_uses_only_onnxruntime_and_numpy():
    code = doc_example()
    imports = {m for line in code.splitlines() for m in re.findall(r"^\s*(?:import|from)\s+(.+)", line)}
    assert imports == {"numpy as np, onnxruntime as ort"}
    assert len([line for line in code.splitlines() if line.strip()]) <= 30


def continuation_track(path):
    """(notes, absolute onsets) of the `improvd` track of a file written by `improvd generate`."""
    midi = mido.MidiFile(str(path))
    track = next(t for t in midi.tracks if any(m.type == "track_name" and m.name == "improvd" for m in t))
    one = mido.MidiFile(type=1, ticks_per_beat=midi.ticks_per_beat)
    one.tracks += [midi.tracks[0], track]
    tick = 0
    for msg in mido.merge_tracks(one.tracks):
        tick += msg.time
        if msg.type == "note_on" and msg.velocity:
            break
    notes = notes_from_midi(one)
    return notes, nt.onsets(notes, mido.tick2second(tick, midi.ticks_per_beat, 500_000))


def as_written(onsets, notes):
    """Durations as a MIDI track holds them: a note ends where the same pitch starts again while it sounds."""
    dur = notes[:, nt.DURATION].copy()
    for i in range(len(notes)):
        for j in range(i + 1, len(notes)):
            if notes[j, nt.PITCH] == notes[i, nt.PITCH] and onsets[j] > onsets[i]:
                dur[i] = min(dur[i], onsets[j] - onsets[i])
                break
    return dur


@pytest.mark.parametrize("features, layers, context, seed", [(3, 1, 6, 1), (4, 2, 9, 1)])
def test_doc_example_reproduces_improvd_generate(tmp_path, features, layers, context, seed):
    model = make_step_model(tmp_path / "m.onnx", num_features=features, layers=layers, hidden=16, context=context,
                            seed=seed, logit_scale=1.5, step_scale=0.5, duration_scale=0.7)
    rng = np.random.default_rng(seed)
    n_prime = 2 * context + 3  # the prime itself is re-primed
    prime = nt.from_onsets(rng.integers(50, 85, n_prime), np.cumsum(rng.choice([0.0, 0.2, 0.4], n_prime)),
                           rng.uniform(0.1, 0.8, n_prime), rng.integers(30, 120, n_prime))
    write_notes(tmp_path / "prime.mid", [Track("p", prime)])
    out = tmp_path / "out.mid"
    n = 3 * context + 5
    assert main(["generate", "--config", str(REPO / "config.toml"), "--model", str(model.path),
                 "--prime", str(tmp_path / "prime.mid"), "--out", str(out), "--temperature", "0",
                 "--notes", str(n)]) == 0

    namespace: dict = {}
    exec(compile(doc_example(), str(DOC), "exec"), namespace)  # noqa: S102 - the doc's own example
    heard = read_notes(tmp_path / "prime.mid")  # what improvd generate read
    ours = np.array(namespace["continue_greedy"](str(model.path), heard.tolist(), n), dtype=np.float64)

    got, onsets = continuation_track(out)
    assert len(got) == len(ours) == n
    np.testing.assert_array_equal(got[:, nt.PITCH], ours[:, 0])
    want_onsets = nt.onsets(heard)[-1] + np.cumsum(ours[:, 1])
    np.testing.assert_allclose(onsets, want_onsets, atol=1e-3)
    np.testing.assert_allclose(got[:, nt.STEP], np.concatenate([[0.0], ours[1:, 1]]), atol=1e-3)
    np.testing.assert_allclose(got[:, nt.DURATION], as_written(want_onsets, ours[:, [0, 1, 2]]), atol=1e-3)
    np.testing.assert_array_equal(got[:, nt.VELOCITY], ours[:, 3])
    assert len(set(ours[:, 0])) > 1
