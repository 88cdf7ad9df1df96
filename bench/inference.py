"""Per-note inference latency through onnxruntime with one intra-op thread; prints JSON.

(a) the step model with its state carried (one call per note), and (b) the window model re-run over the last
`context` notes for every new note (what a model without carried state costs), measured in the same run.
(c) `step_adapted`: (a) plus session adaptation (`improvise.adapt = "cache"`, daemon/predict/adapt.py) on every
note: `observe` of the note (weights and counts updated, pitch and timing), softmax of the logits, the adapter's
pitch mixture and timing, on a stream that repeats motifs and their rhythms (so contexts match) with the memory
full (`--adapt-memory`, default the config's): a note both learned and predicted from, more than either engine
path does. `adapt_cost_ratio_median` = median (c) / median (a); `adapt_cost_ratio_cpu_median` the same with the
thread's CPU time per note, which a shared machine's other processes disturb far less than wall-clock time;
`adapt_only_*`: the time (c) spends outside the model step, what adaptation itself costs per note.
(d) `improviser` / `improviser_adapted`: what the engine thread spends per note, through `Improviser`, without
and with adaptation (the default [improvise] decoding: temperature 0.9, top-p 0.95), on its two paths: `player`
(a player's note fed: the model steps, the adapter learns) and `answer` (a note decoded and fed as improvd's own:
the mixture and timing, the context extended); the top level is both back to back. `improviser_adapt_ratio_median`
= median adapted / median without; `player_note_ratio_median` and `answer_note_ratio_median` the same per path.

    .venv/bin/python bench/inference.py [--model models/bach.onnx] [--window models/bach.window.onnx]
                                        [--adapt cache|pitch]

Without --window, the window model is exported next to a temporary copy from --keras (a run directory's
model.keras); with neither, only the step model is measured.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from improvd.daemon.predict.adapt import SessionAdapter, softmax  # noqa: E402
from improvd.daemon.predict.model import StepModel  # noqa: E402


def _session(path: str):
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def _stats(samples_s: list[float], cpu_s: list[float] | None = None) -> dict:
    """Wall-clock latency per note; with `cpu_s`, also the thread's CPU time per note (`cpu_median_us`), which
    time slices lost to other processes on a shared machine do not inflate."""
    us = np.asarray(samples_s) * 1e6
    out = {"median_us": float(np.median(us)), "p99_us": float(np.percentile(us, 99)),
           "max_us": float(us.max()), "n": len(us)}
    if cpu_s is not None:
        out["cpu_median_us"] = float(np.median(cpu_s) * 1e6)
    return out


def bench_step(path: str, notes: int, warmup: int = 200) -> dict:
    model = StepModel(path, threads=1)
    rng = np.random.default_rng(0)
    feats = model.num_features
    state = model.zero_state(1)
    times, cpu = [], []
    for i in range(warmup + notes):
        note = np.array([[rng.integers(40, 80), 0.25, 0.4, 80][:feats]], dtype=np.float32)
        t0, c0 = time.perf_counter(), time.thread_time()
        pred = model.run(note, state)
        dt, dc = time.perf_counter() - t0, time.thread_time() - c0
        state = pred.state
        if i >= warmup:
            times.append(dt)
            cpu.append(dc)
    return _stats(times, cpu) | {"state_size": model.state_size, "features": ",".join(model.features)}


def _pitch_stream(n: int, rng: np.random.Generator) -> np.ndarray:
    """A player who repeats a few motifs, at times transposed, with random notes between them."""
    motifs = [rng.integers(48, 76, rng.integers(4, 9)) for _ in range(6)]
    out: list[int] = []
    while len(out) < n:
        if rng.random() < 0.7:
            out += list(motifs[rng.integers(len(motifs))] + rng.choice([0, 0, 0, 2, 5, -3]))
        else:
            out += list(rng.integers(45, 80, rng.integers(1, 5)))
    return np.asarray(out[:n])


def bench_step_adapted(path: str, notes: int, memory: int, timing: bool = True, warmup: int = 200) -> dict:
    """(c): per note, `observe` (the player's note learned: weights and counts), the model step, softmax, the
    mixture and timing: a note that is both learned and predicted from, an upper bound of either engine path.
    `adapt_only` is the same loop's time outside the model step: what adaptation itself costs per note."""
    model = StepModel(path, threads=1)
    rng = np.random.default_rng(0)
    feats = model.num_features
    state = model.zero_state(1)
    adapter = SessionAdapter(memory, timing=timing)
    pitches = _pitch_stream(memory + warmup + notes, rng)
    steps = 0.125 * (1 + pitches % 3)  # a rhythm that comes back with the motifs
    for p, s in zip(pitches[:memory], steps):  # the memory full before timing: the worst case for its size
        adapter.observe(int(p), None, timing=(s, 0.4))
    times, cpu, own = [], [], []
    probs = model_timing = None
    for i, (p, s) in enumerate(zip(pitches[memory:], steps[memory:])):
        note = np.array([[p, s, 0.4, 80][:feats]], dtype=np.float32)
        t0, c0 = time.perf_counter(), time.thread_time()
        adapter.observe(int(p), probs, timing=(s, 0.4), model_timing=model_timing)
        t1 = time.perf_counter()
        pred = model.run(note, state)
        t2 = time.perf_counter()
        probs = softmax(pred.pitch_logits[0])
        adapter.mix(probs)
        model_timing = (max(float(pred.step[0]), 0.0), max(float(pred.duration[0]), 0.0))
        adapter.timing(*model_timing)
        dt, dc = time.perf_counter() - t0, time.thread_time() - c0
        state = pred.state
        if i >= warmup:
            times.append(dt)
            cpu.append(dc)
            own.append(dt - (t2 - t1))
    return _stats(times, cpu) | {"memory": memory, "counted": adapter.counted, "timing": timing,
                                 "adapt_only": _stats(own)}


def bench_improviser(path: str, notes: int, memory: int | None, timing: bool = True, warmup: int = 200) -> dict:
    """(d): the engine thread's two per-note paths through `Improviser`, on the same stream: `player` feeds a
    player's note (`feed(player=True)`: the model steps, the adapter learns); `answer` decodes a note and feeds
    it as improvd's own (`predict` then `feed`: the mixture and timing, the context extended, nothing learned).
    The top level is `player` + `answer` back to back (a player's note, then a prediction), as before."""
    from improvd.core.config import ImproviseConfig
    from improvd.daemon.predict.improviser import Decoding, Improviser

    model = StepModel(path, threads=1)
    rng = np.random.default_rng(0)
    adapter = SessionAdapter(memory, timing=timing) if memory else None
    imp = Improviser(model, Decoding.from_config(ImproviseConfig()), rng=np.random.default_rng(1), adapter=adapter)
    pitches = _pitch_stream((memory or 0) + warmup + notes + 1, rng)
    if adapter is not None:
        for p in pitches[:memory]:  # the memory full before timing
            imp.feed([p, 0.25, 0.4, 80], player=True)
        pitches = pitches[memory:]
    imp.feed([pitches[0], 0.25, 0.4, 80], player=True)
    times, cpu, player, answer = [], [], [], []
    pc = time.perf_counter
    for i, p in enumerate(pitches[1:]):
        note = [float(p), 0.25, 0.4, 80.0]
        t0, c0 = pc(), time.thread_time()
        imp.feed(note, player=True)
        t1 = pc()
        imp.predict()
        dt, dc = pc() - t0, time.thread_time() - c0
        # the answer path: a note decoded and fed as improvd's own (then the player goes on, as in a duet)
        snap = imp.snapshot()
        t2 = pc()
        row = imp.predict()
        imp.feed(row)
        t3 = pc()
        imp.restore(snap)
        if i >= warmup:
            times.append(dt)
            cpu.append(dc)
            player.append(t1 - t0)
            answer.append(t3 - t2)
    return _stats(times, cpu) | {"player": _stats(player), "answer": _stats(answer)} | (
        {"memory": memory, "counted": adapter.counted} if adapter is not None else {})


def bench_window(path: str, notes: int, warmup: int = 50) -> dict:
    sess = _session(path)
    inp = sess.get_inputs()[0]
    context, feats = inp.shape[1], inp.shape[2]
    rng = np.random.default_rng(0)
    window = np.zeros((1, context, feats), dtype=np.float32)
    window[..., 0] = rng.integers(40, 80, (1, context))
    window[..., 1:3] = 0.3
    times = []
    for i in range(warmup + notes):
        t0 = time.perf_counter()
        sess.run(None, {inp.name: window})
        dt = time.perf_counter() - t0
        window = np.roll(window, -1, axis=1)
        if i >= warmup:
            times.append(dt)
    return _stats(times) | {"context": int(context)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/bach.onnx", help="step-format ONNX model")
    parser.add_argument("--window", help="window-format ONNX model of the same network")
    parser.add_argument("--notes", type=int, default=3000, help="notes timed per model")
    parser.add_argument("--adapt-memory", type=int, default=None,
                        help="session memory of the adapted measurement (default: improvise.adapt_memory)")
    parser.add_argument("--adapt", default="cache", choices=("cache", "pitch"),
                        help="improvise.adapt of the adapted measurements: cache (pitch and timing) or pitch")
    args = parser.parse_args()
    timing = args.adapt == "cache"
    if args.adapt_memory is None:
        from improvd.core.config import ImproviseConfig
        args.adapt_memory = ImproviseConfig().adapt_memory
    # Interleave the measurements in rounds so that machine noise hits them alike.
    step_rounds, window_rounds, adapted_rounds, imp_rounds, imp_adapted_rounds = [], [], [], [], []
    rounds = 3
    for _ in range(rounds):
        step_rounds.append(bench_step(args.model, args.notes // rounds))
        adapted_rounds.append(bench_step_adapted(args.model, args.notes // rounds, args.adapt_memory, timing))
        imp_rounds.append(bench_improviser(args.model, args.notes // rounds, None))
        imp_adapted_rounds.append(bench_improviser(args.model, args.notes // rounds, args.adapt_memory, timing))
        if args.window:
            window_rounds.append(bench_window(args.window, max(100, args.notes // (rounds * 5))))
    pick = lambda rs: min(rs, key=lambda r: r["median_us"])  # noqa: E731  the quietest round
    result = {"benchmark": "inference", "model": args.model, "threads": 1, "adapt": args.adapt,
              "step": pick(step_rounds),
              "step_rounds": step_rounds, "step_adapted": pick(adapted_rounds), "step_adapted_rounds": adapted_rounds}
    result["adapt_cost_ratio_median"] = result["step_adapted"]["median_us"] / result["step"]["median_us"]
    result["adapt_cost_ratio_cpu_median"] = result["step_adapted"]["cpu_median_us"] / result["step"]["cpu_median_us"]
    result["adapt_cost_ratio_per_round"] = [a["median_us"] / s["median_us"]
                                            for s, a in zip(step_rounds, adapted_rounds)]
    result["improviser"] = pick(imp_rounds)
    result["improviser_adapted"] = pick(imp_adapted_rounds)
    result["improviser_adapt_ratio_median"] = (result["improviser_adapted"]["median_us"]
                                               / result["improviser"]["median_us"])
    result["improviser_adapt_ratio_cpu_median"] = (result["improviser_adapted"]["cpu_median_us"]
                                                   / result["improviser"]["cpu_median_us"])
    result["improviser_adapt_ratio_per_round"] = [a["median_us"] / s["median_us"]
                                                  for s, a in zip(imp_rounds, imp_adapted_rounds)]
    for path in ("player", "answer"):  # each engine path: adapted / without, the quietest round of each
        result[f"{path}_note_ratio_median"] = (min(r[path]["median_us"] for r in imp_adapted_rounds)
                                               / min(r[path]["median_us"] for r in imp_rounds))
        result[f"{path}_note_adapted_p99_us"] = min(r[path]["p99_us"] for r in imp_adapted_rounds)
        result[f"{path}_note_p99_us"] = min(r[path]["p99_us"] for r in imp_rounds)
    result["adapt_only_p99_us"] = min(r["adapt_only"]["p99_us"] for r in adapted_rounds)
    result["adapt_only_median_us"] = min(r["adapt_only"]["median_us"] for r in adapted_rounds)
    result["loadavg"] = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else None
    if window_rounds:
        result["window"] = pick(window_rounds)
        result["window_rounds"] = window_rounds
        result["speedup_median"] = result["window"]["median_us"] / result["step"]["median_us"]
        # per round, measured back to back, so a noisy moment affects both
        result["speedup_per_round"] = [w["median_us"] / s["median_us"] for s, w in zip(step_rounds, window_rounds)]
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
