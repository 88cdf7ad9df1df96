"""Parity of an export: Keras against onnxruntime, on real and random windows.

Checked on every export (a failure fails it): pitch logits within 1e-4, identical argmax, step and duration (and
velocity, in MIDI units scaled to 0..1) within 1e-5; the step model fed note by note from a zero state against the
Keras model on the same windows, and, when it was written, the window-format ONNX model against both.

Threads: the main thread of `improvd export`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from improvd.core import notes as nt

LOGIT_ATOL = 1e-4
TIME_ATOL = 1e-5


@dataclass
class ParityReport:
    windows: int
    rows: list[dict] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(r["ok"] for r in self.rows)

    def format(self) -> str:
        lines = [f"parity on {self.windows} windows (logits atol {LOGIT_ATOL:g}, times atol {TIME_ATOL:g}):"]
        for r in self.rows:
            lines.append(f"  {r['what']:<38} max|Δlogit| {r['logits']:.2e}  argmax same {r['argmax_same']:.4f}  "
                         f"max|Δstep| {r['step']:.2e}  max|Δdur| {r['duration']:.2e}  {'OK' if r['ok'] else 'FAIL'}")
        return "\n".join(lines)


def random_windows(n: int, context: int, seed: int = 0) -> np.ndarray:
    """Random raw note windows [n, context, 4]: any pitch, steps 0..1 s, durations 0.02..2 s."""
    rng = np.random.default_rng(seed)
    w = np.zeros((n, context, 4))
    w[..., nt.PITCH] = rng.integers(0, 128, (n, context))
    w[..., nt.STEP] = rng.uniform(0, 1, (n, context)) * (rng.random((n, context)) < 0.7)
    w[..., nt.DURATION] = rng.uniform(0.02, 2, (n, context))
    w[..., nt.VELOCITY] = rng.integers(1, 128, (n, context))
    return w


def real_windows(files: list[np.ndarray], n: int, context: int, seed: int = 0) -> np.ndarray:
    """Up to `n` windows of `context` notes drawn from `files`."""
    rng = np.random.default_rng(seed)
    rows = [(f, i) for f, notes in enumerate(files) for i in range(0, len(notes) - context + 1)]
    if not rows:
        return np.zeros((0, context, 4))
    pick = rng.choice(len(rows), size=min(n, len(rows)), replace=False)
    return np.stack([files[rows[k][0]][rows[k][1]:rows[k][1] + context] for k in pick])


def compare(what: str, ref: dict, got: dict) -> dict:
    logits = float(np.max(np.abs(ref["pitch_logits"] - got["pitch_logits"])))
    same = float(np.mean(ref["pitch_logits"].argmax(1) == got["pitch_logits"].argmax(1)))
    step = float(np.max(np.abs(ref["step"] - got["step"])))
    dur = float(np.max(np.abs(ref["duration"] - got["duration"])))
    row = {"what": what, "logits": logits, "argmax_same": same, "step": step, "duration": dur}
    ok = logits <= LOGIT_ATOL and same == 1.0 and step <= TIME_ATOL and dur <= TIME_ATOL
    if "velocity" in ref and "velocity" in got:
        row["velocity"] = float(np.max(np.abs(ref["velocity"] - got["velocity"]))) / 127.0
        ok = ok and row["velocity"] <= TIME_ATOL
    row["ok"] = ok
    return row


def check(model, step_path, windows: dict[str, np.ndarray], window_path=None) -> ParityReport:
    """Compare the Keras `model` with the exported ONNX file(s) on named sets of raw windows [N, T, 4]."""
    import onnxruntime as ort

    from improvd.daemon.predict.model import StepModel
    from improvd.train.evaluate import onnx_predictor
    from improvd.train.model import predict_next

    step_model = StepModel(str(step_path), threads=1)
    predict_step = onnx_predictor(step_model)
    f = step_model.num_features
    window_sess = None
    if window_path is not None:
        window_sess = ort.InferenceSession(str(window_path), providers=["CPUExecutionProvider"])
        names = [o.name for o in window_sess.get_outputs()]
    report = ParityReport(windows=sum(len(w) for w in windows.values()))
    for label, w in windows.items():
        if not len(w):
            continue
        ref = predict_next(model, w)
        if "velocity" in ref:
            ref["velocity"] = ref["velocity"] * 127.0
        got = predict_step(w)
        report.rows.append(compare(f"{label}: Keras vs ONNX step", ref, got))
        if window_sess is not None:
            outs = window_sess.run(None, {"notes": w[..., :f].astype(np.float32)})
            win = dict(zip(names, outs))
            report.rows.append(compare(f"{label}: Keras vs ONNX window", ref, win))
            report.rows.append(compare(f"{label}: ONNX window vs ONNX step", win, got))
    return report
