"""Loading a model for play, and a reload: the config file read again and its model built beside the running ones.

`load_model` loads, checks and warms up a step model (start-up and every reload). `reload_config` reads the config
file again (with the same `--set` overrides) and loads its model; the service hands both to the engine, which
swaps them in between phrases (`Engine.request_swap`). A reload that fails keeps the running config and model and
logs why.
[midi], [record] and [osc] are read at start only: the running ones are kept (ports and the recording are not
reopened), and a change to them is logged as taking effect at the next start.

Threads: `load_model` runs on the main thread at start-up; `reload_config` on the reload thread ("improvd-reload",
started by the service's main loop on SIGHUP or the `control.reload` CC), so that a slow model load never delays a
stop.
"""

from __future__ import annotations

import logging
from typing import Callable

from improvd.core.config import Config, load_config
from improvd.core.errors import ImprovdError, ModelError

log = logging.getLogger("improvd")


def load_model(config: Config):
    """Load, check and warm up the model: a model whose outputs are not finite is refused; the first inference of
    a session and the first decode pay for allocations and lazy imports (tens of ms), which must not fall on the
    first note of the first answer. Raises ModelError (an ImprovdError) naming what is wrong."""
    import numpy as np

    from improvd.daemon.predict.improviser import Decoding, Improviser
    from improvd.daemon.predict.model import StepModel  # onnxruntime is imported with it

    model = StepModel(config.model.path, threads=config.model.threads)
    bad = model.nonfinite_outputs()
    if bad:
        raise ModelError(f"model {str(model.path)!r} gives non-finite outputs (NaN or infinity) in "
                         f"{', '.join(bad)} for one note from the zero state: it cannot be played (was it exported "
                         f"from a diverged training run?)")
    improviser = Improviser(model, Decoding.from_config(config.improvise), rng=np.random.default_rng(0))
    for _ in range(2):
        improviser.feed(np.array([60.0, 0.25, 0.25, 90.0]))
        improviser.predict()
    return model


def reload_config(config: Config, overrides: list[str], *,
                  load: Callable[[Config], object] = load_model) -> tuple[Config, object] | None:
    """Reload thread: read `config.source` again with `overrides` and load its model with `load`. Returns the
    config to run (the running [midi], [record] and [osc] kept) and its model, for `Engine.request_swap`; None
    when the reload failed (logged)."""
    log.info("reloading %s", config.source or "(built-in defaults)")
    try:
        new_config = load_config(config.source, overrides)
        new_model = load(new_config)
    except ImprovdError as err:
        log.error("reload failed, improvd keeps the running config and model: %s", err)
        return None
    except Exception as err:  # a reload must never take the running daemon down
        log.error("reload failed, improvd keeps the running config and model: %s: %s", type(err).__name__, err)
        return None
    if new_config.midi != config.midi or new_config.record != config.record or new_config.osc != config.osc:
        log.warning("changes to [midi], [record] and [osc] take effect when improvd restarts")
    return new_config.replace(midi=config.midi, record=config.record, osc=config.osc), new_model
