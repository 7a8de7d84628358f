"""The life of a worker process: it ends when the server's main process does, and one that
cannot build its application stays up, answering ``503``, until it can."""

from __future__ import annotations

import ctypes
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterable
from typing import Any

from ..errors import ConfigurationError

log = logging.getLogger("sts.serving")

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]

#: Seconds between a worker's attempts to build its application, once one has failed.
START_RETRY_SECONDS = 5.0

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


def load_or_wait(load_app: Callable[[], WSGIApp], retry: float = START_RETRY_SECONDS) -> WSGIApp:
    """The worker's application, or, when it cannot be built, a :class:`StartingApp` that builds it.

    A worker that fails to start is not left to exit: granian takes a worker that ends within
    5.5 s of its start for a crash loop and stops the whole server, the healthy workers too
    (an outside fault-injection audit: the keys directory made unreadable while serving, then one
    worker killed, took the instance down).  The main process built the application once before
    starting any worker, so a bad configuration still stops the start, with its message.
    """
    try:
        return load_app()
    except Exception as exc:  # noqa: BLE001 - any failure: the worker answers 503 and tries again
        _log_failure(exc, retry)
        return StartingApp(load_app, retry)


def _log_failure(exc: BaseException, retry: float) -> None:
    message = "this worker cannot build the application; it answers 503 and tries again every %s s: %s"
    if isinstance(exc, ConfigurationError | OSError):
        log.error(message, retry, exc)
    else:
        log.error(message, retry, exc, exc_info=exc)


class StartingApp:
    """A worker's WSGI application until its own can be built: every request, ``/readyz`` too, is
    answered ``503 temporarily_unavailable`` with ``Retry-After`` (``/livez``: ``200``, alive); a
    daemon thread tries to build the application every ``retry`` seconds, and requests go to it
    once one is built."""

    def __init__(self, load_app: Callable[[], WSGIApp], retry: float = START_RETRY_SECONDS) -> None:
        self._load = load_app
        self._retry = retry
        self.app: WSGIApp | None = None
        self._body = json.dumps(
            {
                "error": "temporarily_unavailable",
                "error_description": "This worker of the service is starting; try again.",
            }
        ).encode()
        threading.Thread(target=self._keep_trying, name="sts-worker-start", daemon=True).start()

    def _keep_trying(self) -> None:
        while self.app is None:
            threading.Event().wait(self._retry)
            try:
                app = self._load()
            except Exception as exc:  # noqa: BLE001 - logged; the next attempt may succeed
                _log_failure(exc, self._retry)
                continue
            self.app = app
            log.warning("this worker built its application: it serves requests again")

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        app = self.app
        if app is not None:
            return app(environ, start_response)
        if environ.get("PATH_INFO") == "/livez":
            # Alive: it serves requests, and recovers by itself (README, /livez); a restart of the
            # instance, its healthy workers too, would not bring back what it misses.
            body, status, extra = _ALIVE, "200 OK", []
        else:
            body, status = self._body, "503 Service Unavailable"
            extra = [("Retry-After", str(max(1, round(self._retry))))]
        start_response(
            status,
            [
                ("Content-Type", "application/json"),
                ("Content-Length", str(len(body))),
                ("Cache-Control", "no-store"),
                ("Pragma", "no-cache"),
                *extra,
            ],
        )
        return [body]


_ALIVE = json.dumps({"status": "ok"}).encode()
