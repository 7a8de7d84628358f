"""This process's id, read without a system call, and kept current over ``fork()``.

The SQLite adapters ask on every statement whether they still run in the process that
opened their connection (a connection inherited over ``fork()`` must not be used).
``os.getpid()`` is a system call each time (glibc does not cache it); here the id is read
once, and again in a forked child (``os.register_at_fork``: ``os.fork``, ``multiprocessing``
and any extension that forks through ``PyOS_AfterFork_Child``, as the C API requires).
"""

from __future__ import annotations

import os

_pid = os.getpid()


def _forked() -> None:
    global _pid
    _pid = os.getpid()


os.register_at_fork(after_in_child=_forked)


def current_pid() -> int:
    """This process's id (as ``os.getpid()``), without a system call."""
    return _pid
