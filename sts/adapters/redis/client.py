"""The Redis client of a process, the connection each thread sends its commands on, and a count
of the connections it opens."""

from __future__ import annotations

import hashlib
import os
import threading
import weakref
from collections.abc import Sequence
from typing import Any

import hiredis
import redis
from redis.connection import Connection
from redis.exceptions import NoScriptError

from ..request_threads import waiting


class ConnectionCounter:
    """Counts the connections a client opens: each new one may be to a restarted server."""

    def __init__(self) -> None:
        self.count = 0
        self._lock = threading.Lock()

    def __call__(self, connection: Any) -> None:
        # Used as redis-py's ``redis_connect_func``: do the usual handshake, then count.
        connection.on_connect()
        with self._lock:
            self.count += 1


def connect(url: str, *, timeout: float = 0.5) -> redis.Redis:
    """One client (and connection pool) per process, created at start."""
    return redis.Redis.from_url(
        url,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        health_check_interval=30,
        redis_connect_func=ConnectionCounter(),
    )


def connection_counter(client: redis.Redis) -> ConnectionCounter:
    kwargs = client.connection_pool.connection_kwargs
    counter = kwargs.get("redis_connect_func")
    if not isinstance(counter, ConnectionCounter):
        # A client not made by connect(): connections the pool makes from now on are counted
        # (those it has already made are not; connect() avoids that).
        counter = ConnectionCounter()
        kwargs["redis_connect_func"] = counter
    return counter


Arg = bytes | str | int


class Commands:
    """Sends one command on the calling thread's own connection and returns Redis's raw reply.

    What ``client.execute_command`` does on the request path, without the layers it adds to each
    command (measured here: about 30 µs of CPU for a ``GET``, 45 µs for an ``EVALSHA`` through a
    ``Script``, against 12 µs for this): the pool's checkout and release, its observability
    records, the argument encoder and the response callbacks.  Kept from it: the connection is
    one of the client's pool (its timeouts, its health check, its ``redis_connect_func``, closed
    by ``client.close()``), checked before each command as the pool checks it at each checkout
    (one closed by the server is made anew), and disconnected on an error, retried as the
    connection's ``Retry`` says (``connect()``'s client: not at all, as before).

    Each thread keeps the connection it took (the service runs a fixed set of request threads)
    and gives it back to the pool when it ends; a forked child takes its own.  Arguments are
    ``bytes``, ``str`` (UTF-8) or ``int``; replies come as hiredis parses them (``bytes``,
    ``int``, ``None``, lists); an error reply raises :class:`redis.ResponseError` (or its
    subclass), as with the client.
    """

    def __init__(self, client: redis.Redis) -> None:
        self.pool = client.connection_pool
        self._local = threading.local()

    def connection(self) -> Connection:
        local = self._local
        pid = os.getpid()
        if getattr(local, "pid", None) != pid:
            taken = self.pool.get_connection()
            # The thread's slot: when the thread ends, its values go, and the finaliser gives the
            # connection back (a connection inherited from a parent process is left alone).
            slot = _Slot(taken)
            weakref.finalize(slot, self.pool.release, taken)
            local.slot, local.pid = slot, pid
        connection: Connection = local.slot.connection
        return connection

    def sent(self) -> int:
        """How many commands the calling thread has sent (what one may have changed is read anew)."""
        sent: int = getattr(self._local, "sent", 0)
        return sent

    def __call__(self, *args: Arg) -> Any:
        local = self._local
        local.sent = getattr(local, "sent", 0) + 1
        # (hiredis's stub types the tuple as of one element.)
        packed = (hiredis.pack_command(args),)  # type: ignore[arg-type]
        with waiting():  # a round trip: another request runs meanwhile
            # The thread's first connection is opened here, and, as the pool does at each
            # checkout, a connection the server closed (a restart) or with a reply nobody read is
            # made anew before the command is sent: waits too (a handshake, a health check's
            # PING), which on a paused Redis held the turn for the socket timeout.
            connection = self.connection()
            self.pool.ensure_connection(connection)

            def send() -> Any:
                connection.send_packed_command(packed)  # type: ignore[no-untyped-call]
                return connection.read_response()

            return connection.retry.call_with_retry(send, lambda _error: connection.disconnect())  # type: ignore[no-untyped-call]


_COMMANDS: weakref.WeakKeyDictionary[redis.Redis, Commands] = weakref.WeakKeyDictionary()
_COMMANDS_LOCK = threading.Lock()


def commands(client: redis.Redis) -> Commands:
    """The client's :class:`Commands`: one per client, so that a thread keeps one connection."""
    with _COMMANDS_LOCK:
        found = _COMMANDS.get(client)
        if found is None:
            found = _COMMANDS[client] = Commands(client)
        return found


class _Slot:
    __slots__ = ("__weakref__", "connection")

    def __init__(self, connection: Connection) -> None:
        self.connection = connection


class LuaScript:
    """A Lua script run by its SHA1 (``EVALSHA``), loaded the first time Redis does not know it
    (``SCRIPT LOAD``: at the first use, and after a restart), as redis-py's ``Script`` does.

    See https://redis.io/docs/latest/commands/evalsha/ and .../script-load/.
    """

    def __init__(self, commands: Commands, source: str) -> None:
        self.commands = commands
        self.source = source.encode()
        self.sha = hashlib.sha1(self.source).hexdigest().encode()  # noqa: S324 (Redis names scripts so)

    def __call__(self, keys: Sequence[bytes], args: Sequence[Arg]) -> Any:
        try:
            return self.commands(b"EVALSHA", self.sha, len(keys), *keys, *args)
        except NoScriptError:
            self.commands(b"SCRIPT", b"LOAD", self.source)
            return self.commands(b"EVALSHA", self.sha, len(keys), *keys, *args)
