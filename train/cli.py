"""`improvd train` and `improvd eval`: data selection, the split, the run directory and the reports.

Threads: the main thread of `improvd train` and `improvd eval`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from improvd.core.config import Config
from improvd.core.errors import ImprovdError
from improvd.train import data as td
from improvd.train.evaluate import evaluate, format_table, keras_predictor, onnx_predictor
from improvd.train.markov import evaluate_orders, transpose_sequences
from improvd.core.presets import Preset, get_preset

log = logging.getLogger(__name__)


def command_line() -> str:
    return "improvd " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def data_source(args, config: Config) -> dict:
    """{"kind": "dir", "path": ...} or {"kind": "corpus", "name": "bach"} from the arguments."""
    if getattr(args, "data", None):
        return {"kind": "dir", "path": str(Path(args.data).expanduser().resolve())}
    return {"kind": "corpus", "name": getattr(args, "corpus", None) or config.data.corpus}


def load_data(source: dict, config: Config, progress: bool, tracks: str = "all") -> td.Collection:
    """Parse (or read from the cache) every MIDI file of the source (only the tracks named `tracks` unless
    "all"; files without them are listed as skipped, with the reason)."""
    if source["kind"] == "dir":
        try:
            paths = td.find_midi_files(source["path"])
        except FileNotFoundError as err:
            raise ImprovdError(str(err)) from err
        if not paths:
            raise ImprovdError(f"no .mid or .midi files below {source['path']!r}")
    else:
        from improvd.train.corpus import bach_midi_dir
        paths = td.find_midi_files(bach_midi_dir(config.data.cache_dir, config.data.workers, progress))
    collection = td.load_collection(paths, config.data.cache_dir, config.data.workers, progress, tracks,
                                    max_bytes=config.data.cache_max_mb * 2**20)
    s = collection.summary()
    log.info("data: %d files, %d notes, %d skipped, %d from cache", s["files"], s["notes"], s["skipped"],
             s["from_cache"])
    if s["skipped"]:
        print(f"skipped {s['skipped']} file(s):", file=sys.stderr)
        for item in s["skipped_files"]:
            print(f"  {item['path']}: {item['reason']}", file=sys.stderr)
    if not collection.files:
        raise ImprovdError("no usable MIDI file: nothing to train on or evaluate")
    return collection


def split_by_hashes(collection: td.Collection, split: dict) -> td.Split | None:
    """The split recorded in a run (by content hash), applied to this collection; None if it does not fit."""
    val_hashes = set(split.get("val_sha256", []))
    if not val_hashes:
        return None
    val = [i for i, f in enumerate(collection.files) if f.sha256 in val_hashes]
    if not val:
        return None
    train = [i for i, f in enumerate(collection.files) if f.sha256 not in val_hashes]
    return td.Split(train=train, val=val, groups=split.get("melody_groups", 0),
                    grouped_files=split.get("files_sharing_a_melody", 0))


def split_json(collection: td.Collection, split: td.Split, config: Config) -> dict:
    files = collection.files
    out = split.to_json(files)
    out.update({
        "seed": config.data.seed, "val_fraction": config.data.val_fraction,
        "group_melodies": config.data.group_melodies,
        "train_sha256": [files[i].sha256 for i in split.train], "val_sha256": [files[i].sha256 for i in split.val],
        "leakage_16_note_runs": td.leakage(collection.note_set().subset(split.train),
                                           collection.note_set().subset(split.val)),
    })
    return out


def make_split(collection: td.Collection, config: Config) -> td.Split:
    split = td.split_files(collection.files, config.data.val_fraction, config.data.seed,
                           config.data.group_melodies, collection.note_set())
    if not split.val or not split.train:
        raise ImprovdError(f"{len(collection.files)} usable file(s) cannot be split into training and validation; "
                           f"give at least 2")
    return split


def new_run_dir(config: Config, preset_name: str) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path(config.train.runs_dir).expanduser()
    run = base / f"{stamp}-{preset_name}"
    n = 1
    while run.exists():
        n += 1
        run = base / f"{stamp}-{preset_name}-{n}"
    return run


def apply_overrides(preset, config: Config):
    """The preset with the `[train]` recipe overrides that are set (units, learning_rate, seq_length)."""
    changes = {}
    if config.train.units:
        changes["units"] = tuple(config.train.units)
    if config.train.learning_rate:
        changes["learning_rate"] = config.train.learning_rate
    if config.train.seq_length:
        changes["seq_length"] = config.train.seq_length
    return dataclasses.replace(preset, **changes) if changes else preset


def cmd_train(args, config: Config) -> int:
    """`improvd train`: parse, split, fit, evaluate, write the run directory.

    With `--distributed`, every worker runs this same command: each parses the data itself (the split is
    deterministic, so they agree), they train in lockstep under `tf.distribute`, and only the chief writes the
    run directory and evaluates.
    """
    from improvd.train.fit import fit, write_json

    progress = not args.no_progress
    cluster = None
    if getattr(args, "distributed", False):
        from improvd.train.distribute import read_tf_config
        try:
            cluster = read_tf_config()
        except ValueError as err:
            raise ImprovdError(str(err)) from err
    chief = cluster is None or cluster.is_chief
    init = None
    saved_init = None  # on --resume: what the interrupted run started from
    tracks = getattr(args, "tracks", "all") or "all"
    if args.resume and getattr(args, "init", None):
        raise ImprovdError(f"--init {args.init!r} with --resume: a resumed run goes on from its own last.keras "
                           f"(its config.json records what it started from); give one of them")
    if args.resume:
        run_dir = Path(args.resume)
        if not (run_dir / "config.json").is_file():
            raise ImprovdError(f"--resume {str(run_dir)!r}: no config.json there (on a multi-worker run, every "
                               f"worker needs the chief's run directory at the same path)")
        saved = json.loads((run_dir / "config.json").read_text())
        preset = Preset(**{k: tuple(v) if isinstance(v, list) else v for k, v in saved["preset"].items()})
        source = saved["data_source"]
        tracks = saved.get("tracks", "all")
        saved_init = saved.get("init")
        split_info = json.loads((run_dir / "split.json").read_text())
    else:
        try:
            preset = get_preset(args.preset or config.train.preset)
        except ValueError as err:
            raise ImprovdError(str(err)) from err
        if getattr(args, "init", None):
            from improvd.train.init import load_init
            init = load_init(args.init, get_preset(args.preset) if args.preset else None)
            preset = init.preset
            print(f"fine-tuning from {init.info['path']} ({init.info['how']}, {init.info['parameters']} "
                  f"parameters, units {list(preset.units)})", file=sys.stderr)
        run_dir = Path(args.out) if args.out else new_run_dir(config, preset.name)
        source = data_source(args, config)
        split_info = None
    if init is not None and config.train.units and tuple(config.train.units) != tuple(preset.units):
        raise ImprovdError(f"train.units = {list(config.train.units)} but --init {args.init!r} has units "
                           f"{list(preset.units)}: fine-tuning keeps the starting model's architecture")
    preset = apply_overrides(preset, config)
    epochs = args.epochs or config.train.epochs or preset.epochs
    max_minutes = args.max_minutes if args.max_minutes is not None else config.train.max_minutes
    batch_size = config.train.batch_size or preset.batch_size
    if chief:
        run_dir.mkdir(parents=True, exist_ok=True)

    collection = load_data(source, config, progress and chief, tracks)
    split = split_by_hashes(collection, split_info) if split_info else None
    if split is None:
        split = make_split(collection, config)
        split_info = split_json(collection, split, config)
    notes = collection.note_set()
    train_notes, val_notes = notes.subset(split.train), notes.subset(split.val)

    strategy = None
    if cluster is not None:
        from improvd.train.distribute import make_strategy
        strategy = make_strategy(cluster)  # after parsing: its worker processes fork before TensorFlow starts
    replicas = strategy.num_replicas_in_sync if strategy is not None else 1
    if tracks != "all":
        print(f"tracks: {tracks!r} only ({len(collection.files)} file(s) have one)", file=sys.stderr)
    print(f"training {preset.name} on {len(train_notes)} files ({train_notes.num_notes} notes), validating "
          f"on {len(val_notes)} ({val_notes.num_notes} notes); batch {batch_size} × {replicas} replica(s); "
          + (f"run directory {run_dir}" if chief else f"worker {cluster.task_index}: the chief writes the run "
             f"directory"), file=sys.stderr)
    if chief:
        write_json(run_dir / "split.json", split_info)
        write_json(run_dir / "config.json", {
            "preset": preset.to_dict(), "data_source": source, "config": config.to_dict(),
            "epochs": epochs, "max_minutes": max_minutes, "batch_size": batch_size, "command": command_line(),
            "init": init.info if init is not None else saved_init, "tracks": tracks,
            "distributed": None if cluster is None else {"workers": cluster.workers, "replicas": replicas}})

    result = fit(run_dir, preset, train_notes, val_notes, epochs=epochs, max_minutes=max_minutes,
                 batch_size=batch_size, seed=config.train.seed, resume=bool(args.resume), progress=progress,
                 init_weights=init.model.get_weights() if init is not None else None,
                 strategy=strategy, is_chief=chief, mixed_precision=config.train.mixed_precision)
    if cluster is not None:
        print(f"{cluster.task_type or 'worker'} {cluster.task_index}: trained weights sha256 "
              f"{result.weights_sha256}", file=sys.stderr)
    if not chief:
        _leave_together(strategy)
        print(f"worker {cluster.task_index}: {result.epochs} epochs, stopped by {result.stopped_by}",
              file=sys.stderr)
        return 130 if result.stopped_by == "interrupted" else 0
    try:
        started = time.monotonic()
        try:
            val_metrics = evaluate(keras_predictor(result.model), val_notes, config.eval.context,
                                   config.eval.batch_size, progress)
        except ValueError as err:  # validation files shorter than the protocol's context (short recordings)
            log.warning("no validation metrics: %s", err)
            val_metrics = None
        eval_seconds = time.monotonic() - started
        metrics = {
            "preset": preset.name, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": command_line(), "data_source": source, "data": collection.summary(),
            "split": {k: split_info[k] for k in ("seed", "val_fraction", "melody_groups",
                                                 "files_sharing_a_melody", "leakage_16_note_runs")}
            | {"train_files": len(split.train), "val_files": len(split.val)},
            "training": {"epochs": result.epochs, "best_epoch": result.best_epoch, "seconds": result.seconds,
                         "stopped_by": result.stopped_by, "monitor": preset.monitor,
                         "replicas": result.replicas, "global_batch": result.global_batch,
                         "mixed_precision": config.train.mixed_precision},
            "val": val_metrics, "eval_seconds": eval_seconds,
            "parameters": int(result.model.count_params()),
            "init": init.info if init is not None else saved_init, "tracks": tracks,
        }
        write_json(run_dir / "metrics.json", metrics)
        if result.history:
            from improvd.train.plots import plot_curves  # matplotlib loads only when there is something to draw
            plot_curves(result.history, run_dir / "curves.png", f"improvd {preset.name}: {run_dir.name}")
    finally:
        if cluster is not None:
            _leave_together(strategy)
    if val_metrics is not None:
        print(format_table([(f"{preset.name} (val)", val_metrics)]))
    print(f"run directory: {run_dir} ({result.epochs} epochs, best {result.best_epoch}, "
          f"{result.seconds / 60:.1f} min, stopped by {result.stopped_by})")
    return 130 if result.stopped_by == "interrupted" else 0


def _leave_together(strategy) -> None:
    """A last all-reduce: the workers wait for the chief to finish writing before they exit, so none of them
    sees a peer vanish while it still works."""
    from improvd.train.distribute import agree_any
    agree_any(strategy, False)


# --- eval -----------------------------------------------------------------------------------------------------

def _model_split(path: Path) -> dict | None:
    """The split a model was trained with: its run's split.json, or the val hashes in an ONNX card."""
    run_dir = path if path.is_dir() else path.parent
    if (run_dir / "split.json").exists():
        return json.loads((run_dir / "split.json").read_text())
    if path.suffix == ".onnx":
        from improvd.daemon.predict.model import StepModel
        card = StepModel(str(path)).card
        return card.get("split") if isinstance(card.get("split"), dict) else None
    return None


