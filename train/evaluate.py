"""One evaluation protocol for every model and baseline.

Each note of the evaluated files that has at least `context` notes before it is predicted from exactly those
`context` notes (from a zero state). Reported: pitch cross-entropy (nats/note), pitch top-1 accuracy, step and
duration mean absolute error (s), and the number of notes.

Threads: the main thread of `improvd eval` and `improvd train`.
"""

from __future__ import annotations

from typing import Callable, Iterator

import numpy as np

from improvd.core import notes as nt
from improvd.daemon.predict.sampling import log_softmax  # the daemon's own: evaluation scores what it plays

Predictor = Callable[[np.ndarray], dict[str, np.ndarray]]  # raw windows [N, T, 4] -> next-note outputs


def protocol_batches(files: list[np.ndarray], context: int, batch_size: int) -> Iterator[tuple[np.ndarray,
                                                                                                np.ndarray]]:
    """(windows [B, context, 4], targets [B, 4]) over every note with `context` predecessors, in order.

    `files` is a `train.data.NoteSet` or a list of per-file arrays; only one batch of windows is in memory.
    """
    from improvd.train.data import as_note_set

    notes = as_note_set(files)
    counts = (notes.lengths - context).clip(0)
    total = int(counts.sum())
    ends = np.cumsum(counts)
    for b in range(0, total, batch_size):
        k = np.arange(b, min(b + batch_size, total))
        owner = np.searchsorted(ends, k, side="right")
        target = notes.starts[owner] + context + (k - (ends[owner] - counts[owner]))
        windows = np.asarray(notes.notes[target[:, None] - context + np.arange(context)], dtype=np.float64)
        yield windows, np.asarray(notes.notes[target], dtype=np.float64)
        if b // batch_size % 64 == 63:
            notes.release()  # keep a memory-mapped pack's resident pages few


def evaluate(predict: Predictor, files: list[np.ndarray], context: int = 25, batch_size: int = 512,
             progress: bool = False) -> dict:
    """Score `predict` on `files` with the protocol; returns the metrics as a dict.

    Raises:
        ValueError: no file has more than `context` notes.
    """
    from tqdm import tqdm

    total = sum(max(0, len(f) - context) for f in files)
    if total == 0:
        raise ValueError(f"no note has {context} notes before it: the files are too short for this protocol")
    ce = correct = step_err = dur_err = 0.0
    n = 0
    bar = tqdm(total=total, desc="evaluating", unit="note", disable=not progress)
    for windows, targets in protocol_batches(files, context, batch_size):
        out = predict(windows)
        logp = log_softmax(out["pitch_logits"])
        pitch = targets[:, nt.PITCH].astype(np.int64)
        ce -= logp[np.arange(len(pitch)), pitch].sum()
        correct += (logp.argmax(axis=1) == pitch).sum()
        step_err += np.abs(np.maximum(out["step"], 0.0) - targets[:, nt.STEP]).sum()
        dur_err += np.abs(np.maximum(out["duration"], 0.0) - targets[:, nt.DURATION]).sum()
        n += len(pitch)
        bar.update(len(pitch))
    bar.close()
    return {"cross_entropy": ce / n, "accuracy": correct / n, "step_mae_s": step_err / n,
            "duration_mae_s": dur_err / n, "notes": n, "context": context}


def keras_predictor(model) -> Predictor:
    from improvd.train.model import predict_next
    return lambda windows: predict_next(model, windows)


def onnx_predictor(step_model) -> Predictor:
    """The step model fed note by note from a zero state, a whole batch of windows at once."""
    def predict(windows: np.ndarray) -> dict[str, np.ndarray]:
        state = step_model.zero_state(len(windows))
        x = windows[..., :step_model.num_features].astype(np.float32)
        for t in range(windows.shape[1]):
            pred = step_model.run(x[:, t], state)
            state = pred.state
        out = {"pitch_logits": pred.pitch_logits, "step": pred.step, "duration": pred.duration}
        if pred.velocity is not None:
            out["velocity"] = pred.velocity
        return out
    return predict


def format_table(rows: list[tuple[str, dict]]) -> str:
    """Metrics of several models as an aligned text table."""
    head = f"{'model':<34} {'pitch CE':>9} {'top-1':>7} {'step MAE':>9} {'dur MAE':>9} {'notes':>8}"
    lines = [head, "-" * len(head)]
    for name, m in rows:
        step = f"{m['step_mae_s']:.4f}" if m.get("step_mae_s") is not None else "-"
        dur = f"{m['duration_mae_s']:.4f}" if m.get("duration_mae_s") is not None else "-"
        lines.append(f"{name:<34} {m['cross_entropy']:>9.4f} {m['accuracy']:>7.3f} {step:>9} {dur:>9} "
                     f"{m['notes']:>8}")
    return "\n".join(lines)


