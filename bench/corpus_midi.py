"""Write pieces of one of music21's bundled corpora (no download) as MIDI files into a folder, for `--data DIR`.

    python bench/corpus_midi.py ryansMammoth /tmp/ryans --count 80 --seed 0 [--split 40]

Picks `--count` scores at random (seeded) among the corpus folder's scores (MusicXML, Humdrum, ABC), converts
them with music21 (in worker processes; a score that fails is reported and replaced by the next one), and with
`--split K` puts the first K in OUT/train and the rest in OUT/heldout; `--exclude DIR` skips every score whose MIDI
file name is already below DIR (a disjoint development set). Prints a JSON summary. Used for the
fine-tuning comparison and the adaptation protocol on corpora other than the chorales (docs/training.md).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

SUFFIXES = (".mxl", ".xml", ".musicxml", ".krn", ".abc")


def corpus_scores(folder: str) -> list[Path]:
    from music21 import corpus
    return sorted(Path(p) for p in corpus.getPaths() if f"/{folder}/" in str(p) and str(p).endswith(SUFFIXES))


def _name(score: Path, folder: str) -> str:
    parts = score.parts
    inside = parts[len(parts) - 1 - parts[::-1].index(folder) + 1:]
    return "_".join(inside)[: -len(score.suffix)]


def main(argv=None) -> int:
    from improvd.train.corpus import convert_one

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("folder", help="a music21 corpus folder, e.g. ryansMammoth, palestrina, monteverdi")
    ap.add_argument("out", help="output folder")
    ap.add_argument("--count", type=int, default=80)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--split", type=int, default=0, help="first K into OUT/train, the rest into OUT/heldout")
    ap.add_argument("--exclude", action="append", default=[], metavar="DIR",
                    help="skip scores whose MIDI file name exists below DIR (repeatable): a disjoint set")
    args = ap.parse_args(argv)
    scores = corpus_scores(args.folder)
    taken = {p.name for d in args.exclude for p in Path(d).rglob("*.mid")}
    scores = [s for s in scores if _name(s, args.folder) + ".mid" not in taken]
    if not scores:
        print(f"no scores in music21's corpus folder {args.folder!r}", file=sys.stderr)
        return 2
    random.Random(args.seed).shuffle(scores)
    out = Path(args.out)
    done, failed = [], []
    with ProcessPoolExecutor(max_workers=os.cpu_count()) as pool:
        queue = iter(scores)
        while len(done) < args.count:
            batch = [s for _, s in zip(range(args.count - len(done)), queue)]
            if not batch:
                break
            staging = out / ".converting"
            staging.mkdir(parents=True, exist_ok=True)
            # named by the path inside the corpus folder: several pieces have a movement1.krn
            jobs = [(str(score), str(staging / (_name(score, args.folder) + ".mid"))) for score in batch]
            for (src, dst), (_, err) in zip(jobs, pool.map(convert_one, jobs)):
                if err:
                    failed.append({"score": src, "error": err})
                    continue
                sub = out if not args.split else out / ("train" if len(done) < args.split else "heldout")
                sub.mkdir(parents=True, exist_ok=True)
                final = sub / Path(dst).name
                os.replace(dst, final)
                done.append({"score": src, "midi": str(final)})
    if (out / ".converting").exists():
        for leftover in (out / ".converting").iterdir():
            leftover.unlink()
        (out / ".converting").rmdir()
    print(json.dumps({"folder": args.folder, "converted": len(done), "failed": failed,
                      "out": str(out)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
