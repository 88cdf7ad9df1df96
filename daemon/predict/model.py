"""The step-format ONNX model (docs/model-format.md), loaded and checked with onnxruntime.

`StepModel` is the only place the daemon touches onnxruntime. It checks the file at load time (format tag, inputs,
outputs, metadata) and raises `ModelError` naming what is wrong, so a bad model fails at start-up or keeps the old
one on reload. `run` feeds one note per row and returns a `Prediction`; non-finite outputs (a model gone wrong)
are replaced by safe values and logged once per model, so the live loop never plays NaN.

Threads: a `StepModel` is built by the main thread (start-up, reload) and then used by one thread at a time (the
engine thread, or `improvd generate`).
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from improvd.core.errors import ModelError
from improvd.core.modelformat import META_CARD, META_CONTEXT, META_FEATURES, META_FORMAT, STEP_FORMAT, VALID_FEATURES
from improvd.core.notes import NUM_PITCHES

log = logging.getLogger("improvd.model")

REQUIRED_OUTPUTS = ("pitch_logits", "step", "duration", "state_out")
# The most notes of context (`improvd.context`) a model may declare. Every C notes the improviser re-primes: it
# replays the last C notes from the zero state in one go, inside the engine's hand-off, which must fit within the
# 50 ms a note is handed ahead of its onset (Engine lookahead_s); the shipped model's step costs ~100 us on an idle
# core (~250-350 us measured on a shared, loaded one), so 256 steps are ~25 ms there. Each handed note's snapshot
# also copies the last C notes. improvd's presets use 25.
MAX_CONTEXT = 256
# Safe stand-ins for non-finite outputs: the decoder clamps step and duration up to their configured lower bounds.
SAFE_STEP_S = 0.0
SAFE_DURATION_S = 0.0
SAFE_VELOCITY = 64.0


@dataclass(frozen=True)
class Prediction:
    """The model's outputs after one note: what it predicts for the next one.

    Attributes:
        pitch_logits: float32 [N, 128], logits of the next pitch.
        step: float32 [N], the next note's step in seconds (not clamped).
        duration: float32 [N], the next note's duration in seconds (not clamped).
        velocity: float32 [N], the next note's velocity (0..127), or None when the model has no velocity output.
        state: float32 [N, S], the recurrent state after the note that was fed.
    """

    pitch_logits: np.ndarray
    step: np.ndarray
    duration: np.ndarray
    velocity: np.ndarray | None
    state: np.ndarray


def _dims(value_info) -> list:
    return list(value_info.shape) if value_info.shape is not None else []


class StepModel:
    """A step-format ONNX model: one note in, the next note's distribution and the new state out.

    Args:
        path: the .onnx file.
        threads: onnxruntime intra-op threads (`model.threads`; 1 is best for one note at a time).

    Raises:
        ModelError: the file is missing, is not ONNX, or is not a valid step-format model (the message says what
            is wrong and what was expected).
    """

    def __init__(self, path: str | os.PathLike, threads: int = 1):
        import onnxruntime as ort  # imported here so that importing the daemon stays light

        self._path = Path(path)
        if not self._path.is_file():
            what = "is a directory" if self._path.is_dir() else "does not exist"
            raise ModelError(f"model file {str(self._path)!r} {what}")
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.log_severity_level = 3  # errors only: ORT's graph-optimisation notes are not the user's concern
        # Idle spinning worker threads would burn a core between notes; we run one small step at a time.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self._session = ort.InferenceSession(str(self._path), sess_options=options,
                                                 providers=["CPUExecutionProvider"])
        except Exception as err:  # onnxruntime raises its own (pybind) exception types for unreadable files
            raise ModelError(f"model file {str(self._path)!r} is not a loadable ONNX model: "
                             f"{str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__}"
                             ) from err
        self._warned_nonfinite = False
        self._check_and_read_metadata()
        self._check_io()

    # ---- validation -------------------------------------------------------------------------------------
    def _fail(self, what: str) -> ModelError:
        return ModelError(f"model {str(self._path)!r} is not a step-format model ({STEP_FORMAT}): {what}")

    def _check_and_read_metadata(self) -> None:
        meta = dict(self._session.get_modelmeta().custom_metadata_map)
        tag = meta.get(META_FORMAT)
        if tag != STEP_FORMAT:
            found = "no improvd.format metadata" if tag is None else f"improvd.format = {tag!r}"
            raise self._fail(f"{found}, expected {STEP_FORMAT!r} (export it with `improvd export`)")
        features = tuple(name.strip() for name in meta.get(META_FEATURES, "").split(",") if name.strip())
        if features not in VALID_FEATURES:
            allowed = " or ".join(repr(",".join(v)) for v in VALID_FEATURES)
            raise self._fail(f"improvd.features = {meta.get(META_FEATURES)!r}, expected {allowed}")
        self._features = features
        raw_context = meta.get(META_CONTEXT)
        try:
            context = int(raw_context)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise self._fail(f"improvd.context = {raw_context!r}, expected a positive integer") from None
        if not 1 <= context <= MAX_CONTEXT:
            raise self._fail(f"improvd.context = {raw_context!r}, expected a positive integer at most {MAX_CONTEXT} "
                             f"(re-priming replays that many notes in one go while improvd plays)")
        self._context = context
        raw_card = meta.get(META_CARD)
        if raw_card is None:
            self._card: dict = {}
        else:
            try:
                card = json.loads(raw_card)
            except json.JSONDecodeError as err:
                raise self._fail(f"improvd.card is not valid JSON ({err})") from err
            if not isinstance(card, dict):
                raise self._fail(f"improvd.card must be a JSON object, got {type(card).__name__}")
            self._card = card

    def _check_io(self) -> None:
        inputs = {i.name: i for i in self._session.get_inputs()}
        outputs = {o.name: o for o in self._session.get_outputs()}
        if set(inputs) != {"note", "state"}:
            raise self._fail(f"inputs are {sorted(inputs)}, expected exactly 'note' [N, F] and 'state' [N, S]")
        for name in ("note", "state"):
            if inputs[name].type != "tensor(float)":
                raise self._fail(f"input {name!r} has type {inputs[name].type}, expected float32")
            if len(_dims(inputs[name])) != 2:
                raise self._fail(f"input {name!r} has shape {_dims(inputs[name])}, expected [N, F] / [N, S]")
        f_dim = _dims(inputs["note"])[1]
        if f_dim != len(self._features):
            raise self._fail(f"input 'note' has {f_dim!r} features but improvd.features lists "
                             f"{len(self._features)} ({','.join(self._features)})")
        s_dim = _dims(inputs["state"])[1]
        if not isinstance(s_dim, int) or s_dim < 1:
            raise self._fail(f"input 'state' has size {s_dim!r}, expected a fixed positive integer")
        self._state_size = s_dim
        missing = [name for name in REQUIRED_OUTPUTS if name not in outputs]
        if len(self._features) == 4 and "velocity" not in outputs:
            missing.append("velocity")
        if missing:
            raise self._fail(f"outputs {missing} are missing (it has {sorted(outputs)}); expected "
                             f"{', '.join(REQUIRED_OUTPUTS)} and, when F = 4, velocity")
        logits_dims = _dims(outputs["pitch_logits"])
        if len(logits_dims) != 2 or isinstance(logits_dims[1], int) and logits_dims[1] != NUM_PITCHES:
            raise self._fail(f"output 'pitch_logits' has shape {logits_dims}, expected [N, {NUM_PITCHES}]")
        self._has_velocity = "velocity" in outputs
        self._output_names = list(REQUIRED_OUTPUTS) + (["velocity"] if self._has_velocity else [])
        self._output_index = [self._output_names.index(n) for n in ("pitch_logits", "step", "duration", "state_out")]
        self._velocity_index = self._output_names.index("velocity") if self._has_velocity else None
        # One trial step catches shape errors the declared types do not show (e.g. a state of the wrong size).
        try:
            trial = self._session.run(self._output_names, {"note": np.zeros((1, self.num_features), np.float32),
                                                           "state": self.zero_state(1)})
        except Exception as err:
            raise self._fail(f"a trial step failed: {err}") from err
        shapes = {name: np.shape(value) for name, value in zip(self._output_names, trial)}
        expected = {"pitch_logits": (1, NUM_PITCHES), "step": (1,), "duration": (1,), "velocity": (1,),
                    "state_out": (1, self._state_size)}
        for name, shape in shapes.items():
            if shape != expected[name]:
                raise self._fail(f"output {name!r} has shape {list(shape)} for one note, "
                                 f"expected {list(expected[name])}")

    # ---- properties --------------------------------------------------------------------------------------
    @property
    def path(self) -> Path:
        """The model file."""
        return self._path

    @property
    def features(self) -> tuple[str, ...]:
        """Feature names of the `note` input, from `improvd.features`."""
        return self._features

    @property
    def num_features(self) -> int:
        """F, the width of the `note` input (3 or 4)."""
        return len(self._features)

    @property
    def state_size(self) -> int:
        """S, the width of the `state` input."""
        return self._state_size

    @property
    def context(self) -> int:
        """Notes of context the model was trained and evaluated with (`improvd.context`)."""
        return self._context

    @property
    def card(self) -> dict:
        """The model card (`improvd.card` JSON); {} when the model has none."""
        return self._card

    @property
    def has_velocity(self) -> bool:
        """Whether the model predicts velocity."""
        return self._has_velocity

    # ---- running -----------------------------------------------------------------------------------------
    def zero_state(self, n: int = 1) -> np.ndarray:
        """The state that starts a sequence: float32 zeros [n, S]."""
        return np.zeros((n, self._state_size), dtype=np.float32)

    def run(self, note: np.ndarray, state: np.ndarray) -> Prediction:
        """Feed one note per row and return the prediction for the next one.

        Args:
            note: [N, F] notes in raw units (pitch, step s, duration s[, velocity]); extra columns are ignored.
            state: [N, S] the state before these notes (`zero_state(N)` starts a sequence).

        Returns:
            The `Prediction`; non-finite values are replaced (uniform logits, step and duration 0 so the
            decoder clamps them to their lower bounds, velocity 64, state zeros) and logged once per model.
        """
        if type(note) is not np.ndarray or note.dtype != np.float32 or note.shape[1:] != (self.num_features,):
            note = np.ascontiguousarray(np.asarray(note, dtype=np.float32)[:, :self.num_features])
        if type(state) is not np.ndarray or state.dtype != np.float32:
            state = np.ascontiguousarray(state, dtype=np.float32)
        if note.ndim != 2 or state.shape != (note.shape[0], self._state_size):
            raise ValueError(f"note must be [N, {self.num_features}] and state [N, {self._state_size}], "
                             f"got {note.shape} and {state.shape}")
        outs = self._session.run(self._output_names, {"note": note, "state": state})
        i_logits, i_step, i_duration, i_state = self._output_index
        logits, step, duration, new_state = outs[i_logits], outs[i_step], outs[i_duration], outs[i_state]
        velocity = outs[self._velocity_index] if self._velocity_index is not None else None
        # Fast path, once per note on the engine thread: a sum is finite only if every term is (`add.reduce` is
        # the ufunc `.sum()` calls, without its Python layer: a third of the cost for arrays this small).
        reduce = np.add.reduce
        total = (float(reduce(logits, None)) + float(reduce(step, None)) + float(reduce(duration, None))
                 + float(reduce(new_state, None)))
        if velocity is not None:
            total += float(reduce(velocity, None))
        if math.isfinite(total):
            return Prediction(logits, step, duration, velocity, new_state)
        finite = (np.isfinite(step).all() and np.isfinite(duration).all() and np.isfinite(new_state).all()
                  and (velocity is None or np.isfinite(velocity).all()))
        # -inf logits are a legitimate mask; NaN, +inf, or a row with nothing finite are not.
        bad_rows = np.isnan(logits).any(axis=1) | np.isposinf(logits).any(axis=1) | np.isneginf(logits).all(axis=1)
        if not finite or bad_rows.any():
            logits, step, duration, velocity, new_state = self._sanitise(logits, bad_rows, step, duration,
                                                                         velocity, new_state)
        return Prediction(logits, step, duration, velocity, new_state)

    def _sanitise(self, logits, bad_rows, step, duration, velocity, state):
        if not self._warned_nonfinite:
            self._warned_nonfinite = True
            log.warning("model %s produced non-finite outputs; replacing them with safe values (uniform pitch, "
                        "shortest step and duration, zero state). Logged once per model.", self._path)
        logits = logits.copy()
        logits[bad_rows] = 0.0
        step = np.where(np.isfinite(step), step, np.float32(SAFE_STEP_S)).astype(np.float32)
        duration = np.where(np.isfinite(duration), duration, np.float32(SAFE_DURATION_S)).astype(np.float32)
        if velocity is not None:
            velocity = np.where(np.isfinite(velocity), velocity, np.float32(SAFE_VELOCITY)).astype(np.float32)
        bad_state = ~np.isfinite(state).all(axis=1)
        if bad_state.any():
            state = state.copy()
            state[bad_state] = 0.0
        return logits, step, duration, velocity, state

    def nonfinite_outputs(self) -> list[str]:
        """The outputs that are not finite (NaN or ±infinity; for `pitch_logits`, NaN, +inf, or no finite logit)
        after one step from the zero state, for a silent note and for a typical one (middle C, 0.5 s step and
        duration, velocity 90); [] for a sound model. The daemon refuses a model for which this is not empty."""
        probes = np.array([[0.0, 0.0, 0.0, 0.0], [60.0, 0.5, 0.5, 90.0]], np.float32)[:, :self.num_features]
        bad: list[str] = []
        for probe in probes:
            raw = self._session.run(self._output_names, {"note": probe[None, :], "state": self.zero_state(1)})
            for name, value in zip(self._output_names, raw):
                value = np.asarray(value)
                if name == "pitch_logits":
                    broken = bool(np.isnan(value).any() or np.isposinf(value).any() or np.isneginf(value).all())
                else:
                    broken = not bool(np.isfinite(value).all())
                if broken and name not in bad:
                    bad.append(name)
        return bad

    def __repr__(self) -> str:
        return (f"StepModel({str(self._path)!r}, features={','.join(self._features)}, state_size={self._state_size}, "
                f"context={self._context})")
