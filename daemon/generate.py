"""`improvd generate`: continue a MIDI file offline with the decoding code the daemon uses (`Improviser`).

The output MIDI file holds the prime and the continuation on separate tracks, at 960 ticks per quarter (120 bpm),
so the model's times survive to the millisecond. `--beam K` searches over pitch for the most likely continuation
(steps and durations greedy). No TensorFlow is needed.

`--polyphony N|match` and `--register free|match` (default: `improvise.polyphony` / `improvise.register`) bound the
continuation's texture as the daemon bounds an answer (daemon/music/texture.py), the prime being the call: a note that
would sound with N others waits for a release, pitches are sampled within the prime's span widened by
`REGISTER_WIDEN` semitones. The summary line says how often the bounds overrode the model.

Threads: the main thread of `improvd generate`.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from improvd.core import notes as nt
from improvd.core.config import Config
from improvd.core.errors import ImprovdError, MidiFileError
from improvd.daemon.predict.improviser import Improviser, Snapshot
from improvd.core.midifile import Track, read_notes, write_notes
from improvd.daemon.predict.model import StepModel
from improvd.daemon.predict.sampling import Decoding, log_softmax
from improvd.daemon.music.texture import Texture, TextureCounts, Voices, check_polyphony, check_register, texture_for_call

log = logging.getLogger("improvd.generate")

# Used when no --prime is given: the opening of a C major scale and a cadence, quarter notes at 120 bpm.
BUILTIN_PRIME = nt.from_onsets(
    pitch=[60, 62, 64, 65, 67, 65, 64, 62, 60, 64, 67, 72],
    onset_s=[0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.0, 4.0, 4.0],
    duration_s=[0.45] * 8 + [0.95] * 4, velocity=[80] * 12)


def continue_notes(improviser: Improviser, prime: np.ndarray, max_notes: int,
                   max_seconds: float | None = None, *, texture: Texture | None = None,
                   counts: TextureCounts | None = None) -> np.ndarray:
    """Prime the improviser with `prime` and decode up to `max_notes` notes (or until `max_seconds` of onsets).

    Args:
        texture: polyphony and register bounds (daemon/music/texture.py); None = none. A note delayed by the polyphony
            bound gets the real step (and is fed with it, clipped to `step_range` like the daemon's).
        counts: filled with how often the bounds overrode the model.

    Returns:
        float64 [K, 4]: the continuation; its first step is relative to the last note of the prime.
    """
    improviser.prime(prime)
    out = []
    elapsed = 0.0
    texture = texture or Texture()
    voices = Voices()
    t = float(nt.onsets(prime)[-1]) if len(prime) else 0.0
    step_hi = improviser.decoding.step_range[1]
    for _ in range(max_notes):
        note = improviser.predict(register=texture.register)
        rechosen = improviser.rechosen
        onset = t + note[nt.STEP]
        delay = 0.0
        if texture.polyphony is not None:
            later = voices.earliest_onset(onset, texture.polyphony)
            if later > onset:
                delay = later - onset
                note[nt.STEP] = later - t
                onset = later
        elapsed += note[nt.STEP]
        if max_seconds is not None and elapsed > max_seconds:
            break
        out.append(note)
        voices.add(onset, onset + note[nt.DURATION])
        t = onset
        if counts is not None:
            counts.add(delay_s=delay, rechosen=rechosen)
        fed = note.copy()
        fed[nt.STEP] = min(fed[nt.STEP], step_hi)
        improviser.feed(fed)
    return np.array(out, dtype=np.float64).reshape(-1, 4)


def prime_texture(prime: np.ndarray, polyphony, register: str, pitch_range) -> Texture:
    """The texture bounds of a continuation of `prime` (the call)."""
    onsets = nt.onsets(prime)
    return texture_for_call(polyphony, register, pitches=prime[:, nt.PITCH], onsets_s=onsets,
                            ends_s=onsets + prime[:, nt.DURATION], pitch_range=tuple(pitch_range))


def parse_polyphony(text) -> int | str:
    """`--polyphony` as given: "match" or a number of notes (0 = no bound)."""
    value = text
    if isinstance(text, str) and text.strip().lower() != "match":
        try:
            value = int(text)
        except ValueError:
            value = text
    elif isinstance(text, str):
        value = "match"
    check_polyphony(value)
    return value


@dataclass
class _Beam:
    snapshot: Snapshot
    notes: list
    logp: float


def beam_search(improviser: Improviser, prime: np.ndarray, max_notes: int, beams: int,
                max_seconds: float | None = None) -> np.ndarray:
    """The most likely pitch sequence found with `beams` beams; step, duration and velocity decoded greedily.

    Each beam keeps its own state (through `Improviser.snapshot`), so re-priming follows the same rule as
    `continue_notes`. Scores are summed log-probabilities of the pitches within `pitch_range`.
    """
    lo, hi = improviser.decoding.pitch_range
    saved = improviser.decoding
    improviser.decoding = Decoding(**{**saved.__dict__, "temperature": 0.0})  # step, duration, velocity: greedy
    try:
        improviser.prime(prime)
        live = [_Beam(improviser.snapshot(), [], 0.0)]
        for _ in range(max_notes):
            candidates = []
            for beam in live:
                improviser.restore(beam.snapshot)
                logits = np.full(128, -np.inf)
                logits[lo:hi + 1] = improviser.prediction.pitch_logits[0, lo:hi + 1]
                logp = log_softmax(logits)
                note = improviser.predict()
                for pitch in np.argsort(-logp)[:beams]:
                    cand = note.copy()
                    cand[nt.PITCH] = pitch
                    candidates.append((beam.logp + float(logp[pitch]), beam, cand))
            candidates.sort(key=lambda c: -c[0])
            live = []
            for score, beam, cand in candidates[:beams]:
                improviser.restore(beam.snapshot)
                improviser.feed(cand)
                live.append(_Beam(improviser.snapshot(), beam.notes + [cand], score))
            if max_seconds is not None and sum(n[nt.STEP] for n in live[0].notes) > max_seconds:
                live[0].notes.pop()
                break
    finally:
        improviser.decoding = saved
    return np.array(live[0].notes, dtype=np.float64).reshape(-1, 4)


def cmd_generate(args, config: Config) -> int:
    """`improvd generate`: prime → continuation → MIDI file (and piano roll)."""
    model = StepModel(args.model or config.model.path, threads=config.model.threads)
    if args.notes < 1:
        raise ImprovdError(f"--notes {args.notes} is not valid: expected at least 1")
    if args.beam < 0:
        raise ImprovdError(f"--beam {args.beam} is not valid: expected 0 (off) or a number of beams >= 1")
    if args.prime:
        try:
            prime = read_notes(args.prime)
        except MidiFileError as err:
            raise ImprovdError(f"--prime: {err}") from err
    else:
        prime = BUILTIN_PRIME
        print("no --prime given: starting from a built-in phrase (C major scale and cadence)", file=sys.stderr)
    try:
        decoding = Decoding.from_config(config.improvise, temperature=args.temperature, top_p=args.top_p)
    except ValueError as err:
        raise ImprovdError(str(err)) from err
    try:
        polyphony = parse_polyphony(args.polyphony if getattr(args, "polyphony", None) is not None
                                    else config.improvise.polyphony)
        register = getattr(args, "register", None) or config.improvise.register
        check_register(register)
    except ValueError as err:
        raise ImprovdError(f"--{err}") from err
    texture = prime_texture(prime, polyphony, register, decoding.pitch_range) if len(prime) else Texture()
    bounded = texture != Texture()
    if args.beam and bounded:
        raise ImprovdError("--beam searches without texture bounds: use --polyphony 0 --register free with --beam "
                           "(or sample without --beam)")
    seed = args.seed if args.seed is not None else config.improvise.seed
    if seed < 0:
        seed = int(np.random.default_rng().integers(0, 2**31))
    improviser = Improviser(model, decoding, rng=np.random.default_rng(seed))
    counts = TextureCounts()
    if args.beam:
        cont = beam_search(improviser, prime, args.notes, args.beam, args.seconds)
    else:
        cont = continue_notes(improviser, prime, args.notes, args.seconds, texture=texture, counts=counts)
    last_onset = float(nt.onsets(prime)[-1])
    cont_start = last_onset + (cont[0, nt.STEP] if len(cont) else 0.0)
    write_notes(args.out, [Track("prime", prime, channel=0), Track("improvd", cont, channel=1, start_s=cont_start)])
    if args.plot:
        try:  # matplotlib comes with the 'train' extra, not with the runtime install
            from improvd.train.plots import plot_piano_roll
        except ModuleNotFoundError as err:
            raise ImprovdError("--plot needs matplotlib: pip install matplotlib (or the 'train' extra)") from err
        plot_piano_roll(prime, cont, cont_start, Path(args.plot), f"{Path(args.out).name}: prime and continuation")
    how = f"beam search ({args.beam} beams)" if args.beam else \
        ("greedy" if decoding.temperature == 0 else f"temperature {decoding.temperature}, top-p {decoding.top_p}")
    length = float(nt.onsets(cont)[-1] + cont[-1, nt.DURATION]) if len(cont) else 0.0
    bounds = ""
    if bounded:
        c = counts.as_dict()
        span = f"pitches {texture.register[0]}..{texture.register[1]}" if texture.register else "any register"
        voices = f"at most {texture.polyphony} at once" if texture.polyphony else "any polyphony"
        bounds = (f"; bounds: {voices}, {span}: {c['delayed']} onsets delayed, {c['rechosen']} pitches re-chosen "
                  f"({100 * c['overridden_share']:.0f}% of notes)")
    print(f"wrote {args.out}: {len(prime)} prime notes + {len(cont)} generated ({length:.2f} s), {how}, "
          f"seed {seed}, model {model.path}{bounds}")
    return 0
