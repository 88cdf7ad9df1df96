"""The `improvd` command: parses arguments and hands each subcommand to the module that does the work.

Importing this module loads neither TensorFlow nor `train/` nor `export/`: the training subcommands are imported
only when they run, and when TensorFlow is missing they say which extra to install.

Threads: the main thread; `improvd run` then hands over to daemon/live/service.py.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Callable

from improvd.core.config import Config, load_config
from improvd.core.errors import ImprovdError
from improvd.core.paths import USER_CONFIG, version

log = logging.getLogger("improvd")

# subcommand -> (module, function); the function takes (args, config) and returns an exit status.
HANDLERS = {
    "run": ("improvd.daemon.live.service", "cmd_run"),
    "config": ("improvd.daemon.config_cmd", "cmd_config"),
    "ports": ("improvd.daemon.ports_cmd", "cmd_ports"),
    "generate": ("improvd.daemon.generate", "cmd_generate"),
    "train": ("improvd.train.cli", "cmd_train"),
    "eval": ("improvd.train.cli", "cmd_eval"),
    "export": ("improvd.export.cli", "cmd_export"),
}
# Subcommands that read the configuration themselves (the others get it loaded by `main`).
LOADS_OWN_CONFIG = {"config"}
NEEDS_TRAIN_EXTRA = {"train", "eval", "export"}


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="PATH", help="config file (default: ./config.toml, then "
                        "~/.config/improvd/config.toml, then built-in defaults)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a config key (repeatable), e.g. --set improvise.temperature=0")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every event (level debug)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="improvd", description="Real-time MIDI improvisation with an LSTM.")
    parser.add_argument("--version", action="version", version=f"improvd {version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="the daemon: listen on a MIDI input and answer on a MIDI output")
    _common(p)

    p = sub.add_parser("config", help="print the effective configuration (each value and where it came from), "
                       "or write the commented default config with --init")
    _common(p)
    p.add_argument("--init", nargs="?", const="", metavar="PATH",
                   help=f"write the commented default config to PATH (default: {USER_CONFIG}) and exit")
    p.add_argument("--force", action="store_true", help="with --init: overwrite an existing file")

    p = sub.add_parser("ports", help="list the MIDI input and output ports of the chosen API")
    _common(p)

    p = sub.add_parser("generate", help="continue a MIDI file with a model (no TensorFlow needed)")
    _common(p)
    p.add_argument("--model", metavar="M.onnx", help="step-format ONNX model (default: model.path)")
    p.add_argument("--prime", metavar="IN.mid", help="MIDI file to continue (default: a short phrase of its own)")
    p.add_argument("--out", metavar="OUT.mid", required=True, help="MIDI file to write")
    p.add_argument("--notes", type=int, default=64, help="notes to generate (default 64)")
    p.add_argument("--seconds", type=float, help="stop once the continuation lasts this long")
    p.add_argument("--temperature", type=float, help="0 = greedy (default: improvise.temperature)")
    p.add_argument("--top-p", type=float, help="nucleus sampling mass (default: improvise.top_p)")
    p.add_argument("--beam", type=int, default=0, metavar="K", help="beam search over pitch with K beams")
    p.add_argument("--seed", type=int, help="random seed (default: improvise.seed)")
    p.add_argument("--polyphony", metavar="N|match", help="most notes sounding at once, 0 = no bound, 'match' = the "
                   "prime's most (default: improvise.polyphony)")
    p.add_argument("--register", choices=["free", "match"], help="'match' keeps pitches within the prime's span "
                   "widened by a fourth (default: improvise.register)")
    p.add_argument("--plot", metavar="OUT.png", help="also draw a piano roll (needs matplotlib)")

    p = sub.add_parser("train", help="train a model on MIDI files (needs the train extra)")
    _common(p)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--data", metavar="DIR", help="train on every .mid/.midi below DIR")
    src.add_argument("--corpus", choices=["bach"], help="built-in corpus (default: bach)")
    p.add_argument("--preset", help="default, tutorial or tiny (default: train.preset)")
    p.add_argument("--out", metavar="RUN_DIR", help="run directory (default: a new dated folder under runs/)")
    p.add_argument("--epochs", type=int, help="at most this many epochs")
    p.add_argument("--max-minutes", type=float, help="stop after this many minutes, keeping the best model")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run")
    p.add_argument("--init", metavar="PATH", help="fine-tune: start from a trained model (a run directory, a "
                   ".keras file, a window-format .onnx, or 'shipped' for the shipped model), keeping its "
                   "architecture")
    p.add_argument("--tracks", choices=["all", "player", "improvd"], default="all",
                   help="which tracks of each file to learn from: all (default), or the player's or improvd's "
                   "track of files written by [record]")
    p.add_argument("--distributed", action="store_true",
                   help="train with tf.distribute: MultiWorkerMirroredStrategy when TF_CONFIG names several "
                        "workers (run the same command on each), else MirroredStrategy over the local GPUs")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")

    p = sub.add_parser("eval", help="score a model or a baseline on the shared protocol (needs the train extra)")
    _common(p)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--model", metavar="PATH", help="a run directory, a .keras or an .onnx file")
    what.add_argument("--baseline", choices=["markov"], help="a classical baseline fitted on the training files")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--data", metavar="DIR", help="evaluate on the MIDI files below DIR")
    src.add_argument("--corpus", choices=["bach"], help="built-in corpus (default: bach)")
    p.add_argument("--split", choices=["val", "all"], default="val", help="which files (default: val)")
    p.add_argument("--adapt", action="store_true",
                   help="also score session adaptation (improvise.adapt): each file is a session, the targets "
                   "are its second half")
    p.add_argument("--json", metavar="OUT", help="also write the report as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")

    p = sub.add_parser("export", help="convert a trained model to the step-format ONNX (needs the train extra)")
    _common(p)
    p.add_argument("source", metavar="RUN_DIR|MODEL.keras", help="a run directory or a .keras file")
    p.add_argument("--out", metavar="model.onnx", required=True, help="ONNX file to write")
    p.add_argument("--format", choices=["step", "window"], default="step",
                   help="window also writes the tutorial-shaped window model beside it")
    p.add_argument("--data", metavar="DIR", help="MIDI files for the parity check (default: the run's data)")
    return parser


def _load_handler(command: str) -> Callable[[argparse.Namespace, Config], int]:
    module_name, func_name = HANDLERS[command]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if command in NEEDS_TRAIN_EXTRA and err.name and err.name.split(".")[0] in {
                "tensorflow", "tf2onnx", "onnx", "pretty_midi", "music21", "tqdm", "matplotlib", "keras"}:
            raise ImprovdError(f"'improvd {command}' needs the training extra ({err.name} is missing): "
                               f"pip install 'improvd[train]'") from err
        raise
    return getattr(module, func_name)


def setup_logging(level: str, verbose: bool) -> None:
    logging.basicConfig(stream=sys.stderr, level=logging.DEBUG if verbose else getattr(logging, level.upper()),
                        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `improvd` console command; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        handler = _load_handler(args.command)
        if args.command in LOADS_OWN_CONFIG:
            return int(handler(args) or 0)
        config = load_config(args.config, args.overrides)
        setup_logging(config.log.level, args.verbose)
        return int(handler(args, config) or 0)
    except ImprovdError as err:
        print(f"improvd {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"improvd {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
