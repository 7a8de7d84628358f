"""The life of a worker process: it ends when the server's main process does."""

from __future__ import annotations

import ctypes
import os
import signal
import sys

#: ``prctl`` option: the signal a process gets when the thread that forked it ends (Linux).
_PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int | None = None) -> None:
    """In a worker: end (``SIGKILL``) when the server's main process does.

    Granian's workers outlive a main process killed outright (``kill -9``, an OOM kill): they go
    on accepting connections on the shared port with what they loaded, and hold their files
    without the main process watching them.  Linux's ``PR_SET_PDEATHSIG`` (prctl(2)) ends them
    with it; granian forks every worker, respawned ones too, from the main thread, which lives as
    long as the process.  The signal is ``SIGKILL``: a ``SIGTERM`` reaching a worker that is still
    starting (granian's handler installed, its server not yet running) was seen to leave it
    waiting for good, and a main process that ends normally has stopped its workers first.
    Elsewhere, or without ``prctl``, nothing changes.  ``parent``: the main process's pid, known
    before the fork (a worker still starting when the main process died has a new parent already).
    """
    if not sys.platform.startswith("linux"):
        return
    parent = parent if parent is not None else os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            return
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # The main process ended before the request took effect.
        os.kill(os.getpid(), signal.SIGKILL)
