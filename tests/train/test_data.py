"""Tests for training data (train/data.py) and batches (train/batches.py). No TensorFlow: fixtures built in code."""

from pathlib import Path

import numpy as np
import pytest

from improvd.core import notes as nt
from harness.trainfiles import harmonised, make_bad_files, write
from improvd.train import batches as tb
from improvd.train import data as td


# --- finding files -------------------------------------------------------------------------------------------

def test_find_midi_files_recurses_and_ignores_case(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    for name in ("x.mid", "a/y.MIDI", "a/b/z.Mid", "a/b/w.midi", "a/notes.txt", "a/b/song.mp3"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "a" / "folder.mid").mkdir()  # a folder is not a file
    found = td.find_midi_files(tmp_path)
    assert [p.relative_to(tmp_path).as_posix() for p in found] == ["a/b/w.midi", "a/b/z.Mid", "a/y.MIDI", "x.mid"]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        td.find_midi_files(tmp_path / "missing")


# --- loading, bad files and the cache ---------------------------------------------------------------------------

@pytest.mark.parametrize("workers", [1, 2])
def test_load_collection_skips_bad_files_with_reasons_and_caches(tmp_path, workers):
    folder = tmp_path / "data"
    folder.mkdir()
    good = {f"good{i}.mid": harmonised(i) for i in range(5)}
    for name, notes in good.items():
        write(folder / name, notes)
    bad = make_bad_files(folder)
    paths = td.find_midi_files(folder)
    assert len(paths) == 10

    first = td.load_collection(paths, tmp_path / "cache", workers=workers, progress=False)
    assert sorted(Path(f.path).name for f in first.files) == sorted(good)
    for f in first.files:
        np.testing.assert_allclose(f.notes, good[Path(f.path).name], atol=1e-3)
    reasons = {Path(s.path).name: s.reason for s in first.skipped}
    assert set(reasons) == set(bad)
    for name, word in bad.items():
        assert word in reasons[name], f"{name}: {reasons[name]!r} does not say {word!r}"
    assert first.cached == 0
    summary = first.summary()
    assert summary["files"] == 5 and summary["skipped"] == 5
    assert summary["notes"] == sum(len(n) for n in good.values())
    assert {item["path"] for item in summary["skipped_files"]} == {str(folder / n) for n in bad}
    assert sum(summary["skipped_by_reason"].values()) == 5

    second = td.load_collection(paths, tmp_path / "cache", workers=workers, progress=False)
    assert second.cached == len(paths)
    assert [f.path for f in second.files] == [f.path for f in first.files]
    assert [(s.path, s.reason) for s in second.skipped] == [(s.path, s.reason) for s in first.skipped]
    for a, b in zip(first.files, second.files):
        np.testing.assert_array_equal(a.notes, b.notes)


def test_cache_is_by_content(tmp_path):
    notes = harmonised(1)
    a = write(tmp_path / "a.mid", notes)
    td.load_collection([a], tmp_path / "cache", workers=1, progress=False)
    copy = tmp_path / "copy.mid"
    copy.write_bytes(a.read_bytes())
    again = td.load_collection([copy], tmp_path / "cache", workers=1, progress=False)
    assert again.cached == 1 and again.files[0].path == str(copy)
    write(a, harmonised(2))  # the same name with new content is parsed again
    changed = td.load_collection([a], tmp_path / "cache", workers=1, progress=False)
    assert changed.cached == 0
    np.testing.assert_allclose(changed.files[0].notes, harmonised(2), atol=1e-3)


# --- the split -------------------------------------------------------------------------------------------------

def files_of(notes_list):
    return [td.FileNotes(f"f{i}.mid", f"{i:064x}", n) for i, n in enumerate(notes_list)]


def corpus():
    """6 tunes harmonised 3 times each (transposed, other bass lines) and 12 tunes harmonised once."""
    notes, tunes = [], []
    for t in range(6):
        for k, shift in enumerate((0, 5, -3)):
            notes.append(harmonised(t, transpose=shift, voices_seed=100 * t + k))
            tunes.append(t)
    for t in range(6, 18):
        notes.append(harmonised(t))
        tunes.append(t)
    return files_of(notes), tunes


def test_melody_intervals_are_transposition_invariant():
    a, b = harmonised(3), harmonised(3, transpose=7, voices_seed=55)
    np.testing.assert_array_equal(td.melody_intervals(a), td.melody_intervals(b))
    assert len(td.melody_intervals(a)) == 39


def test_split_is_deterministic_by_file_and_keeps_melodies_together():
    files, tunes = corpus()
    split = td.split_files(files, 0.2, seed=7)
    assert split == td.split_files(files, 0.2, seed=7)
    assert sorted(split.train + split.val) == list(range(len(files)))
    assert not set(split.train) & set(split.val)
    assert split.groups == 6 + 12 and split.grouped_files == 18
    for seed in range(12):
        split = td.split_files(files, 0.2, seed=seed)
        val_tunes = {tunes[i] for i in split.val}
        train_tunes = {tunes[i] for i in split.train}
        assert not val_tunes & train_tunes, f"seed {seed}: a tune is on both sides"
        assert 0.1 <= len(split.val) / len(files) <= 0.35
    assert len({tuple(td.split_files(files, 0.2, seed=s).val) for s in range(12)}) > 3  # the seed matters


def test_split_without_grouping_can_separate_harmonisations():
    files, tunes = corpus()
    separated = 0
    for seed in range(12):
        split = td.split_files(files, 0.2, seed=seed, group_melodies=False)
        assert split.groups == len(files) and split.grouped_files == 0
        separated += bool({tunes[i] for i in split.val} & {tunes[i] for i in split.train})
    assert separated > 0


def test_split_json_lists_paths():
    files, _ = corpus()
    split = td.split_files(files, 0.2, seed=1)
    js = split.to_json(files)
    assert js["val"] == [files[i].path for i in split.val]
    assert js["melody_groups"] == split.groups


def test_leakage_counts_shared_16_note_runs():
    rng = np.random.default_rng(0)
    train = [np.column_stack([rng.integers(40, 90, 50), np.zeros((50, 3))]) for _ in range(3)]
    val = np.column_stack([rng.integers(100, 120, 20), np.zeros((20, 3))])  # pitches no training file has
    assert td.leakage(train, [val]) == 0.0
    val[2:18, nt.PITCH] = train[1][10:26, nt.PITCH]  # one 16-note run of 5 is shared
    assert td.leakage(train, [val]) == pytest.approx(1 / 5)
    assert td.leakage(train, [train[0]]) == 1.0
    assert td.leakage(train, [val[:10]]) == 0.0  # too short to hold a run


# --- batches -------------------------------------------------------------------------------------------------

def ramp_files(lengths):
    """Files whose note i of file f has pitch (f*7 + i) % 100 + 10 and step i / 1000: easy to trace."""
    out = []
    for f, n in enumerate(lengths):
        i = np.arange(n)
        out.append(np.column_stack([(f * 7 + i) % 100 + 10, i / 1000, 0.1 + i / 1e4, 1 + i % 127]).astype(float))
    return out


@pytest.mark.parametrize("seed", [None, 0, 1, 2])
def test_chunk_plan_covers_each_note_about_once(seed):
    lengths = np.array([1, 2, 17, 50, 64, 65, 200])
    length = 16
    rng = np.random.default_rng(seed) if seed is not None else None
    plan = tb.chunk_plan(lengths, length, rng)
    covered = [np.zeros(n, dtype=int) for n in lengths]
    for f, start in plan:
        covered[f][start + 1:start + length + 1] += 1
    for f, n in enumerate(lengths):
        assert covered[f][0] == 0  # the first note is never a target
        if n >= 2:
            assert (covered[f][1:] >= 1).all(), f"file {f}: a note is never a target"
            assert covered[f][1:].sum() <= (n - 1) + length  # at most one chunk's worth is seen twice
            if seed is None:
                assert (covered[f][1:] == 1).all()
    assert 0 not in plan[:, 0]  # a one-note file has no target


def test_make_batch_targets_are_inputs_shifted_by_one_and_padding_has_no_weight():
    files = ramp_files([40, 10])
    plan = np.array([[0, 0], [0, 30], [1, 0]])
    x, y, w = tb.make_batch(files, plan, "sequence", 16, 4)
    assert x.shape == (3, 16, 4) and y["pitch"].shape == (3, 16) and y["step"].shape == (3, 16, 1)
    for row, (f, start) in enumerate(plan):
        n = min(16, len(files[f]) - start - 1)
        np.testing.assert_allclose(x[row, :n], files[f][start:start + n], rtol=1e-6)
        np.testing.assert_array_equal(y["pitch"][row, :n], files[f][start + 1:start + n + 1, nt.PITCH])
        np.testing.assert_allclose(y["step"][row, :n, 0], files[f][start + 1:start + n + 1, nt.STEP], rtol=1e-6)
        np.testing.assert_allclose(y["duration"][row, :n, 0], files[f][start + 1:start + n + 1, nt.DURATION],
                                   rtol=1e-6)
        np.testing.assert_allclose(y["velocity"][row, :n, 0], files[f][start + 1:start + n + 1, nt.VELOCITY] / 127,
                                   rtol=1e-6)
        # Inside the chunk, target t is input t + 1.
        np.testing.assert_array_equal(y["pitch"][row, :n - 1], x[row, 1:n, nt.PITCH])
        assert (w[row, :n] == 1).all() and (w[row, n:] == 0).all()
        assert (x[row, n:] == 0).all()
    assert w[0].sum() == 16 and w[1].sum() == 9 and w[2].sum() == 9


def test_make_batch_window_kind_is_the_tutorials():
    files = ramp_files([40])
    x, y, w = tb.make_batch(files, np.array([[0, 3]]), "window", 25, 3)
    assert x.shape == (1, 25, 3) and y["pitch"].shape == (1,) and "velocity" not in y
    np.testing.assert_allclose(x[0, :, nt.PITCH], files[0][3:28, nt.PITCH] / 128.0, rtol=1e-6)
    assert y["pitch"][0] == files[0][28, nt.PITCH]
    assert y["step"][0, 0] == pytest.approx(files[0][28, nt.STEP])
    assert w[0] == 1.0
    plan = tb.window_plan(np.array([40, 25, 26]), 25)
    assert len(plan) == 15 + 0 + 1


def test_transposition_keeps_pitches_in_range():
    rng = np.random.default_rng(0)
    low = np.column_stack([rng.integers(0, 5, 30), np.full(30, 0.1), np.full(30, 0.1), np.full(30, 64.0)])
    high = low.copy()
    high[:, nt.PITCH] = 127 - low[:, nt.PITCH]
    files = [low, high]
    plan = np.array([[0, 0], [1, 0], [0, 5], [1, 5]] * 25)
    shifts = set()
    for _ in range(5):
        x, y, w = tb.make_batch(files, plan, "sequence", 16, 4, transpose=12, rng=rng)
        assert x[..., nt.PITCH].min() >= 0 and x[..., nt.PITCH].max() <= 127
        assert y["pitch"].min() >= 0 and y["pitch"].max() <= 127
        for row, (f, start) in enumerate(plan):
            shift = x[row, 0, nt.PITCH] - files[f][start, nt.PITCH]
            shifts.add(shift)
            # Inputs and targets move together.
            np.testing.assert_array_equal(x[row, :, nt.PITCH] - files[f][start:start + 16, nt.PITCH], shift)
            np.testing.assert_array_equal(y["pitch"][row] - files[f][start + 1:start + 17, nt.PITCH], shift)
    assert len(shifts) > 5 and min(shifts) < 0 < max(shifts)
    assert tb.transpose_shift(np.array([[0, 0, 0, 0], [127, 0, 0, 0]], float), 12, rng) == 0


# --- scale: the stat index, the pack, the streaming batch source ------------------------------------------------

def test_index_skips_unchanged_files_without_reading_them(tmp_path, monkeypatch):
    folder = tmp_path / "data"
    folder.mkdir()
    paths = [write(folder / f"f{i}.mid", harmonised(i)) for i in range(4)]
    monkeypatch.setattr(td, "RACY_S", 0.0)  # files written just now may be trusted to the index
    first = td.load_collection(paths, tmp_path / "cache", workers=1, progress=False)
    assert (first.parsed, first.hashed, first.cached) == (4, 4, 0)
    second = td.load_collection(paths, tmp_path / "cache", workers=1, progress=False)
    assert (second.parsed, second.hashed, second.cached) == (0, 0, 4)  # not even opened
    write(paths[2], harmonised(20))  # changed: read, hashed and parsed again; the others untouched
    third = td.load_collection(paths, tmp_path / "cache", workers=1, progress=False)
    assert (third.parsed, third.hashed, third.cached) == (1, 1, 3)
    np.testing.assert_allclose(third.files[2].notes, harmonised(20), atol=1e-3)


def test_recently_modified_files_are_hashed_again(tmp_path, monkeypatch):
    monkeypatch.setattr(td, "RACY_S", 3600.0)  # "recently" = within the hour, however slow this machine is
    path = write(tmp_path / "a.mid", harmonised(1))
    td.load_collection([path], tmp_path / "cache", workers=1, progress=False)
    again = td.load_collection([path], tmp_path / "cache", workers=1, progress=False)
    assert again.hashed == 1 and again.parsed == 0 and again.cached == 1  # racy: re-hashed, not re-parsed


def test_collection_notes_are_one_memory_mapped_pack(tmp_path):
    paths = [write(tmp_path / f"f{i}.mid", harmonised(i, n=20 + i)) for i in range(3)]
    col = td.load_collection(paths, tmp_path / "cache", workers=1, progress=False)
    pack = col.notes
    assert isinstance(pack.notes, np.memmap) and pack.notes.dtype == np.float32
    assert list(pack.lengths) == [40, 42, 44] and pack.num_notes == 126
    for i, f in enumerate(col.files):
        assert np.shares_memory(f.notes, pack.notes)
        np.testing.assert_array_equal(pack[i], f.notes)
    sub = pack.subset([2, 0])
    np.testing.assert_array_equal(sub[0], pack[2])
    assert len(list((tmp_path / "cache" / td.CACHE_VERSION / "packs").glob("*.f32"))) == 1
    pack.release()  # drops resident pages; the data is still there
    np.testing.assert_array_equal(sub[1], col.files[0].notes)


def test_melody_groups_in_partitions_match_one_pass(monkeypatch):
    files, tunes = corpus()
    whole = td.melody_groups(files)
    monkeypatch.setattr(td, "GRAM_BLOCK", 50)  # many partitions and spill blocks
    parts = td.melody_groups(td.NoteSet.from_arrays([f.notes for f in files]))
    canon = lambda ids: sorted(sorted(i for i, g in enumerate(ids) if g == x) for x in set(ids))  # noqa: E731
    assert canon(whole) == canon(parts)
    assert canon(whole) == canon(tunes)


def test_batch_source_is_reproducible_and_splits_global_batches_by_replica():
    files = td.NoteSet.from_arrays(ramp_files([40, 70, 5, 33]))
    src = tb.BatchSource(files, "sequence", 16, 4, transpose=2, seed=3)
    assert src.rows == len(tb.chunk_plan(files.lengths, 16, None))
    other = tb.BatchSource(files, "sequence", 16, 4, transpose=2, seed=3)
    plan = src.plan(1)
    assert len(plan) == src.rows and not np.array_equal(plan, src.plan(0))
    np.testing.assert_array_equal(plan, other.plan(1))
    # Replica r of R takes rows [r*b, (r+1)*b) of each global batch; the same on every worker.
    x0, _, _ = src.batch(plan, 1, 0, 0, 2, 2)
    x1, _, _ = other.batch(plan, 1, 0, 1, 2, 2)
    x_all, _, _ = tb.BatchSource(files, "sequence", 16, 4, seed=3).batch(plan, 1, 0, 0, 4, 1)
    np.testing.assert_array_equal(x0[:, :, 1:], x_all[:2, :, 1:])  # transposition aside, the same rows
    np.testing.assert_array_equal(x1[:, :, 1:], x_all[2:, :, 1:])
    # A short last batch is padded with weight 0 and its real rows weighed up to keep the mean.
    steps = src.steps(4)
    x, y, w = src.batch(plan, 1, steps - 1, 0, 4, 1)
    real = src.rows - 4 * (steps - 1)
    assert x.shape[0] == 4 and (w["pitch"][real:] == 0).all()
    assert w["pitch"][:real].max() == pytest.approx(4 / real)
    generated = list(src.generate([0], 4, 1))
    assert len(generated) == steps


def test_several_passes_per_epoch_each_cover_the_data_in_a_new_order():
    files = td.NoteSet.from_arrays(ramp_files([40, 70, 5, 33]))
    one = tb.BatchSource(files, "sequence", 16, 4, transpose=2, seed=3)
    three = tb.BatchSource(files, "sequence", 16, 4, transpose=2, seed=3, passes=3)
    assert three.rows == 3 * one.rows and three.steps(4) >= 3 * (one.steps(4) - 1)
    plan = three.plan(1)
    np.testing.assert_array_equal(plan[:one.rows], one.plan(1))  # the first pass is the one-pass epoch
    passes = plan.reshape(3, one.rows, 2)
    assert not np.array_equal(passes[1], passes[0]) and not np.array_equal(passes[2], passes[1])
    for p in passes:  # every pass has a chunk from each file
        assert set(p[:, 0]) == set(one.plan(1)[:, 0])
    # asked in rows (Preset.epoch_rows): whole passes, as many as that takes
    assert tb.BatchSource(files, "sequence", 16, 4, seed=3, min_rows=2 * one.rows + 1).rows == 3 * one.rows
    assert tb.BatchSource(files, "sequence", 16, 4, seed=3, min_rows=one.rows).rows == one.rows
    with pytest.raises(ValueError, match="passes = 0"):
        tb.BatchSource(files, "sequence", 16, 4, passes=0)
    # validation keeps one fixed pass whatever is asked
    assert tb.BatchSource(files, "sequence", 16, 4, shuffle=False, passes=3).rows == one.rows
