"""SignalWatcher: a real SIGTERM to this process runs the callback on the watcher's thread;
close() puts the previous handler back."""

from __future__ import annotations

import os
import signal
import threading

from slora_backend.shutdown_signal import SignalWatcher

CALLBACK_TIMEOUT_S = 5.0


def test_sigterm_runs_the_callback_and_close_restores() -> None:
    before = signal.getsignal(signal.SIGTERM)
    called = threading.Event()
    threads: list[str] = []

    def callback() -> None:
        threads.append(threading.current_thread().name)
        called.set()

    watcher = SignalWatcher(callback)
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        assert called.wait(CALLBACK_TIMEOUT_S), "the callback did not run"
        assert threads == ["slora-signal"]
    finally:
        watcher.close()
    assert signal.getsignal(signal.SIGTERM) == before
    assert signal.set_wakeup_fd(-1) == -1  # the wakeup fd was given back too
