"""The Redis client of a process, and a count of the connections it opens."""

from __future__ import annotations

import threading
from typing import Any

import redis


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
