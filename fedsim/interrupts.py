"""Ctrl-C and SIGTERM: stop at the next safe point, keep what finished, say how to continue.

A run's work happens in two places: on the in-process engine everything runs on the main
thread; on the Ray engine Flower runs the ServerApp (fedsim's curious server, the attacks) on a
thread of its own while the main thread drives the simulation. Signals only ever reach the main
thread, so a `StopSignal` does two things when one arrives:
- it sets an event that the server's thread checks before each attack, on every attack
  iteration and while it waits for clients (`check`), so that thread ends at the next safe point;
- it raises KeyboardInterrupt on the main thread, unless the main thread is writing a row
  (`critical`), in which case it raises when the write is complete: a results file is never
  left with half a row.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager

EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}  # the shell's 128 + signal number


class RunInterrupted(Exception):
    """Raised on the server's thread when a stop was asked for. An Exception, not a
    KeyboardInterrupt, so Flower's server thread hands it back quietly."""


class RunStopped(KeyboardInterrupt):
    """A run ended early on a signal, its finished rows kept; the message says where and how
    to continue, `exit_code` is the shell's for that signal."""

    def __init__(self, message: str, exit_code: int = 130):
        super().__init__(message)
        self.message, self.exit_code = message, exit_code


class StopSignal:
    def __init__(self):
        self.event = threading.Event()
        self.signum: int | None = None
        self._writing = 0
        self._deferred = False

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else "an interrupt"

    @property
    def exit_code(self) -> int:
        return EXIT_CODES.get(self.signum, 130)

    def request(self, signum: int = signal.SIGINT) -> None:
        """Ask every part of the run to stop (what the handler does; tests call it directly)."""
        self.signum = self.signum or signum
        self.event.set()

    def check(self) -> None:
        if self.event.is_set():
            raise RunInterrupted(f"stopped on {self.name}")

    def _handle(self, signum, frame) -> None:
        self.request(signum)
        if self._writing:
            self._deferred = True
            return
        raise KeyboardInterrupt

    @contextmanager
    def installed(self):
        """SIGINT and SIGTERM go to `_handle` while the block runs (main thread only; elsewhere,
        as on a Ray worker or a web server's thread, the process's own handling stays)."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        before = {sig: signal.signal(sig, self._handle) for sig in EXIT_CODES}
        try:
            yield self
        finally:
            for sig, handler in before.items():
                signal.signal(sig, handler)

    def reinstall(self) -> None:
        """Take the signals back from a library that installed its own (ray.init sets a SIGTERM
        handler that exits without unwinding the run)."""
        if threading.current_thread() is threading.main_thread():
            for sig in EXIT_CODES:
                signal.signal(sig, self._handle)

    @contextmanager
    def critical(self):
        """A signal during the block is acted on when the block ends (a row being written).
        Only the main thread is ever interrupted, so only its writes need deferring."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        self._writing += 1
        try:
            yield
        finally:
            self._writing -= 1
            if not self._writing and self._deferred:
                self._deferred = False
                raise KeyboardInterrupt
