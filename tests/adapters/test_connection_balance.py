"""Keep-alive connections spread evenly over the workers (sts.adapters.connection_balance).

The decision is a pure table; the shared counts are checked with two "workers" (pids) on one
file; then a real server (``python -m sts.serving``, 2 workers) is given 8 keep-alive
clients, three times: every time the connections end 4 and 4.  The kernel alone splits 8
connections 4/4 a quarter of the time or less, so without the balance the last test would
pass by chance one run in 50 to 100.
"""

from __future__ import annotations

import collections
import http.client
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sts.adapters.connection_balance import (
    STALE,
    ConnectionBalance,
    SharedCounts,
    create_file,
    surplus,
)

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("mine", "others", "close"),
    [
        (6, [2], True),
        (5, [3], True),
        (8, [0], True),
        (5, [2], True),  # 7 over 2: 4/3 is as fair as it gets
        (4, [3], False),
        (4, [4], False),
        (3, [5], False),  # the other one sheds
        (1, [0], False),
        (9, [], False),  # one worker: nowhere to go
        (4, [2, 2], True),  # 8 over 3: 3/3/2
        (3, [3, 2], False),
        (0, [0], False),
        # Many clients: a wobble of a few connections is left to the kernel's hash.
        (510, [490], False),
        (530, [470], True),
    ],
)
def test_who_closes_a_connection(mine: int, others: list[int], close: bool) -> None:
    assert surplus(mine, others) is close


@pytest.fixture
def counts_file(tmp_path: Path) -> Iterator[str]:
    path = create_file(str(tmp_path))
    assert os.stat(path).st_mode & 0o077 == 0  # this user's only
    yield path


def test_workers_see_each_others_counts(counts_file: str) -> None:
    one, two = SharedCounts(counts_file, pid=101), SharedCounts(counts_file, pid=102)
    try:
        assert one.publish(6, now=10.0) == []
        assert two.publish(2, now=10.1) == [6]
        assert one.publish(5, now=10.2) == [2]
        # A worker that stopped writing is gone: its slot no longer counts, and is taken again.
        assert one.publish(5, now=10.2 + STALE) == []
        three = SharedCounts(counts_file, pid=103)
        assert three.publish(1, now=10.3 + STALE) == [5]
        two.close()
        three.close()
        assert one.publish(5, now=10.4 + STALE) == []  # a closed slot is free
    finally:
        one.close()


class _Counts:
    def __init__(self, others: list[int]) -> None:
        self.others = others
        self.published: list[int] = []

    def publish(self, count: int, now: float) -> list[int]:
        self.published.append(count)
        return self.others


def test_a_worker_above_its_share_closes_one_connection_per_interval() -> None:
    now = [100.0]
    counts = _Counts([2])
    balance = ConnectionBalance(counts, clock=lambda: now[0])  # type: ignore[arg-type]
    for port in range(6):
        assert balance.after_request(f"127.0.0.1:{port}", "1.1") is False
    balance.tick()
    assert counts.published == [6]
    # HTTP/2 multiplexes: nothing to gain by closing; the next HTTP/1.1 response closes.
    assert balance.after_request("127.0.0.1:0", "2") is False
    assert balance.after_request("127.0.0.1:1", "1.1") is True
    assert balance.after_request("127.0.0.1:2", "1.1") is False  # one per interval
    balance.tick()
    assert counts.published[-1] == 5  # the closed connection no longer counts
    assert balance.after_request("127.0.0.1:2", "1.1") is True  # 5 against 2: one more
    # Connections idle for a second are not counted; a fair split closes nothing.
    counts.others = [1]
    now[0] += 1.5
    assert balance.after_request("127.0.0.1:3", "1.1") is False
    balance.tick()
    assert counts.published[-1] == 1
    assert balance.after_request("127.0.0.1:4", "1.1") is False
    assert balance.closed == 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def two_workers(tmp_path: Path) -> Iterator[int]:
    """``python -m sts.serving`` with 2 workers, serving an app that answers its worker's pid."""
    (tmp_path / "pid_app.py").write_text(
        "import os\n\n"
        "def app(environ, start_response):\n"
        "    start_response('200 OK', [('content-type', 'text/plain')])\n"
        "    return [str(os.getpid()).encode()]\n"
    )
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)])}
    proc = subprocess.Popen(
        [sys.executable, "-m", "sts.serving", "pid_app:app", "--port", str(port), "--workers", "2"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise AssertionError("the server did not start") from None
                time.sleep(0.1)
        time.sleep(1.0)  # both workers listening
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def _clients(port: int, seconds: float) -> tuple[collections.Counter[str], int]:
    """8 keep-alive clients for ``seconds``: the worker each ends on, and the closes they met."""
    stop = time.monotonic() + seconds
    where: dict[int, str] = {}
    closes = [0]
    lock = threading.Lock()

    def client(i: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        while time.monotonic() < stop:
            conn.request("GET", "/")
            answer = conn.getresponse()
            where[i] = answer.read().decode()
            if answer.getheader("connection") == "close":
                with lock:
                    closes[0] += 1
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return collections.Counter(where.values()), closes[0]


def test_eight_keep_alive_clients_end_four_on_each_worker(two_workers: int) -> None:
    splits = []
    for _ in range(3):
        by_worker, closes = _clients(two_workers, 5.0)
        splits.append((sorted(by_worker.values()), closes))
        time.sleep(ACTIVE_GAP)  # the last trial's connections no longer count
    assert [split for split, _ in splits] == [[4, 4]] * 3, splits


#: Seconds between trials, longer than a connection counts as active after its last request.
ACTIVE_GAP = 1.5
