"""Texture bounds with the shipped model (daemon/music/texture.py): how the answers to a melody and two chorale-like calls
look with `polyphony`/`register` "match" against unbounded, and how often the bounds overrode the model; prints
JSON.

    .venv/bin/python bench/texture.py [--model models/bach.onnx] [--notes 64] [--seeds 3,4,5,6,7]

The calls: the 8-note C-major melody C D E F G F E D in quarter notes at 120 bpm (`improvd generate --temperature
0.9 --seed 3` continues it with three- and four-voice chords), and two four-voice chorale phrases (I IV V I in C
major, i iv V i in A minor) in half notes. Each is continued as `improvd generate` does (`continue_notes`, the call
as the prime, temperature 0.9, top-p 0.95), once unbounded and once with both bounds "match", for each seed. Per
call: the call's most simultaneous notes and widened span; per setting the answers' most simultaneous notes,
pitches outside the span, and the share of notes whose onset was delayed or pitch re-chosen.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from improvd.core import notes as nt  # noqa: E402
from improvd.core.config import ImproviseConfig  # noqa: E402
from improvd.daemon.generate import continue_notes, prime_texture  # noqa: E402
from improvd.daemon.predict.improviser import Improviser  # noqa: E402
from improvd.daemon.predict.model import StepModel  # noqa: E402
from improvd.daemon.predict.sampling import Decoding  # noqa: E402
from improvd.daemon.music.texture import TextureCounts  # noqa: E402
from harness.chorales import CHORALE_1, CHORALE_2, MELODY, chorale, sounding_max  # noqa: E402

CALLS = {"melody": MELODY, "chorale I-IV-V-I in C": chorale(CHORALE_1),
         "chorale i-iv-V-i in A minor": chorale(CHORALE_2, 0.8)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=str(REPO / "models" / "bach.onnx"))
    parser.add_argument("--notes", type=int, default=64)
    parser.add_argument("--seeds", default="3,4,5,6,7")
    args = parser.parse_args()
    model = StepModel(args.model)
    decoding = Decoding.from_config(ImproviseConfig(), temperature=0.9)
    seeds = [int(s) for s in args.seeds.split(",")]
    out = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "model": args.model, "calls": {}}
    for name, prime in CALLS.items():
        texture = prime_texture(prime, "match", "match", decoding.pitch_range)
        lo, hi = texture.register
        row = {"call_max_simultaneous": sounding_max(prime), "span": [lo, hi]}
        for setting, (poly, reg) in {"free": (0, "free"), "match": ("match", "match")}.items():
            counts, most, outside, notes, seconds = TextureCounts(), 0, 0, 0, 0.0
            for seed in seeds:
                improviser = Improviser(model, decoding, rng=np.random.default_rng(seed))
                cont = continue_notes(improviser, prime, args.notes,
                                      texture=prime_texture(prime, poly, reg, decoding.pitch_range), counts=counts)
                most = max(most, sounding_max(cont))
                outside += int(np.sum((cont[:, nt.PITCH] < lo) | (cont[:, nt.PITCH] > hi)))
                notes += len(cont)
                seconds += float(nt.onsets(cont)[-1] + cont[-1, nt.DURATION])
            row[setting] = {"notes": notes, "max_simultaneous": most, "pitches_outside_span": outside,
                            "notes_per_second": round(notes / seconds, 2),
                            **({k: v for k, v in counts.as_dict().items() if k != "notes"}
                               if setting == "match" else {})}
        out["calls"][name] = row
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
