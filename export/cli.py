"""`improvd export`: a run directory or a .keras file → step-format ONNX with its card, checked for parity.

Threads: the main thread of `improvd export`.
"""

from __future__ import annotations

import json
import logging
import time
from datetime import datetime, timezone
from pathlib import Path

from improvd.core.config import Config
from improvd.core.errors import ImprovdError
from improvd.export import onnx as ex
from improvd.export.parity import check, random_windows, real_windows

log = logging.getLogger(__name__)
PARITY_WINDOWS = 256


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def build_card(run_dir: Path | None, model_path: Path, command: str) -> dict:
    """The model card: data, split, metrics, creation time and the commands that made it."""
    card: dict = {"created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "export_command": command,
                  "source_model": model_path.name}
    if run_dir is None:
        return card
    metrics, split, cfg = (_read_json(run_dir / name) for name in ("metrics.json", "split.json", "config.json"))
    if metrics:
        card.update({"preset": metrics.get("preset"), "train_command": metrics.get("command"),
                     "trained": metrics.get("created"), "training": metrics.get("training"),
                     "parameters": metrics.get("parameters"), "metrics": {"val": metrics.get("val")},
                     "data": {"source": metrics.get("data_source"), "files": metrics["data"]["files"],
                              "notes": metrics["data"]["notes"], "skipped": metrics["data"]["skipped"]}})
    if split:
        card["split"] = {k: split.get(k) for k in ("seed", "val_fraction", "group_melodies", "melody_groups",
                                                     "files_sharing_a_melody", "leakage_16_note_runs",
                                                     "val_sha256")}
    if cfg:
        card["context"] = cfg.get("config", {}).get("eval", {}).get("context")
    return card


def _validation_notes(run_dir: Path | None, data_dir: str | None, config: Config) -> list:
    """Notes of the run's validation files (or of every file under --data); [] when there is no data."""
    from improvd.train.cli import load_data, split_by_hashes
    if data_dir:
        return [f.notes for f in load_data({"kind": "dir", "path": data_dir}, config, False).files]
    cfg, split = (_read_json(run_dir / n) for n in ("config.json", "split.json")) if run_dir else ({}, {})
    if not cfg.get("data_source") or not split:
        return []
    collection = load_data(cfg["data_source"], config, False)
    chosen = split_by_hashes(collection, split)
    return [collection.files[i].notes for i in chosen.val] if chosen else []


def cmd_export(args, config: Config) -> int:
    from improvd.train.cli import command_line
    from improvd.train.model import load_keras

    source = Path(args.source)
    run_dir = source if source.is_dir() else (source.parent if (source.parent / "metrics.json").exists() else None)
    model_path = source / "model.keras" if source.is_dir() else source
    if not model_path.exists():
        raise ImprovdError(f"{str(model_path)!r} does not exist; expected a run directory or a .keras file")
    try:
        model = load_keras(model_path)
        context = (_read_json(run_dir / "config.json").get("preset", {}).get("context") if run_dir else None)
        spec = ex.spec_of(model, context)
    except (ValueError, TypeError, OSError) as err:
        raise ImprovdError(f"cannot export {str(model_path)!r}: {err}") from err
    card = build_card(run_dir, model_path, command_line())
    card["context"] = spec.context
    out = Path(args.out)
    window_out = out.with_name(out.stem + ".window.onnx") if args.format == "window" else None
    started = time.monotonic()
    ex.export_step(model, spec, card, out)
    if window_out:
        ex.export_window(model, spec, card, window_out)
    seconds = time.monotonic() - started
    val = _validation_notes(run_dir, args.data, config)
    windows = {"validation": real_windows(val, PARITY_WINDOWS, spec.context),
               "random": random_windows(PARITY_WINDOWS, spec.context)}
    if not val:
        log.warning("no validation data known for this model (give --data DIR): parity on random windows only")
    report = check(model, out, windows, window_out)
    print(report.format())
    if not report.ok:
        for path in (out, window_out):
            if path:
                path.unlink(missing_ok=True)
        raise ImprovdError("parity check failed: the ONNX model does not match the Keras model; nothing written")
    size = out.stat().st_size
    print(f"wrote {out} ({size / 1e6:.2f} MB, step format, features {','.join(spec.features)}, "
          f"state {spec.state_size}, context {spec.context}; converted in {seconds:.1f} s)"
          + (f" and {window_out}" if window_out else ""))
    return 0
