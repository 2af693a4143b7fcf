"""Notice SIGTERM inside Triton's Python backend stub, at once, to end in-flight requests.

tritonserver 2.51 tells a model nothing when it is asked to stop: on SIGTERM it refuses new
requests and unloads the model, and the unload (`finalize`) waits until nothing references the
model, up to --exit-timeout-secs. The response factory of every running request of a decoupled
model is such a reference, so running generations held the stop up to the timeout; then
tritonserver exited without `finalize`. The fix: the launcher (scripts/tritonserver.sh) passes
SIGTERM on to the stub, and the model calls `SignalWatcher(stop)` in `initialize`: every
request ends ('cancelled') within a step, Triton unloads the model and `finalize` runs
(docs/DESIGN.md "Serving path", Shutdown).

The stub ignores SIGTERM (a C handler) and its main thread waits in C++ for messages, so a
Python handler alone would run late; `signal.set_wakeup_fd` makes the C-level handler write the
signal's number into a pipe at once, which a thread here watches.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable, Iterable

log = logging.getLogger(__name__)

DEFAULT_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class SignalWatcher:
    """Calls `callback()` on a thread when one of `signals` arrives. Construct it on the main
    thread (Python's rule for signal handlers); `close()` restores what was there before."""

    def __init__(self, callback: Callable[[], None],
                 signals: Iterable[signal.Signals] = DEFAULT_SIGNALS) -> None:
        self._callback = callback
        self._read, self._write = os.pipe()
        os.set_blocking(self._write, False)  # a signal handler must never block
        self._previous = {sig: signal.signal(sig, self._handler) for sig in signals}
        self._previous_fd = signal.set_wakeup_fd(self._write)
        self._closed = False
        self._thread = threading.Thread(target=self._watch, name="slora-signal", daemon=True)
        self._thread.start()

    @staticmethod
    def _handler(signum: int, frame: object) -> None:
        """The Python-level handler (runs late, on the main thread): the pipe did the work."""

    def _watch(self) -> None:
        while True:
            data = os.read(self._read, 1)
            if self._closed or not data:
                return
            log.info("signal %d: shutting down the engine", data[0])
            try:
                self._callback()
            except Exception:  # the server is stopping anyway: log, do not die silently
                log.exception("shutdown on signal failed")
            return

    def close(self) -> None:
        """Restore the previous handlers and wakeup fd; stop the thread (main thread only)."""
        if self._closed:
            return
        self._closed = True
        signal.set_wakeup_fd(self._previous_fd)
        for sig, previous in self._previous.items():
            # None: a handler set outside Python (the stub's, which ignores the signal)
            signal.signal(sig, previous if previous is not None else signal.SIG_IGN)
        os.write(self._write, b"\0")
        self._thread.join()
        os.close(self._read)
        os.close(self._write)