def load_predictor(path: Path, config: Config):
    """(name, predictor) for a run directory, a .keras file or an .onnx file."""
    if path.is_dir():
        path = path / "model.keras"
    if not path.exists():
        raise ImprovdError(f"model {str(path)!r} does not exist")
    if path.suffix == ".onnx":
        from improvd.daemon.predict.model import StepModel
        return path.name, onnx_predictor(StepModel(str(path), threads=max(1, config.model.threads)))
    if path.suffix == ".keras":
        from improvd.train.model import load_keras
        return path.name, keras_predictor(load_keras(path))
    raise ImprovdError(f"model {str(path)!r}: expected a run directory, a .keras or an .onnx file")


def markov_report(train_notes, eval_notes, context: int, transpose: int) -> dict:
    """The Markov baseline, plain and trained on the LSTM's transpositions, each at its best order."""
    pitches = lambda files: [f[:, 0].astype(np.int64) for f in files]  # noqa: E731
    train_p, eval_p = pitches(train_notes), pitches(eval_notes)
    plain = evaluate_orders(train_p, eval_p, context=context)
    shifted = evaluate_orders(transpose_sequences(train_p, range(-transpose, transpose + 1)), eval_p,
                              context=context)
    return {"plain": plain, "transposed": shifted, "transpose": transpose}


