"""Random identifiers (:mod:`sts.protocol.identifiers`): the texts ``uuid``/``secrets`` write, from
bytes handed out once, one ``os.urandom`` call for many identifiers, none shared with a fork."""

from __future__ import annotations

import base64
import os
import threading
import uuid
from collections.abc import Iterator

import pytest

from sts.protocol import identifiers
from sts.protocol.identifiers import POOL_BYTES, random_bytes, random_hex, random_urlsafe, uuid4_text


class CountingUrandom:
    """``os.urandom`` that counts its calls and keeps what it gave."""

    def __init__(self) -> None:
        self.calls = 0
        self.given = b""
        self.urandom = os.urandom

    def __call__(self, count: int) -> bytes:
        self.calls += 1
        data = self.urandom(count)
        self.given += data
        return data


@pytest.fixture
def urandom(monkeypatch: pytest.MonkeyPatch) -> Iterator[CountingUrandom]:
    """A fresh buffer for this thread, refilled from a counting ``os.urandom``."""
    counting = CountingUrandom()
    monkeypatch.setattr(identifiers.os, "urandom", counting)
    pool = identifiers._pool
    pool.data, pool.offset = b"", 0
    yield counting
    pool.data, pool.offset = b"", 0


def test_bytes_are_handed_out_once_in_order(urandom: CountingUrandom) -> None:
    drawn = b"".join(random_bytes(n) for n in (16, 8, 16, 1, 31))
    assert drawn == urandom.given[: len(drawn)]
    assert urandom.calls == 1


def test_one_call_draws_the_bytes_of_many_identifiers(urandom: CountingUrandom) -> None:
    exchanges = POOL_BYTES // 72  # the bytes an exchange takes
    for _ in range(exchanges):
        uuid4_text(), random_hex(16), random_hex(8), uuid4_text(), random_urlsafe(16)
    assert urandom.calls == 1
    random_bytes(POOL_BYTES)  # more than is left: a refill, of the size asked for
    assert urandom.calls == 2
    assert len(set(urandom.given[i : i + 16] for i in range(0, len(urandom.given) - 15, 16))) > 1


def test_texts_are_those_of_uuid_and_secrets(urandom: CountingUrandom) -> None:
    pool = identifiers._pool

    def last(count: int) -> bytes:
        """The bytes the last call drew."""
        return pool.data[pool.offset - count : pool.offset]

    for _ in range(300):
        text = uuid4_text()
        assert text == str(uuid.UUID(bytes=last(16), version=4))
        parsed = uuid.UUID(text)
        assert parsed.version == 4 and parsed.variant == uuid.RFC_4122 and str(parsed) == text
        assert random_hex(16) == last(16).hex()
        assert random_hex(8) == last(8).hex()
        # secrets.token_urlsafe(16): base64url without padding.
        urlsafe = random_urlsafe(16)
        assert urlsafe == base64.urlsafe_b64encode(last(16)).rstrip(b"=").decode("ascii")
        assert len(urlsafe) == 22
    assert urandom.calls > 1  # the texts were checked across refills too


def test_threads_draw_different_bytes() -> None:
    drawn: list[bytes] = []
    lock = threading.Lock()

    def draw() -> None:
        value = random_bytes(64)
        with lock:
            drawn.append(value)

    threads = [threading.Thread(target=draw) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(drawn)) == 4


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_never_uses_its_parents_bytes() -> None:
    random_bytes(1)  # the buffer is filled, and the parent's next bytes are known
    pool = identifiers._pool
    parents_next = pool.data[pool.offset : pool.offset + 32]
    assert len(parents_next) == 32
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.write(writer, random_bytes(32))
        finally:
            os._exit(0)
    os.close(writer)
    childs = b""
    while chunk := os.read(reader, 64):
        childs += chunk
    os.close(reader)
    os.waitpid(pid, 0)
    assert len(childs) == 32
    assert childs != parents_next
    assert random_bytes(32) == parents_next
