"""The engine core's watch on tritonserver, for a server that dies abruptly (a crash, SIGKILL).

Then its Python backend stub is reparented and lives on: in Triton 2.51 the stub's own
"non-graceful termination" path deadlocks when a model thread is inside a pb_utils call that
waits for the dead server's reply (a Metric update, say, which holds the GIL). The stub, this
core (its child: the model's pages, and on a GPU the pool's memory) and the stub's
shared-memory region would then stay until someone kills them. The core has an interpreter of
its own, so it can end all three: once a second it checks that the stub's parent is still the
server it was started under (pid reuse cannot fool it: a reparented stub has another parent);
if not, it removes the stub's shared-memory region, kills the stub and exits.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)

WATCH_INTERVAL_S = 1.0
EXIT_SERVER_GONE = 4  # the core's exit code when it ended an orphaned stub
SHM_PREFIX = "triton_python_backend_shm_region"  # the stub's argv names its region
SHM_DIR = Path("/dev/shm")


def start_server_watch(server_pid: int) -> None:
    """Watch `server_pid`, the parent of this process's parent (the stub), from a thread."""
    threading.Thread(target=_watch, args=(os.getppid(), server_pid),
                     name="slora-server-watch", daemon=True).start()


def parent_of(pid: int) -> int | None:
    """The parent pid of `pid` (None once it is gone): field 4 of /proc/<pid>/stat, read
    after the command name, which may hold spaces or parentheses."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])


def _watch(stub_pid: int, server_pid: int) -> None:
    while parent_of(stub_pid) == server_pid:
        time.sleep(WATCH_INTERVAL_S)
    if parent_of(stub_pid) is None:
        return  # the stub is gone too: the pipe's EOF ends this core
    log.error("tritonserver (pid %d) is gone and its Python backend stub (pid %d) lives on: "
              "ending the stub and this engine core", server_pid, stub_pid)
    _remove_shm_region(stub_pid)
    with contextlib.suppress(ProcessLookupError):
        os.kill(stub_pid, signal.SIGKILL)
    os._exit(EXIT_SERVER_GONE)


def _remove_shm_region(stub_pid: int) -> None:
    """Unlink the stub's shared-memory region (its server, which would have, is gone)."""
    try:
        argv = Path(f"/proc/{stub_pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return
    for arg in argv:
        name = arg.decode(errors="replace")
        if name.startswith(SHM_PREFIX) and "/" not in name:
            with contextlib.suppress(OSError):
                (SHM_DIR / name).unlink()