def cmd_eval(args, config: Config) -> int:
    """`improvd eval`: one protocol for every model and for the Markov baseline."""
    progress = not args.no_progress
    source = data_source(args, config)
    collection = load_data(source, config, progress)
    files = collection.files
    if args.split == "all":
        eval_idx, train_idx = list(range(len(files))), None
    else:
        split = None
        if args.model:
            recorded = _model_split(Path(args.model))
            split = split_by_hashes(collection, recorded) if recorded else None
            if recorded and split is None:
                log.warning("the model's validation files are not in this data: splitting it afresh")
        split = split or make_split(collection, config)
        eval_idx, train_idx = split.val, split.train
    eval_notes = collection.note_set().subset(eval_idx)
    context = config.eval.context
    report: dict = {"data_source": source, "split": args.split, "files": len(eval_notes), "context": context}
    rows = []
    if args.model and getattr(args, "adapt", False):
        from improvd.train.evaluate import evaluate_adapted
        name, predictor = load_predictor(Path(args.model), config)
        memory = config.improvise.adapt_memory
        try:
            result = evaluate_adapted(predictor, eval_notes, context, memory, config.eval.batch_size, progress)
        except ValueError as err:
            raise ImprovdError(str(err)) from err
        report.update({"model": str(args.model), "protocol": "session (second half of each file)",
                       "cross_entropy": result["cross_entropy"], "accuracy": result["accuracy"],
                       "step_mae_s": result["step_mae_s"], "duration_mae_s": result["duration_mae_s"],
                       "notes": result["notes"], "sessions": result["files"], "adapted": result["adapted"],
                       "per_file": result["per_file"]})
        print(f"session protocol on {result['files']} file(s), {result['notes']} target notes (second halves), "
              f"memory {memory} notes")
        print(f"{'':<12} {'pitch CE':>9} {'top-1':>7} {'step MAE':>9} {'dur MAE':>9}")
        for name, m in (("model", result), ("adapted", result["adapted"])):
            print(f"{name:<12} {m['cross_entropy']:>9.4f} {m['accuracy']:>7.3f} {m['step_mae_s']:>9.4f} "
                  f"{m['duration_mae_s']:>9.4f}")
        ad = result["adapted"]
        print(f"adapted / model: pitch CE {ad['ratio']:.3f}, step MAE {ad['step_ratio'] or float('nan'):.3f}, "
              f"duration MAE {ad['duration_ratio'] or float('nan'):.3f}")
        if args.json:
            from improvd.train.fit import write_json
            write_json(Path(args.json), report)
        return 0
    if getattr(args, "adapt", False):
        raise ImprovdError("--adapt scores a model with and without session adaptation: give --model")
    if args.model:
        name, predictor = load_predictor(Path(args.model), config)
        report["model"] = str(args.model)
        report["metrics"] = evaluate(predictor, eval_notes, context, config.eval.batch_size, progress)
        rows.append((name, report["metrics"]))
    else:
        if train_idx is None:
            raise ImprovdError("--baseline markov is fitted on the training files: use --split val")
        transpose = get_preset(config.train.preset).transpose
        started = time.monotonic()
        report["markov"] = markov_report([files[i].notes for i in train_idx], eval_notes, context, transpose)
        report["seconds"] = time.monotonic() - started
        for variant in ("plain", "transposed"):
            m = report["markov"][variant]
            rows.append((f"markov {variant} (KN, best order {m['best_order']})",
                         {**m, "step_mae_s": None, "duration_mae_s": None}))
    print(format_table(rows))
    if args.json:
        from improvd.train.fit import write_json
        write_json(Path(args.json), report)
    return 0
