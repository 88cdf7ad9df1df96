"""What a JACK server's log says (xruns, process errors) and the checks built on it, for tests and benches.

Called from the test's or bench's thread. The pytest side (an excused timing miss as an expected failure) is
tests/e2e/expect.py's `check_timing`.
"""

from __future__ import annotations

import collections
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, NoReturn

from harness.jack import cpu_steal, steal_percent

if TYPE_CHECKING:
    from harness.jack import JackServer

# ---- what the server's log says, and what a failed check may be excused by ---------------------------------------
#
# The rules (issue 12): an xrun or process error that names one of improvd's clients, or a run of process errors
# (a client that stopped running its cycle: the whole graph stalls), is a failure, never an expected failure. A
# timing check that missed may be an expected failure only for a cause outside improvd that the log and the host
# show: the driver woke late while the host stole CPU time (measured), or the receiver missed its own cycle; the
# reason printed with the xfail carries that evidence. Correctness checks (notes heard, answered, balanced, exit
# codes) never become expected failures: a test where MIDI could be lost runs its server in synchronous mode
# (`JackServer(sync=True)`), where a late client is late, not lost.

DRIVER_WOKE_LATE = "driver woke late"
IMPROVD_CLIENTS = re.compile(r"client(?: =)? (improvd\S*)")  # improvd, improvd-01, improvd-monitor, ...
# A cycle whose graph did not finish: `ProcessGraphAsyncMaster: Process error` (asynchronous mode), or the driver's
# wait for the clients timing out (`SuspendRefNum error`, synchronous mode, where no client is named).
PROCESS_ERRORS = ("Process error", "SuspendRefNum error")
PROCESS_ERROR_RUN = 8  # this many process errors in a row, no client named (10 ms of cycles): a client stopped


def xrun_kind(line: str) -> str:
    """What one of the server's xrun reports says: `DRIVER_WOKE_LATE` (`JackTimedDriver::Process XRun`), or
    "CLIENT STATE" for a client not finished at the deadline (`client = CLIENT was not finished, state = STATE`),
    or "CLIENT finished late" (`client CLIENT finished after current callback`)."""
    if "JackTimedDriver" in line:
        return DRIVER_WOKE_LATE
    m = re.search(r"client = (\S+) was not finished, state = (\w+)", line)
    if m:
        return f"{m[1]} {m[2]}"
    m = re.search(r"client (\S+) finished after", line)
    return f"{m[1]} finished late" if m else line.strip()


def driver_woke_late(server: "JackServer", since: int) -> list[str]:
    """The dummy driver's late wake-ups after byte `since` of the server's log (`xrun_kind`). Each one loses the
    frame clock the time the driver slept too long: a receiver's timestamps (frames) then put later events earlier
    than they were sent (measured: a 5 ms stall of both CPUs -> 2.7-4.0 ms shorter intervals)."""
    return [ln for ln in server.xruns(since) if xrun_kind(ln) == DRIVER_WOKE_LATE]


@dataclass
class GraphReport:
    """What the server logged after a mark, judged by the rules above (`graph_report`)."""

    xruns: list[str]
    improvd: list[str]  # xrun reports naming one of improvd's clients
    process_errors: int
    longest_run: int  # the longest run of process errors in a row
    driver_late: int
    receiver_missed: list[str]  # reports of a receiver that missed its own cycle
    steal_percent: float | None  # the host's CPU steal since the mark

    @property
    def failure(self) -> str | None:
        """Why the log itself fails the test, or None."""
        if self.improvd:
            return (f"the JACK server logged {len(self.improvd)} xruns naming improvd's clients "
                    f"({dict(collections.Counter(xrun_kind(x) for x in self.improvd))})")
        if self.longest_run >= PROCESS_ERROR_RUN:
            return (f"the JACK server logged {self.longest_run} process errors in a row: a client stopped running "
                    f"its cycle and the whole graph stalled")
        return None

    def excuse(self) -> str | None:
        """A cause outside improvd for a missed timing check, with its evidence, or None."""
        if self.failure:
            return None
        if self.driver_late and self.steal_percent:
            return (f"the JACK driver woke late {self.driver_late} times while the host stole "
                    f"{self.steal_percent:.2f}% of the CPU time (xruns: {self.summary()})")
        if self.receiver_missed:
            return (f"the receiver missed {len(self.receiver_missed)} of its own cycles and stamps that cycle's "
                    f"events with a later frame time (xruns: {self.summary()})")
        return None

    def summary(self) -> str:
        kinds = dict(collections.Counter(xrun_kind(x) for x in self.xruns))
        return (f"{len(self.xruns)} xruns {kinds}, {self.process_errors} process errors (longest run "
                f"{self.longest_run}), host steal {self.steal_percent}%")


