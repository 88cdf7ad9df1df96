"""The shared test and bench harness of improvd: what tests/ and bench/ both import, and nothing pytest-specific.

- `harness.procs`: child processes that die with the caller, and a reader of their output lines.
- `harness.jack`: a JACK dummy server and `wire`, which connects players, improvd and receivers.
- `harness.graph`: what the JACK server's log says (xruns, process errors) and the checks built on it.
- `harness.clients`: the independent JACK clients: `Receiver` (`jack_midi_dump`), `Player`, `Source`, `Flooder`,
  and what a receiver heard (`balance`, `notes_of`).
- `harness.daemon`: `improvd run` under test (`Daemon`, configs, the log lines benches parse), models for it.
- `harness.session`: a daemon, a player and a receiver wired together (`Session`).
- `harness.fakes`: the unit tests' fakes: one fake clock, the note builders `on`/`off`, the `balanced` family,
  python-rtmidi for the ports (`FakeRt`, `FakeMidi`).
- `harness.engines`: the engine's rigs without devices: `Sim` (a fake clock, no threads) and `Rig` (real threads).
- `harness.modelfactory`: small step-format ONNX models without TensorFlow, and their numpy twin.
- `harness.chorales`: the chorales and melody the texture tests and bench play.
- `harness.turns`: the turn-taking calls and measures (bench/turns.py, tests/e2e/test_turns_e2e.py).
- `harness.install`: a fresh venv with a wheel installed, as a user gets it.

It lives outside `tests/` so that benches never import test modules, and outside the wheel (pyproject.toml lists
the packages it ships; `tests/test_packaging.py` checks that no harness is in it). The pytest parts (the `jack`
marker's skip, fixtures, expected failures with evidence) live in tests/conftest.py, tests/daemon/conftest.py and
tests/e2e/.
All of it runs on the caller's thread, except the line readers (`procs.LineReader`), each on its own thread.
"""
