"""Training speed: the tutorial preset against the default preset on the same files, in one run; prints JSON.

For each preset, in its own process (so peak memory is its own): seconds per epoch, the validation pitch
cross-entropy under the shared protocol (25 notes of context) after every epoch on a fixed sample of validation
notes, and peak resident memory. Then: the wall time the default preset took to reach the tutorial preset's best
value.

    .venv/bin/python bench/train_speed.py [--data DIR] [--minutes 5] [--sample 4000]

Each preset trains for at most --minutes (the tutorial preset may stop earlier, on its own early stopping).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def worker(preset_name: str, data: str | None, minutes: float, sample: int, out: str) -> None:
    import keras
    import numpy as np

    from improvd.core.config import load_config
    from improvd.train.cli import data_source, load_data, make_split
    from improvd.train.evaluate import evaluate, keras_predictor
    from improvd.train.fit import fit
    from improvd.core.presets import get_preset

    config = load_config(ROOT / "config.toml")
    args = argparse.Namespace(data=data, corpus=None)
    collection = load_data(data_source(args, config), config, progress=False)
    split = make_split(collection, config)
    train_notes = [collection.files[i].notes for i in split.train]
    val_notes = [collection.files[i].notes for i in split.val]
    # a fixed sample of validation files whose protocol notes add up to about `sample`
    rng = np.random.default_rng(0)
    probe_files, total = [], 0
    for i in rng.permutation(len(val_notes)):
        if total >= sample:
            break
        probe_files.append(val_notes[i])
        total += max(0, len(val_notes[i]) - config.eval.context)
    curve = []
    started = time.monotonic()

    class Probe(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            t = time.monotonic() - started
            m = evaluate(keras_predictor(self.model), probe_files, config.eval.context, 512)
            curve.append({"epoch": epoch + 1, "elapsed_s": t, "protocol_ce": m["cross_entropy"]})

    preset = get_preset(preset_name)
    with tempfile.TemporaryDirectory() as run_dir:
        result = fit(Path(run_dir), preset, train_notes, val_notes, epochs=preset.epochs, max_minutes=minutes,
                     batch_size=preset.batch_size, seed=config.train.seed, progress=False,
                     extra_callbacks=[Probe()])
    elapsed = [c["elapsed_s"] for c in curve]
    epoch_s = [b - a for a, b in zip([0.0] + elapsed[:-1], elapsed)]
    # epoch times include the probe's evaluation; subtract nothing, report it separately
    Path(out).write_text(json.dumps({
        "preset": preset_name, "epochs": result.epochs, "stopped_by": result.stopped_by,
        "seconds_per_epoch_median": float(np.median(epoch_s)) if epoch_s else None,
        "best_protocol_ce": min((c["protocol_ce"] for c in curve), default=None), "curve": curve,
        "probe_notes": total, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "train_notes": int(sum(map(len, train_notes))),
    }))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="MIDI folder (default: the Bach chorales)")
    parser.add_argument("--minutes", type=float, default=5.0, help="training budget per preset")
    parser.add_argument("--sample", type=int, default=4000, help="validation notes scored after each epoch")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.data, args.minutes, args.sample, args.out)
        return 0
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for preset in ("tutorial", "default"):
            out = Path(tmp) / f"{preset}.json"
            cmd = [sys.executable, __file__, "--worker", preset, "--minutes", str(args.minutes), "--sample",
                   str(args.sample), "--out", str(out)] + (["--data", args.data] if args.data else [])
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            results[preset] = json.loads(out.read_text())
    target = results["tutorial"]["best_protocol_ce"]
    reached = next((c["elapsed_s"] for c in results["default"]["curve"] if c["protocol_ce"] <= target), None)
    print(json.dumps({
        "benchmark": "train_speed", "minutes_per_preset": args.minutes, "data": args.data or "bach",
        "tutorial": results["tutorial"], "default": results["default"],
        "tutorial_best_protocol_ce": target, "default_seconds_to_reach_it": reached,
        "tutorial_seconds_to_its_best": next(c["elapsed_s"] for c in results["tutorial"]["curve"]
                                             if c["protocol_ce"] == target),
    }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
