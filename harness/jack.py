"""A JACK server for tests and benches, and `wire`, which connects players, improvd and receivers on it.

`JackServer`: a `jackd` with the dummy driver (48 kHz, 64-frame periods; no sound card needed), started and waited
for, stopped with SIGTERM + wait, its `/dev/shm` files removed. Its name comes from a small pool (`improvd-test-0`
... `-5`), each held with a file lock while the server lives: JACK's server registry has 8 slots and reclaims a dead
server's slot only for a server of the same name, so unique names left one slot taken for good by every server that
died without cleaning up (a SIGKILL, a killed test run), and after 8 of those no jackd would start ("Too many servers
already active"). Clients get `JACK_NO_START_SERVER=1` so that none starts a server of its own by accident.

Called from the test's or bench's thread.
"""

from __future__ import annotations

import fcntl
import glob
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

from harness.procs import spawn, terminate, unique_id

SAMPLE_RATE = 48000
PERIOD_FRAMES = 64
JACKD = shutil.which("jackd")
JACK_TOOLS = ("jack_lsp", "jack_connect", "jack_midi_dump")
SERVER_NAMES = 6  # the pool of server names; JACK's registry holds 8 servers
IMPROVD_IN, IMPROVD_OUT = ":improvd in", ":improvd out"  # improvd's port names (its default [midi] ports)


def jack_missing() -> str | None:
    """Why JACK end-to-end runs cannot run here (a sentence naming what to install), or None when they can."""
    missing = [t for t in ("jackd", *JACK_TOOLS) if shutil.which(t) is None]
    if missing:
        return (f"{', '.join(missing)} not installed: jackd and the JACK example clients (jack_lsp, jack_connect, "
                f"jack_midi_dump) are needed; on Debian/Ubuntu: apt-get install jackd2")
    return None


def realtime_allowed() -> bool:
    """Whether this process may use SCHED_FIFO (then jackd and its clients run their MIDI cycles real-time).

    IMPROVD_TEST_JACK_REALTIME=0 or 1 forces it."""
    forced = os.environ.get("IMPROVD_TEST_JACK_REALTIME")
    if forced in ("0", "1"):
        return forced == "1"
    try:
        pid = os.fork()
    except OSError:
        return False
    if pid == 0:
        try:
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(10))
            os._exit(0)
        except OSError:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) == 0


