"""A private ``redis-server`` per test run, on a free loopback port.

The machine's Redis on 6379 is shared with other people and other test runs,
so no test writes to it.  Each pytest session starts its own server (no
persistence, in a temporary directory, stopped at the end), and every test
that wants an empty database gets a database number nobody else has used in
this run, so nothing is ever flushed.  Tests that kill and restart Redis
start a server of their own with :class:`RedisProcess`.
"""

from __future__ import annotations

import itertools
import shutil
import socket
import subprocess
import time
from pathlib import Path

import redis

#: Databases per private server: every test gets a new one, none is reused or flushed.
DATABASES = 4096


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisProcess:
    """One ``redis-server`` child process bound to 127.0.0.1 on ``port``."""

    def __init__(
        self,
        directory: Path,
        *,
        port: int | None = None,
        appendonly: bool = False,
        appendfsync: str = "always",
        extra_args: tuple[str, ...] = (),
    ) -> None:
        if shutil.which("redis-server") is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
        self.directory = directory
        self.port = port or free_port()
        self.appendonly = appendonly
        self.appendfsync = appendfsync
        self.extra_args = extra_args
        self.process: subprocess.Popen[bytes] | None = None
        self._numbers = itertools.count(1)

    def start(self) -> RedisProcess:
        self.directory.mkdir(parents=True, exist_ok=True)
        args = [
            "redis-server",
            "--bind",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--databases",
            str(DATABASES),
            "--dir",
            str(self.directory),
            "--save",
            "",
            "--appendonly",
            "yes" if self.appendonly else "no",
            "--appendfsync",
            self.appendfsync,
            *self.extra_args,
        ]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                redis.Redis(port=self.port, socket_timeout=0.5).ping()
                return self
            except redis.RedisError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not start on port {self.port}") from None
                time.sleep(0.02)

    def kill(self) -> None:
        """``kill -9``: the server loses whatever it held only in memory."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def fresh_url(self) -> str:
        """The URL of a database no test of this run has used yet."""
        number = next(self._numbers)
        if number >= DATABASES:
            raise RuntimeError("private redis-server ran out of fresh databases")
        return self.url(number)


def url_of(client: redis.Redis) -> str:
    """The URL of the database ``client`` talks to (to configure an app on the same one)."""
    kwargs = client.connection_pool.connection_kwargs
    return f"redis://{kwargs['host']}:{kwargs['port']}/{kwargs['db']}"
