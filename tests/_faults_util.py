"""Fault-suite helpers: a per-test watchdog, so no fault scenario can hang CI.

    def test_x(faults_watchdog):
        proc = faults_watchdog.track(subprocess.Popen(..., start_new_session=True))
        ...

When the budget runs out, the watchdog SIGKILLs every tracked child (its whole process group
when it leads one) and raises :class:`WatchdogTimeout` in the test's main thread (via
``SIGALRM``, which also interrupts blocking waits), so the test fails naming the budget.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading

import pytest

DEFAULT_BUDGET_S = 240.0


class WatchdogTimeout(AssertionError):
    """The scenario ran past its watchdog budget."""


class Watchdog:
    """Kills tracked children and fails the test after ``budget_s`` seconds."""

    def __init__(self, budget_s: float) -> None:
        self.budget_s = budget_s
        self.fired = False
        self._procs: list[subprocess.Popen] = []
        self._lock = threading.Lock()

    def track(self, proc: subprocess.Popen) -> subprocess.Popen:
        with self._lock:
            self._procs.append(proc)
        return proc

    def kill_children(self) -> None:
        with self._lock:
            procs = list(self._procs)
        for proc in procs:
            if proc.poll() is not None:
                continue
            try:
                if os.getpgid(proc.pid) == proc.pid:
                    os.killpg(proc.pid, signal.SIGKILL)
                else:
                    proc.kill()
            except (ProcessLookupError, PermissionError):
                pass

    def _fire(self, _signum, _frame) -> None:
        self.fired = True
        self.kill_children()
        raise WatchdogTimeout(f"fault scenario still running after its {self.budget_s:.0f}s watchdog budget; "
                              "its child processes were killed")

    def arm(self, budget_s: float) -> None:
        """Restart the countdown with a new budget (from now)."""
        self.budget_s = budget_s
        signal.setitimer(signal.ITIMER_REAL, budget_s)

    def __enter__(self) -> "Watchdog":
        self._saved = signal.signal(signal.SIGALRM, self._fire)
        self.arm(self.budget_s)
        return self

    def __exit__(self, *exc) -> None:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, self._saved)
        self.kill_children()  # nothing a scenario started outlives it


@pytest.fixture
def faults_watchdog():
    """A :class:`Watchdog` armed for 240 s; a test sets its own budget with ``faults_watchdog.arm(s)``."""
    with Watchdog(DEFAULT_BUDGET_S) as dog:
        yield dog