def _file_predictions(predict: Predictor, notes: np.ndarray, context: int,
                      batch_size: int) -> tuple[list[np.ndarray | None], list[tuple[float, float] | None]]:
    """The model's pitch distribution and (step, duration) (negatives as 0) for every note of one file: note i
    (i >= 1) from the min(i, context) notes before it, from a zero state (None for note 0, and for i < context
    when the model takes only full windows)."""
    probs: list[np.ndarray | None] = [None]
    timing: list[tuple[float, float] | None] = [None]
    x = np.asarray(notes, dtype=np.float64)

    def add(out: dict) -> None:
        probs.extend(np.exp(log_softmax(out["pitch_logits"])))
        timing.extend(zip(np.maximum(out["step"], 0.0).tolist(), np.maximum(out["duration"], 0.0).tolist()))

    for i in range(1, min(context, len(x))):
        try:
            out = predict(x[None, :i])
        except Exception:  # noqa: BLE001  a model of fixed window length (the tutorial's): no prefix prediction
            probs.append(None)
            timing.append(None)
            continue
        add(out)
    for start in range(context, len(x), batch_size):
        idx = np.arange(start, min(start + batch_size, len(x)))
        add(predict(x[idx[:, None] - context + np.arange(context)]))
    return probs, timing


def evaluate_adapted(predict: Predictor, files, context: int = 25, memory: int = 2000, batch_size: int = 512,
                     progress: bool = False) -> dict:
    """The session protocol: every file is a session; the targets are the notes of its second half (those with
    at least `context` notes before them), each predicted by the model from exactly the `context` notes before
    it, while the adaptive part (`daemon.adapt.SessionAdapter`) has heard every earlier note of the file.

    Returns the model's cross-entropy, top-1 and step and duration MAE (s) on the targets, and the same with
    adaptation (pitch and timing) under "adapted", with the per-file numbers under "per_file".

    Raises:
        ValueError: no file has a target.
    """
    from tqdm import tqdm

    from improvd.daemon.predict.adapt import SessionAdapter
    from improvd.train.data import as_note_set

    notes = as_note_set(files)
    ce = ce_ad = correct = correct_ad = 0.0
    errors = np.zeros(4)  # step and duration absolute errors, without and with adaptation
    n = 0
    per_file = []
    weights = []
    for f in tqdm(range(len(notes)), desc="sessions", unit="file", disable=not progress):
        x = np.asarray(notes[f], dtype=np.float64)
        first = max(len(x) // 2, context)
        if first >= len(x):
            continue
        probs, timing = _file_predictions(predict, x, context, batch_size)
        adapter = SessionAdapter(memory)
        f_ce = f_ad = 0.0
        f_err = np.zeros(4)
        for i, row in enumerate(x):
            pitch = int(row[nt.PITCH])
            truth = (row[nt.STEP], row[nt.DURATION])
            if i >= first:
                p = probs[i]
                q = adapter.mix(p)
                f_ce -= np.log(max(p[pitch], 1e-300))
                f_ad -= np.log(max(q[pitch], 1e-300))
                correct += int(np.argmax(p) == pitch)
                correct_ad += int(np.argmax(q) == pitch)
                adapted = adapter.timing(*timing[i])
                f_err += [abs(timing[i][0] - truth[0]), abs(timing[i][1] - truth[1]),
                          abs(adapted[0] - truth[0]), abs(adapted[1] - truth[1])]
            adapter.observe(pitch, probs[i], timing=truth, model_timing=timing[i])
        k = len(x) - first
        ce += f_ce
        ce_ad += f_ad
        errors += f_err
        n += k
        weights.append(adapter.weights)
        per_file.append({"notes": k, "cross_entropy": f_ce / k, "adapted_cross_entropy": f_ad / k,
                         "step_mae_s": f_err[0] / k, "duration_mae_s": f_err[1] / k,
                         "adapted_step_mae_s": f_err[2] / k, "adapted_duration_mae_s": f_err[3] / k})
    if n == 0:
        raise ValueError(f"no file has a second-half note with {context} notes before it: too short for the "
                         f"session protocol")
    return {"cross_entropy": ce / n, "accuracy": correct / n, "step_mae_s": errors[0] / n,
            "duration_mae_s": errors[1] / n, "notes": n, "files": len(per_file), "context": context,
            "adapted": {"cross_entropy": ce_ad / n, "accuracy": correct_ad / n, "memory": memory,
                        "step_mae_s": errors[2] / n, "duration_mae_s": errors[3] / n,
                        "ratio": (ce_ad / n) / (ce / n) if ce else None,
                        "step_ratio": errors[2] / errors[0] if errors[0] else None,
                        "duration_ratio": errors[3] / errors[1] if errors[1] else None,
                        "mean_final_weights": dict(zip(SessionAdapter(memory).experts,
                                                       np.mean(weights, axis=0)[-1].round(4).tolist()))},
            "per_file": per_file}
