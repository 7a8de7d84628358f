"""Work a server's worker process does as it stops, where ``atexit`` does not run.

granian ends each worker with ``os._exit`` once the worker has stopped serving, so the ``atexit``
handlers of a worker never run (an outside review lost every held audit record on a plain stop).
What must happen before a worker exits registers here as well; :mod:`sts.serving` runs the hooks
when granian stops the worker (``__rsgi_del__``), after its request threads have finished.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)

_hooks: list[Callable[[], None]] = []
_lock = threading.Lock()


def at_worker_exit(hook: Callable[[], None]) -> None:
    """Run ``hook`` when this worker stops (each hook once; a hook that fails is logged)."""
    with _lock:
        _hooks.append(hook)


def run_worker_exit_hooks() -> None:
    """Run (and forget) the registered hooks, newest first."""
    with _lock:
        hooks = _hooks[::-1]
        _hooks.clear()
    for hook in hooks:
        try:
            hook()
        except Exception:  # one failing hook must not keep the others from running
            log.exception("a worker exit hook failed")