def graph_report(server: "JackServer", since: int, receiver: str = "receiver") -> GraphReport:
    """Judge the server's log after byte `since` (a `server.log_size()` mark; the host's steal is measured from
    the same mark)."""
    lines = server.log_lines(since)
    xruns = [ln for ln in lines if "XRun" in ln]
    run = longest = errors = 0
    for ln in lines:
        if any(e in ln for e in PROCESS_ERRORS):
            errors += 1
            run += 1
            longest = max(longest, run)
        elif xrun_kind(ln) != DRIVER_WOKE_LATE and "ProcessWriteSlaves error" not in ln:
            # A graph that a stopped client holds up logs a process error every cycle and names the client only
            # when the server gives up on that cycle's graph (its timeout, hundreds of cycles); a busy host makes
            # clients miss single cycles, each named, each followed by one or two process errors.
            run = 0
    return GraphReport(
        xruns=xruns,
        improvd=[x for x in xruns if IMPROVD_CLIENTS.search(x)],
        process_errors=errors, longest_run=longest,
        driver_late=sum(xrun_kind(x) == DRIVER_WOKE_LATE for x in xruns),
        receiver_missed=[x for x in xruns if re.search(rf"client (?:= )?{receiver}\S* ", x)],
        steal_percent=steal_percent(server.steal_at(since), cpu_steal()))


def midi_lost(server: "JackServer", since: int, detail: str) -> NoReturn:
    """Fail a correctness check (notes heard, answered, balanced): always an AssertionError, with what the server
    logged after byte `since` as evidence. Never an expected failure."""
    report = graph_report(server, since)
    raise AssertionError(f"{detail}\n(the JACK server since the test began: {report.summary()}"
                         f"{'; ' + report.failure if report.failure else ''})")


def timing_excuse(server: "JackServer", ok: bool, detail, *, since: int) -> str | None:
    """Judge a timing check measured on the receiver's frame clock: None when it held. A miss raises
    AssertionError, unless the server's log after byte `since` and the host show a cause outside improvd
    (`GraphReport.excuse`): then the excuse with its evidence and the measurement is returned (tests make it an
    expected failure: tests/e2e/expect.py). xruns naming improvd's clients, or a run of process errors, fail it in
    any case."""
    if ok:
        return None
    report = graph_report(server, since)
    if report.failure:
        raise AssertionError(f"{detail}\n{report.failure}: {report.summary()}")
    excuse = report.excuse()
    if excuse:
        return f"{excuse}; measured: {detail}"
    raise AssertionError(f"{detail}\n(the JACK server: {report.summary()})")


def assert_graph_clean(server: "JackServer", since: int) -> None:
    """Fail when the server's log after byte `since` names improvd's clients in xruns or shows a run of process
    errors (a test's end: whatever its checks said, improvd must not cost the graph its cycles)."""
    report = graph_report(server, since)
    if report.failure:
        raise AssertionError(f"{report.failure}: {report.summary()}\n" + "\n".join(report.improvd[:10]))


def xrun_counts(server: "JackServer", since: int = 0) -> dict:
    """JACK's xrun reports after byte `since` of its log, for a bench's JSON: all of them, those naming one of
    improvd's clients (any state: `Running`, its process callback was still running at the deadline; `Triggered`,
    its thread did not run the cycle at all), those where one overran (`Running`), and the longest run of process
    errors in a row (a client that stopped running its cycle; see `graph_report`)."""
    lines = server.xruns(since)
    report = graph_report(server, since)
    by_client = collections.Counter(xrun_kind(ln) for ln in lines)
    return {"reports": len(lines),
            "naming_improvd": len(report.improvd),
            "improvd_overran": sum("client = improvd" in ln and "state = Running" in ln for ln in lines),
            "process_errors": report.process_errors,
            "longest_process_error_run": report.longest_run,
            "by_client_state": dict(by_client.most_common())}


def jack_mark(server: "JackServer") -> tuple[int, tuple[float, float]]:
    """Where a measured stretch starts: the server's log size and the host's CPU time (for `jack_trouble`)."""
    return server.log_size(), cpu_steal()


def jack_trouble(server: "JackServer", mark: tuple[int, tuple[float, float]]) -> dict:
    """JACK's xruns (`xrun_counts`) and the host's CPU steal since `mark` (`jack_mark`)."""
    return {**xrun_counts(server, mark[0]), "host_steal_percent": steal_percent(mark[1], cpu_steal())}
