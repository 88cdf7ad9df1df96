"""Child processes for tests and benches: started so that they die with the caller, ended politely, and a reader
that keeps a child's output lines (on its own thread) and lets the caller wait for one.

Every child gets PR_SET_PDEATHSIG and is also ended by `stop_all()` (atexit), newest first.
Called from the test's or bench's thread; `LineReader` runs one thread per stream.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import itertools
import re
import signal
import subprocess
import threading
from typing import Callable, Iterator

_ids = itertools.count()
_children: list[subprocess.Popen] = []


def unique_id() -> int:
    """A number no other caller in this process got: suffixes for JACK client names, log files."""
    return next(_ids)


def _die_with_parent() -> None:
    """preexec_fn: the child gets SIGTERM when the process that started it dies (Linux)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def spawn(cmd: list[str], *, env: dict[str, str], **kwargs) -> subprocess.Popen:
    """Start a child process that is ended with the calling process, whatever happens."""
    proc = subprocess.Popen(cmd, env=env, preexec_fn=_die_with_parent, **kwargs)
    _children.append(proc)
    return proc


def terminate(proc: subprocess.Popen, timeout: float = 3.0) -> int | None:
    """SIGTERM, wait, then SIGKILL if it does not go; returns the exit status."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)
    return proc.returncode


def finish(proc: subprocess.Popen, timeout: float = 3.0) -> None:
    """End a child that reads commands from stdin: close its stdin, wait, `terminate` it if it lingers."""
    if proc.poll() is None:
        proc.stdin.close()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            terminate(proc)


@atexit.register
def stop_all() -> None:
    """End every child still running, newest first (servers were started first, so they go last)."""
    for proc in reversed(_children):
        terminate(proc)


class LineReader:
    """Reads a child's text stream on a thread; keeps every line; lets the caller wait for one.

    `on_line(line)` is called on the reader's thread, under `cond`, before the line is kept."""

    def __init__(self, stream, on_line: Callable[[str], None] | None = None) -> None:
        self.lines: list[str] = []
        self.eof = False
        self.cond = threading.Condition()
        self._on_line = on_line
        self._thread = threading.Thread(target=self._run, args=(stream,), daemon=True)
        self._thread.start()

    def _run(self, stream) -> None:
        for line in stream:
            with self.cond:
                if self._on_line is not None:
                    self._on_line(line)
                self.lines.append(line.rstrip("\n"))
                self.cond.notify_all()
        with self.cond:
            self.eof = True
            self.cond.notify_all()

    def wait_for(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Whether `predicate()` (called under `cond`) became true within `timeout` seconds."""
        with self.cond:
            return self.cond.wait_for(predicate, timeout)

    def wait_line(self, pattern: str, timeout: float, start: int = 0) -> str:
        """The first line at index >= start containing `pattern`; AssertionError after `timeout`."""
        rx = re.compile(pattern)
        found: list[str] = []

        def check() -> bool:
            found[:] = [ln for ln in self.lines[start:] if rx.search(ln)]
            return bool(found)
        if not self.wait_for(check, timeout):
            raise AssertionError(f"no line matching {pattern!r} within {timeout} s; got:\n" + "\n".join(self.lines))
        return found[0]

    def join(self, timeout: float) -> None:
        """Wait up to `timeout` seconds for the stream's end to be read."""
        self._thread.join(timeout)


@contextlib.contextmanager
def closing_all(build: Callable) -> Iterator[Callable]:
    """A factory that calls `build(...)` and keeps what it made; on leaving, each is closed (`close()`), in the
    order they were made: rigs of a test that own child processes."""
    made = []

    def make(*args, **kwargs):
        rig = build(*args, **kwargs)
        made.append(rig)
        return rig
    try:
        yield make
    finally:
        for rig in made:
            rig.close()
