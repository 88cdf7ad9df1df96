"""Choosing the fine-tuning recipe on a development set: fine-tune with preset overrides, score held-out files.

    python bench/corpus_midi.py ryansMammoth /tmp/dev --count 80 --split 40 --seed 1 --exclude /tmp/ryans
    python bench/finetune_recipe.py NAME '{"learning_rate": 0.004, "warmup_steps": 10}' --data /tmp/dev \\
        --epochs 28 --out /tmp/dev-runs

Does what `improvd train --data DATA/train --init shipped` does (same split of DATA/train, seed and fit), but
with the fine-tuning fields of the preset given as JSON (any `core.presets.Preset` field, plus `batch_size`),
replacing `--init`'s own recipe (`train.init.FINETUNE`) wholly: `{}` is the plain preset's recipe. `--epochs`
bounds the run by epochs instead of wall time, so that variants compare on the same number of steps on a shared
machine. Then scores the result on DATA/heldout with `improvd eval`'s protocol. Prints JSON (and appends it to
OUT/results.jsonl): epochs, seconds, best validation pitch cross-entropy, held-out cross-entropy and top-1, and
/proc/loadavg before and after.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path


def _load() -> list[str]:
    try:
        return Path("/proc/loadavg").read_text().split()[:3]
    except OSError:
        return []


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("name", help="the variant's name (its run directory below --out)")
    ap.add_argument("overrides", help="preset fields as JSON, e.g. '{\"average\": 0.9}'")
    ap.add_argument("--data", required=True, help="a folder with train/ and heldout/ (bench/corpus_midi.py --split)")
    ap.add_argument("--init", default="shipped", help="the starting model (as for improvd train --init)")
    ap.add_argument("--epochs", type=int, default=28)
    ap.add_argument("--minutes", type=float, default=0.0, help="a wall-time bound instead (0 = none)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)

    from improvd.core.config import Config
    from improvd.train import cli
    from improvd.train.evaluate import evaluate, keras_predictor
    from improvd.train.fit import fit, write_json
    from improvd.train.init import FINETUNE, load_init
    from improvd.core.presets import get_preset

    overrides = json.loads(args.overrides)
    data, out = Path(args.data), Path(args.out) / args.name
    config = Config()
    load_before = _load()
    collection = cli.load_data({"kind": "dir", "path": str(data / "train")}, config, False)
    split = cli.make_split(collection, config)
    notes = collection.note_set()
    init = load_init(args.init, None)
    named = get_preset(init.preset.name)  # the recipe before --init's own changes
    undo = {k: getattr(named, k) for k in FINETUNE}
    batch = overrides.pop("batch_size", None)
    preset = dataclasses.replace(init.preset, **{**undo, "epochs": args.epochs, **overrides})
    out.mkdir(parents=True, exist_ok=True)
    result = fit(out, preset, notes.subset(split.train), notes.subset(split.val), epochs=preset.epochs,
                 max_minutes=args.minutes, batch_size=batch or preset.batch_size, seed=config.train.seed,
                 progress=False, init_weights=init.model.get_weights())
    load_after = _load()
    held = cli.load_data({"kind": "dir", "path": str(data / "heldout")}, config, False)
    metrics = evaluate(keras_predictor(result.model), held.note_set(), config.eval.context,
                       config.eval.batch_size, False)
    report = {"name": args.name, "overrides": json.loads(args.overrides), "epochs": result.epochs,
              "best_epoch": result.best_epoch, "seconds": result.seconds, "stopped_by": result.stopped_by,
              "best_val_pitch": min(h["val_pitch_loss"] for h in result.history),
              "heldout_cross_entropy": metrics["cross_entropy"], "heldout_top1": metrics["accuracy"],
              "heldout_notes": metrics["notes"], "load_before": load_before, "load_after": load_after}
    write_json(out / "result.json", report)
    with open(Path(args.out) / "results.jsonl", "a") as fh:
        fh.write(json.dumps(report) + "\n")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
