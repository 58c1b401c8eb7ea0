"""Child processes that never outlive the cordgen process that needs them.

A cluster job ends by SIGKILL as often as by Ctrl-C (the OOM killer, `scancel --signal=KILL`, a
preempted pod), and a killed parent runs no cleanup code. So each child asks the kernel itself
to kill it when its parent goes (Linux's PR_SET_PDEATHSIG): an engine then frees its GPU memory
within moments of cordgen's death, and the resumed run finds the devices free.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import select
import signal
import threading
import time

PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int | None = None) -> None:
    """SIGKILL this process when the thread that started it ends, however it ends. When the
    parent (`parent_pid`, if given) is already gone, exit at once: the request came too late."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if parent_pid is not None and os.getppid() != parent_pid:
        os._exit(1)


def exit_with(pid: int) -> None:
    """End this process when process `pid` ends, for a process whose parent is not cordgen (a
    fork server's child): a thread waits on the process's pidfd, or polls where there is none."""

    def watch() -> None:
        try:
            fd = os.pidfd_open(pid)
        except (AttributeError, OSError):
            while os.path.exists(f"/proc/{pid}"):
                time.sleep(1.0)
        else:
            select.select([fd], [], [])
        os._exit(1)

    threading.Thread(target=watch, name="cordgen-exit-with-parent", daemon=True).start()
