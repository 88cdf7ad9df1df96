"""Fine-tuning against training from scratch: both validation curves (wall time vs pitch cross-entropy) in one plot.

    python bench/finetune_plot.py --run "fine-tuned from the shipped model, 3 min" RUN_A [EVAL_A.json] \\
                                  --run "default preset from scratch, 15 min" RUN_B [EVAL_B.json] \\
                                  --out docs/finetune-ryans.png

Each run directory's `history.csv` gives the curve (its `elapsed_s` and `val_pitch_loss` per epoch: the
validation files of the run's own split); an optional `improvd eval --json` report of the model on held-out
files is printed beside it. Prints JSON (best validation cross-entropy, the time it was reached, held-out
numbers, and the held-out ratio of the first run to the second).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path


def _history(run: Path) -> list[dict]:
    with open(run / "history.csv", newline="") as fh:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(fh)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", nargs="+", action="append", required=True, metavar="LABEL RUN_DIR [EVAL.json]")
    ap.add_argument("--out", required=True, help="PNG to write")
    args = ap.parse_args(argv)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    report = []
    for item in args.run:
        if len(item) not in (2, 3):
            ap.error("--run takes LABEL RUN_DIR [EVAL.json]")
        label, run = item[0], Path(item[1])
        hist = _history(run)
        t = [h["elapsed_s"] / 60 for h in hist]
        ce = [h["val_pitch_loss"] for h in hist]
        best = min(range(len(ce)), key=ce.__getitem__)
        entry = {"label": label, "run": str(run), "epochs": len(hist), "minutes": t[-1],
                 "best_val_cross_entropy": ce[best], "best_at_minutes": t[best]}
        if len(item) == 3:
            held = json.loads(Path(item[2]).read_text())["metrics"]
            entry["heldout"] = {k: held[k] for k in ("cross_entropy", "accuracy", "notes")}
            label += f" (held-out CE {held['cross_entropy']:.3f})"
        ax.plot(t, ce, marker=".", label=label)
        report.append(entry)
    ax.set_xlabel("wall time (min)")
    ax.set_ylabel("validation pitch cross-entropy (nats/note)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=100)
    plt.close(fig)
    out = {"runs": report, "plot": args.out}
    if len(report) >= 2 and all("heldout" in r for r in report[:2]):
        out["heldout_ratio_first_to_second"] = (report[0]["heldout"]["cross_entropy"]
                                                / report[1]["heldout"]["cross_entropy"])
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
