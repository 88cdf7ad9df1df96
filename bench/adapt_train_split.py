"""The session protocol (`improvd eval --adapt`) on files of the model's TRAINING split: where the adapter's
constants are chosen (daemon/predict/adapt.py), never on evaluation files. Prints JSON.

    .venv/bin/python bench/adapt_train_split.py [--model models/bach.onnx] [--files 60] [--seed 0]

Picks `--files` files at random (seeded) among the training files recorded in the model's card (the chorales for
the shipped model) and reports pitch cross-entropy and step and duration MAE without and with adaptation, with
the share of files that adaptation made worse.
"""

from __future__ import annotations

import argparse
import json
import sys
import types
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> int:
    from improvd.core.config import Config
    from improvd.train import cli
    from improvd.train.evaluate import evaluate_adapted

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/bach.onnx")
    parser.add_argument("--files", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    config = Config()
    collection = cli.load_data(cli.data_source(types.SimpleNamespace(data=None), config), config, False)
    recorded = cli._model_split(Path(args.model))
    split = cli.split_by_hashes(collection, recorded) if recorded else None
    if split is None:
        print(f"{args.model} records no training split that matches the data", file=sys.stderr)
        return 2
    rng = np.random.default_rng(args.seed)
    chosen = sorted(rng.choice(split.train, min(args.files, len(split.train)), replace=False).tolist())
    _, predictor = cli.load_predictor(Path(args.model), config)
    r = evaluate_adapted(predictor, collection.note_set().subset(chosen), config.eval.context,
                         config.improvise.adapt_memory, config.eval.batch_size, False)
    worse = {key: float(np.mean([f[f"adapted_{key}"] > f[key] for f in r["per_file"]]))
             for key in ("cross_entropy", "step_mae_s", "duration_mae_s")}
    print(json.dumps({"benchmark": "adapt_train_split", "model": args.model, "files": r["files"], "notes": r["notes"],
                      "cross_entropy": r["cross_entropy"], "step_mae_s": r["step_mae_s"],
                      "duration_mae_s": r["duration_mae_s"],
                      "adapted": {k: r["adapted"][k] for k in ("cross_entropy", "step_mae_s", "duration_mae_s",
                                                               "ratio", "step_ratio", "duration_ratio")},
                      "share_of_files_worse": worse}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
