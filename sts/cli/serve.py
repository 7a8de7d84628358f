"""``sts serve``: run the service under granian, with its metrics listener."""

from __future__ import annotations

import errno
import functools
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from ..errors import ConfigurationError
from ..settings import Settings
from .context import settings_from

if TYPE_CHECKING:
    from ..adapters.policy_files import PolicySources

log = logging.getLogger(__name__)


@click.command()
@click.option("--host", default=None, help="Listen address (setting host).")
@click.option("--port", type=int, default=None, help="Listen port (setting port).")
@click.option("--workers", type=int, default=None, help="Worker processes (setting workers).")
@click.option("--threads", type=int, default=None, help="Threads per worker (setting threads).")
@click.option("--metrics-listen", default=None, help="HOST:PORT of /metrics (setting metrics_listen).")
@click.pass_context
def serve(
    ctx: click.Context,
    host: str | None,
    port: int | None,
    workers: int | None,
    threads: int | None,
    metrics_listen: str | None,
) -> None:
    """Run the service (granian; keys and database are created on first start)."""
    from ..adapters import metrics_exposition as metrics
    from ..adapters.log_format import configure_logging

    settings = settings_from(
        ctx, host=host, port=port, workers=workers, threads=threads, metrics_listen=metrics_listen
    )
    configure_logging(settings.log_level, settings.log_format)
    # Before any metric exists: every worker writes its values where this process's listener
    # adds them up (prometheus_client's multiprocess mode), in a directory of this instance.
    metrics_dir, owned = metrics.enable_multiprocess() if settings.metrics_address else (None, False)
    follower = functools.partial(summary_follower, ctx.obj.get("config")) if settings.review.enabled else None
    try:
        _serve(settings, metrics_dir, follower)
    except click.ClickException as exc:
        # (A host that is no IP address is refused with the settings, naming --host there.)
        if (host is not None or port is not None) and exc.message.startswith("settings host and port:"):
            given = " and ".join(f"--{name}" for name, value in (("host", host), ("port", port)) if value)
            raise click.ClickException(f"option {given}: {exc.message}") from None
        raise
    finally:
        if metrics_dir is not None and owned:
            metrics.remove_directory(metrics_dir)


def release_before_fork(runtime: Any) -> None:
    """Close every connection the parent's check opened: the database's, the rate limits' (a file of
    their own on SQLite) and Redis's.  A SQLite connection carried across a fork leaves the child
    believing it holds its parent's locks: it takes none, and another process may then delete the
    ``-wal`` and ``-shm`` under it."""
    from ..adapters.sql.rate_limits import dispose_rate_limit_engines

    runtime.engine.dispose()
    dispose_rate_limit_engines()
    if runtime.redis_client is not None:
        epoch = getattr(runtime.replay, "epoch", None)
        if epoch is not None:  # its eviction watcher would open a connection again
            epoch.unwatched.set()
        runtime.redis_client.close()


def summary_follower(config: Path | None) -> subprocess.Popen[bytes]:
    """``sts audit summarize --follow`` (:mod:`sts.adapters.summary_follower`) for the review page,
    as a process of its own at the lowest CPU priority, ended with this one (its ``--parent``)."""
    command = [sys.executable, "-c", "from sts.cli import main; main()"]
    if config is not None:
        command += ["--config", str(config)]
    command += ["audit", "summarize", "--follow", "--parent", str(os.getpid())]
    # The command is this interpreter and fixed arguments (the configuration's path at most).
    return subprocess.Popen(command, stdin=subprocess.DEVNULL, process_group=0)  # noqa: S603


Follower = Callable[[], "subprocess.Popen[bytes]"]

#: Seconds before a follower that ended is started again, doubling up to :data:`RESTART_MAX_PAUSE`
#: while it keeps ending (back to the first once one ran that long).
RESTART_FIRST_PAUSE = 1.0
RESTART_MAX_PAUSE = 60.0


class KeptRunning:
    """A child process started again whenever it ends, until :meth:`stop`: the summary follower,
    which a crash, the kernel's out-of-memory killer or an operator's ``kill`` would otherwise end
    for good (the review page then summarised on its own again, slowly under a flood).  Each
    ending is logged with its exit status; the pause before the next start doubles while it keeps
    ending soon after its start."""

    def __init__(self, start: Follower) -> None:
        self._start = start
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self.restarts = 0
        self.process = start()
        self._watcher = threading.Thread(target=self._watch, name="sts-follower-watch", daemon=True)
        self._watcher.start()

    def _watch(self) -> None:
        pause = RESTART_FIRST_PAUSE
        while True:
            started = time.monotonic()
            status = self.process.wait()
            if self._stopping.is_set():
                return
            if time.monotonic() - started >= RESTART_MAX_PAUSE:
                pause = RESTART_FIRST_PAUSE
            log.warning("summary follower ended (exit status %s); starting it again in %.0f s", status, pause)
            if self._stopping.wait(pause):
                return
            with self._lock:
                if self._stopping.is_set():
                    return
                try:
                    self.process = self._start()
                except OSError as exc:  # no process to be had now (EAGAIN, ENOMEM): try again later
                    log.warning("summary follower not started again: %s", exc)
                    pause = min(pause * 2, RESTART_MAX_PAUSE)
                    continue
                self.restarts += 1
            pause = min(pause * 2, RESTART_MAX_PAUSE)

    def stop(self) -> None:
        with self._lock:
            self._stopping.set()
            process = self.process
        _stop(process)
        self._watcher.join(timeout=10)