class JackServer:
    """A `jackd` with the dummy driver under a unique name.

    Args:
        rate: sample rate (Hz).
        period: frames per period (the dummy driver's cycle; 64 frames at 48 kHz = 1.33 ms).
        realtime: SCHED_FIFO (default: where this process may use it).
        sync: jackd's synchronous mode (`-S`): a cycle waits for every client. In the default asynchronous mode a
            client that is not done when the driver wakes (the host stalled it) misses the cycle, and the MIDI of
            that cycle is lost to it; in sync mode it is late, not lost (measured with `jack_midi_dump` under 6 ms
            CPU stalls: async lost 1-3 events of 3,000, sync none).
    """

    def __init__(self, rate: int = SAMPLE_RATE, period: int = PERIOD_FRAMES, realtime: bool | None = None,
                 sync: bool = False) -> None:
        self.realtime = realtime_allowed() if realtime is None else realtime
        self.sync = sync
        self.name = ""  # taken from the pool by `start`
        self.rate = rate
        self.period = period
        self.env = dict(os.environ, JACK_DEFAULT_SERVER=self.name, JACK_NO_START_SERVER="1",
                        PYTHONUNBUFFERED="1")
        self.proc: subprocess.Popen | None = None
        self.log_path: Path | None = None
        self._lock_fd: int | None = None
        # the host's `cpu_steal()` reading at each mark of the log (`log_size`); 0: the server's start
        self.steal_marks: dict[int, tuple[float, float]] = {}

    def _take_name(self) -> None:
        """Hold the first free name of the pool (an exclusive lock on its file until `stop`)."""
        lock_dir = Path(os.environ.get("TMPDIR", "/tmp"))
        for slot in range(SERVER_NAMES):
            fd = os.open(lock_dir / f"improvd-test-jack-{slot}.lock", os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                continue
            self._lock_fd, self.name = fd, f"improvd-test-{slot}"
            self._remove_shm_files()  # what a server of this name that died uncleanly left
            self.env["JACK_DEFAULT_SERVER"] = self.name
            return
        raise RuntimeError(f"all {SERVER_NAMES} JACK test server names are in use by live test servers")

    def _remove_shm_files(self) -> None:
        for path in glob.glob(f"/dev/shm/jack_sem.*_{self.name}_*") + glob.glob(f"/dev/shm/jack_{self.name}_*"):
            try:
                os.unlink(path)
            except OSError:
                pass

    def start(self, log_dir: Path, timeout: float = 10.0) -> "JackServer":
        """Start `jackd` and wait until a client can connect to it."""
        self._take_name()
        self.log_path = Path(log_dir) / f"{self.name}-{os.getpid()}-{unique_id()}.log"
        log = open(self.log_path, "wb")
        mode = ["--realtime"] if self.realtime else ["--no-realtime"]
        if self.sync:
            mode.append("--sync")
        self.proc = spawn([JACKD, "-n", self.name, *mode, "-d", "dummy",
                           "-r", str(self.rate), "-p", str(self.period)],
                          env=self.env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        self.steal_marks = {0: cpu_steal()}
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.stop()
                raise RuntimeError(f"jackd exited with {self.proc.returncode}:\n{self.log_path.read_text()}")
            if "system:capture_1" in self.ports():
                return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"jackd {self.name} did not come up within {timeout} s")

    def stop(self) -> int | None:
        """SIGTERM, wait, and remove the server's leftover files under /dev/shm."""
        rc = terminate(self.proc, timeout=5.0) if self.proc is not None else None
        if self._lock_fd is not None:
            self._remove_shm_files()
            os.close(self._lock_fd)  # the name is free again
            self._lock_fd = None
        return rc

    def settings(self) -> dict:
        """The server's settings, for a benchmark's JSON."""
        return {"driver": "dummy", "rate_hz": self.rate, "period_frames": self.period, "realtime": self.realtime,
                "sync": self.sync}

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_size(self) -> int:
        """Bytes in the server's log so far (a mark for `xruns`, `graph_report`); the host's CPU steal is noted
        with it (`steal_at`)."""
        size = self.log_path.stat().st_size if self.log_path and self.log_path.exists() else 0
        self.steal_marks.setdefault(size, cpu_steal())
        return size

    def steal_at(self, mark: int) -> tuple[float, float]:
        """The host's CPU time and steal when `log_size()` returned `mark` (the server's start for 0)."""
        return self.steal_marks.get(mark, self.steal_marks.get(0, cpu_steal()))

    def log_lines(self, since: int = 0) -> list[str]:
        """The server's log after byte `since`."""
        if not self.log_path or not self.log_path.exists():
            return []
        with open(self.log_path, "rb") as fh:
            fh.seek(since)
            return fh.read().decode(errors="replace").splitlines()

    def xruns(self, since: int = 0) -> list[str]:
        """The server's xrun reports (`JackEngine::XRun: client = NAME was not finished ...`) after byte `since`
        of its log: cycles some client missed, whose MIDI is lost for every client of the server."""
        return [ln for ln in self.log_lines(since) if "XRun" in ln]

    def ports(self) -> list[str]:
        """All port names (`jack_lsp`); [] when the server is not reachable."""
        out = subprocess.run(["jack_lsp"], env=self.env, capture_output=True, text=True, timeout=10)
        return out.stdout.split("\n")[:-1] if out.returncode == 0 else []

    def connections(self) -> str:
        """`jack_lsp -c` output, for failure messages."""
        return subprocess.run(["jack_lsp", "-c"], env=self.env, capture_output=True, text=True, timeout=10).stdout

    def wait_port(self, pattern: str, timeout: float = 10.0) -> str:
        """The full name of the first port whose name ends with `pattern` (e.g. ':improvd out')."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for port in self.ports():
                if port.endswith(pattern):
                    return port
            time.sleep(0.05)
        raise AssertionError(f"no JACK port ending with {pattern!r} within {timeout} s; ports: {self.ports()}")

    def connect(self, src: str, dst: str) -> None:
        out = subprocess.run(["jack_connect", src, dst], env=self.env, capture_output=True, text=True, timeout=10)
        if out.returncode != 0:
            raise AssertionError(f"jack_connect {src!r} {dst!r} failed: {out.stderr.strip()}")


def cpu_steal() -> tuple[float, float]:
    """Seconds of CPU time so far on this machine in all, and those the hypervisor gave to others (`steal` in
    /proc/stat; (0, 0) where there is none): where steal rises, JACK's threads wake late and every client misses
    cycles, whatever improvd does."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return 0.0, 0.0
    tick = os.sysconf("SC_CLK_TCK")
    return sum(fields[:8]) / tick, (fields[7] if len(fields) > 7 else 0) / tick


def steal_percent(before: tuple[float, float], after: tuple[float, float]) -> float | None:
    """The share of CPU time stolen by the hypervisor between two `cpu_steal()` readings, %."""
    total = after[0] - before[0]
    return round(100.0 * (after[1] - before[1]) / total, 2) if total > 0 else None


def improvd_ports(server: JackServer, client: str = "", timeout: float = 10.0) -> tuple[str, str]:
    """The full names of improvd's input and output ports on `server`, waited for up to `timeout` seconds.

    `client` is improvd's `[midi] client_name` ("" for any): rtmidi opens the input and the output as two JACK
    clients, NAME and NAME-01, so a port matches NAME or NAME-NN followed by the port's name."""
    owner = rf"{re.escape(client)}(?:-\d+)?" if client else r".*"
    want = {end: re.compile(rf"^{owner}{re.escape(end)}$") for end in (IMPROVD_IN, IMPROVD_OUT)}
    deadline = time.monotonic() + timeout
    while True:
        ports = server.ports()
        found = {end: next((p for p in ports if rx.match(p)), None) for end, rx in want.items()}
        if all(found.values()):
            return found[IMPROVD_IN], found[IMPROVD_OUT]
        if time.monotonic() > deadline:
            raise AssertionError(f"improvd's ports (client {client!r}) not all there within {timeout} s; "
                                 f"ports: {ports}")
        time.sleep(0.05)


def _port(part) -> str:
    return part if isinstance(part, str) else part.port


def wire(server: JackServer, players=(), receivers=(), *, client: str = "", monitor: bool = False,
         timeout: float = 10.0) -> tuple[str, str]:
    """Connect what plays into improvd and what listens to its output; returns improvd's (input, output) ports.

    `players`: what sends to improvd's input (objects with a `.port`, or port names: players, sources, flooders);
    `receivers`: what hears improvd's output (`.port` or names). With `monitor`, every receiver also hears every
    player, so that one clock (the receiver's) sees the call and the answer. `client` selects improvd's JACK client
    by its `[midi] client_name` (see `improvd_ports`)."""
    in_port, out_port = improvd_ports(server, client, timeout)
    for player in players:
        server.connect(_port(player), in_port)
        if monitor:
            for receiver in receivers:
                server.connect(_port(player), _port(receiver))
    for receiver in receivers:
        server.connect(out_port, _port(receiver))
    return in_port, out_port
