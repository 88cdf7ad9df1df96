"""The service's signal wiring (daemon/live/service.py): each signal asks for what docs/daemon.md promises, and only
wakes the main loop (the handlers run between bytecodes on the main thread)."""

from __future__ import annotations

import os
import signal

import pytest

from improvd.core.config import Config
from improvd.daemon.live import service


@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="POSIX signals")
def test_signals_request_a_stop_a_reload_and_a_stats_line():
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1)}
    svc = service.Service(Config())
    try:
        svc.install_signals()
        for signum, flag in ((signal.SIGHUP, "reload_requested"), (signal.SIGUSR1, "stats_requested"),
                             (signal.SIGTERM, "stop_requested")):
            svc.wake.clear()
            assert not getattr(svc, flag)
            os.kill(os.getpid(), signum)
            assert svc.wake.wait(2.0) and getattr(svc, flag), signum
        svc.stop_requested = False
        os.kill(os.getpid(), signal.SIGINT)
        assert svc.wake.wait(2.0) and svc.stop_requested
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)