def _serve(settings: Settings, metrics_dir: Path | None, follower: Follower | None = None) -> None:
    from .. import serving
    from ..adapters import metrics_exposition as metrics
    from ..adapters.jwks import files_read
    from ..adapters.policy_files import read_policy_sources
    from ..app import create_app, prepare
    from ..http.responses import request_id

    try:
        in_use = port_in_use(settings.host, settings.port)
    except (socket.gaierror, UnicodeError) as exc:  # a host that does not resolve, or no IDNA name
        reason = getattr(exc, "strerror", None) or exc
        raise click.ClickException(f"setting host: cannot listen on {settings.host!r} ({reason})") from None
    except OSError as exc:  # an address not on this machine, a port it may not bind: either setting
        raise click.ClickException(
            f"settings host and port: cannot listen on {settings.host!r} port {settings.port} "
            f"({exc.strerror or exc})"
        ) from None
    if in_use:
        raise click.ClickException(f"{settings.host}:{settings.port} is already in use")
    listener: metrics.MetricsServer | None = None
    summarizing: KeptRunning | None = None
    if settings.metrics_address is not None and metrics_dir is not None:
        collector = metrics.ExpositionCollector(directory=metrics_dir)
        try:
            listener = metrics.MetricsServer(
                *settings.metrics_address, metrics.exposition_registry(collector)
            )
        except OSError as exc:
            raise click.ClickException(f"metrics_listen {settings.metrics_listen}: {exc.strerror}") from None
    try:
        try:
            prepare(settings)
            # The policy files are read once, here: every worker compiles these texts, a worker
            # replacing one that died too, whatever the files hold by then (one policy per instance).
            policy_sources = read_policy_sources(settings.policies_dir)
            # Build once in the parent too, so a bad policy or key stops the start here, with its message.
            checked = create_app(settings, policy_sources=policy_sources)
        except ConfigurationError as exc:
            raise click.ClickException(str(exc)) from None
        # The workers open their own pools; the check's connections must not be inherited by them.
        runtime = checked.extensions["sts"]
        release_before_fork(runtime)
        if listener is not None:
            # The signing keys' ages are read, when scraped, from this process's copy of the key ring.
            collector.key_entries = functools.partial(_key_entries, runtime.keyring)
            # A first scrape imports what scrapes need before the workers are forked from this process.
            metrics.prometheus_text(collector)
            listener.start()
            click.echo(
                f"sts: metrics on http://{settings.metrics_listen}{metrics.METRICS_PATH} "
                f"(worker values in {metrics_dir})",
                err=True,
            )

        # Once the schema is migrated (prepare, above).
        summarizing = KeptRunning(follower) if follower is not None else None
        click.echo(
            f"sts: serving {settings.issuer} on http://{settings.host}:{settings.port} "
            f"({settings.workers} workers x {settings.threads} threads, "
            f"{settings.active_threads} running at once, store={settings.store})",
            err=True,
        )
        serving.serve(
            functools.partial(worker_app, settings, policy_sources, files_read()),
            host=settings.host,
            port=settings.port,
            workers=settings.workers,
            limits=serving.Limits(
                threads=settings.threads,
                active_threads=settings.active_threads,
                header_read_timeout=settings.header_read_timeout,
                body_read_timeout=settings.body_read_timeout,
                max_body_bytes=settings.max_body_bytes,
                max_connections=settings.max_connections,
                queue_timeout=settings.request_queue_timeout,
            ),
            log_level=settings.log_level,
            request_id=request_id,
        )
    finally:
        if listener is not None:
            listener.stop()
        if summarizing is not None:
            summarizing.stop()


def _stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def worker_app(
    settings: Settings, policy_sources: PolicySources | None = None, key_files: dict[str, bytes] | None = None
) -> Any:
    """A worker's application, its policy compiled from ``policy_sources`` and its key-set files
    read from ``key_files`` (what the main process read), its PostgreSQL request pool opened
    before the first request (:func:`~sts.adapters.sql.engines.open_request_pool`)."""
    from ..adapters.jwks import use_file_snapshot
    from ..adapters.sql.engines import open_request_pool
    from ..app import create_app

    if key_files is not None:
        use_file_snapshot(key_files)

    app = create_app(settings, policy_sources=policy_sources)
    open_request_pool(app.extensions["sts"].engine)
    return app


def _key_entries(keyring: Any) -> list[Any]:
    keyring.reload_if_changed(time.time())
    return list(keyring.entries())


def port_in_use(host: str, port: int) -> bool:
    """Whether something already listens on ``host:port``.

    The workers bind with ``SO_REUSEPORT``, which would let a second service on the same port
    silently share its connections; a plain bind (with ``SO_REUSEADDR``, so connections in
    TIME_WAIT do not count) finds out.
    """
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return True
            raise  # not in use: an address not on this machine, a port it may not bind (the caller says)
    return False
