"""Session adaptation and recordings as training data, end to end over real JACK MIDI ports.

1. A player repeats a distinctive motif (a zig-zag of fifths and fourths a chorale model rarely plays); improvd
   runs the shipped model with `improvise.adapt` "off", then "cache", at the same temperature and seed. The
   motif's interval pattern must come back in the answers more often with adaptation (the counts are printed).
2. Two short sessions are recorded by `[record]`; `improvd train --tracks player --init shipped` fine-tunes on
   them, and the notes it used must be exactly the player's (not improvd's answers); a plain MIDI file without
   such a track is listed as skipped with the reason.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from harness.clients import balance, notes_of, phrase
from harness.daemon import REPO
from harness.session import IMPROVD_CH, PLAYER_CH, Session

pytestmark = pytest.mark.jack

SHIPPED = SimpleNamespace(path=REPO / "models" / "bach.onnx")
MOTIF = [62, 69, 64, 71, 66, 73]       # up a fifth, down a fourth, again and again
MOTIF_INTERVALS = [b - a for a, b in zip(MOTIF, MOTIF[1:])]  # +7 -5 +7 -5 +7
ROUNDS = 4                             # phrases played, each the motif twice, each answered
STEP_S, DUR_S = 0.12, 0.09


def motif_hits(pitches: list[int]) -> int:
    """How many times two consecutive intervals of the motif (+7 -5 or -5 +7) occur in `pitches`, at any
    transposition."""
    iv = [b - a for a, b in zip(pitches, pitches[1:])]
    pairs = {tuple(MOTIF_INTERVALS[i:i + 2]) for i in range(len(MOTIF_INTERVALS) - 1)}
    return sum(tuple(iv[i:i + 2]) in pairs for i in range(len(iv) - 1))


def play_rounds(server, tmp_path, adapt: str) -> tuple[list[list[int]], Session]:
    s = Session(server, tmp_path, SHIPPED, improvise={
        "temperature": 0.9, "top_p": 0.95, "seed": 11, "max_notes": 12, "adapt": adapt, "adapt_memory": 500})
    answers = []
    try:
        for r in range(ROUNDS):
            before = sum(e.kind == "on" for e in s.events(IMPROVD_CH))
            s.player.play(phrase(MOTIF * 2, step_s=STEP_S, duration_s=DUR_S, channel=PLAYER_CH))
            s.wait_answer_notes(before + 12, timeout=20)
            s.receiver.wait_quiet(0.3, 10)
            ons = [e.note for e in s.events(IMPROVD_CH) if e.kind == "on"]
            answers.append(ons[before:])
    finally:
        s.close()
    assert balance(s.receiver.events, IMPROVD_CH) == {}
    return answers, s


@pytest.mark.slow
def test_a_repeated_motif_comes_back_more_often_with_adaptation(jack_server, tmp_path):
    off, _ = play_rounds(jack_server, tmp_path, "off")
    on, _ = play_rounds(jack_server, tmp_path, "cache")
    hits_off = sum(motif_hits(a) for a in off)
    hits_on = sum(motif_hits(a) for a in on)
    notes_off, notes_on = sum(map(len, off)), sum(map(len, on))
    print(f"\nmotif interval pairs in the answers: adapt off {hits_off} in {notes_off} notes, "
          f"adapt cache {hits_on} in {notes_on} notes (temperature 0.9, seed 11, {ROUNDS} phrases)")
    print("answers off:  ", off)
    print("answers cache:", on)
    assert hits_on > hits_off
    assert hits_on >= 2 * max(hits_off, 1)


def _record_session(server, tmp_path, rec_dir: Path, pitches: list[int]) -> tuple[list[int], list[int]]:
    s = Session(server, tmp_path, SHIPPED, improvise={"temperature": 0.0, "max_notes": 6},
                record={"dir": str(rec_dir), "flush_seconds": 0.5})
    try:
        s.player.play(phrase(pitches, step_s=STEP_S, duration_s=DUR_S, channel=PLAYER_CH))
        s.wait_answer_notes(6, timeout=20)
        s.receiver.wait_quiet(0.3, 10)
    finally:
        s.close()
    player = [n[1] for n in notes_of(s.receiver.events, PLAYER_CH)]
    improvd = [n[1] for n in notes_of(s.receiver.events, IMPROVD_CH)]
    return player, improvd


@pytest.mark.slow
@pytest.mark.tf
def test_a_recorded_session_fine_tunes_on_the_players_notes_only(jack_server, tmp_path):
    pytest.importorskip("tensorflow")
    from improvd.core.midifile import Track, write_notes
    from improvd.core import notes as nt
    from improvd.train.data import find_midi_files, load_collection

    rec = tmp_path / "recordings"
    sessions = [_record_session(jack_server, tmp_path, rec, p)
                for p in ([60, 64, 67, 72, 67, 64, 60, 62, 65, 69],
                          [57, 60, 64, 69, 64, 60, 57, 59, 62, 65, 62, 59])]
    files = sorted(rec.glob("*.mid"))
    assert len(files) == 2, files
    player_pitches = sorted(p for pl, _ in sessions for p in pl)
    improvd_pitches = sorted(p for _, im in sessions for p in im)
    assert improvd_pitches  # improvd answered, so "all" and "player" differ
    plain = rec / "plain.mid"  # an ordinary MIDI file: no track named "player"
    write_notes(plain, [Track("piano", nt.from_onsets([60, 62, 64], [0, 0.5, 1.0], [0.4] * 3, [80] * 3))])

    out = tmp_path / "run"
    cache = tmp_path / "cache"
    cmd = [sys.executable, "-m", "improvd.daemon.cli", "train", "--set", f"data.cache_dir={cache}",
           "--data", str(rec), "--tracks", "player", "--init", "shipped", "--epochs", "1", "--out", str(out),
           "--no-progress"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert done.returncode == 0, done.stderr[-4000:]
    assert f"{plain}: no track named 'player'" in done.stderr, done.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["tracks"] == "player"
    assert metrics["init"]["how"] == "shipped"
    assert metrics["data"]["files"] == 2 and metrics["data"]["skipped"] == 1
    assert metrics["data"]["notes"] == len(player_pitches)
    # the notes the run trained and validated on, as it read them (same cache, same selection)
    used = load_collection(find_midi_files(rec), cache, 1, False, "player")
    assert sorted(int(p) for f in used.files for p in np.asarray(f.notes)[:, 0]) == player_pitches
    everything = load_collection(files, cache, 1, False, "all")
    assert sorted(int(p) for f in everything.files for p in np.asarray(f.notes)[:, 0]) == \
        sorted(player_pitches + improvd_pitches)
