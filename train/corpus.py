"""The built-in training data: the Bach chorales that ship inside music21, converted to MIDI once and cached.

Nothing is downloaded: music21 carries the scores (MusicXML and Humdrum) in its package. Conversion runs in
worker processes, writes each MIDI file atomically, and skips files already converted, so a second call costs
nothing and an interrupted one resumes.

Threads: the main thread of `improvd train`, and the worker processes that convert the corpus.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

log = logging.getLogger(__name__)

SCORE_SUFFIXES = (".mxl", ".xml", ".musicxml", ".krn")


def bach_chorale_scores() -> list[Path]:
    """Paths of the Bach chorale scores bundled with music21 (BWV numbers; Roman-numeral analyses excluded)."""
    from music21 import corpus
    paths = [Path(p) for p in corpus.getComposer("bach")]
    return sorted(p for p in paths if p.name.startswith("bwv") and p.suffix.lower() in SCORE_SUFFIXES)


def convert_one(args: tuple[str, str]) -> tuple[str, str | None]:
    """Worker: one score to one MIDI file; returns (score, error or None)."""
    src, dst = args
    try:
        from music21 import converter
        score = converter.parse(src)
        tmp = f"{dst}.{os.getpid()}.tmp"
        score.write("midi", fp=tmp)
        os.replace(tmp, dst)
        return src, None
    except Exception as err:  # one bad score must not stop the conversion; it is reported
        return src, f"{type(err).__name__}: {err}"


def bach_midi_dir(cache_dir: str | os.PathLike, workers: int = 0, progress: bool = True) -> Path:
    """Convert (once) and return the folder of Bach chorale MIDI files.

    Args:
        cache_dir: improvd's cache folder; the MIDI files go to `cache_dir/bach-chorales/`.
        workers: worker processes; 0 = one per core.
        progress: show a progress bar.

    Returns:
        The folder holding one `.mid` per chorale.
    """
    import music21
    from tqdm import tqdm

    out = Path(cache_dir).expanduser() / f"bach-chorales-music21-{music21.__version__}"
    out.mkdir(parents=True, exist_ok=True)
    todo = []
    for score in bach_chorale_scores():
        dst = out / (score.name.rsplit(".", 1)[0] + ".mid")
        if not dst.exists():
            todo.append((str(score), str(dst)))
    if todo:
        log.info("converting %d Bach chorales from music21 to MIDI into %s (once)", len(todo), out)
        with ProcessPoolExecutor(max_workers=workers or os.cpu_count()) as pool:
            results = pool.map(convert_one, todo, chunksize=4)
            for src, err in tqdm(results, total=len(todo), desc="chorales → MIDI", disable=not progress,
                                 unit="file"):
                if err:
                    log.warning("skipped %s: %s", Path(src).name, err)
    return out
