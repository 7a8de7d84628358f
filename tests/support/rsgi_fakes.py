"""What granian hands an RSGI application, faked: a request's scope and the protocol it answers on."""

from __future__ import annotations

import asyncio


class FakeHeaders:
    def __init__(self, values: dict[str, str]) -> None:
        self._values = values

    def get(self, name: str, default: str | None = None) -> str | None:
        return self._values.get(name, default)

    def get_all(self, name: str) -> list[str]:
        return [self._values[name]] if name in self._values else []

    def keys(self) -> list[str]:
        return list(self._values)

    def items(self) -> list[tuple[str, str]]:
        return list(self._values.items())


class FakeScope:
    proto = "http"
    method = "GET"
    query_string = ""
    server = "127.0.0.1:8080"
    client = "127.0.0.1:40000"
    scheme = "http"
    http_version = "1.1"

    def __init__(self, path: str) -> None:
        self.path = path
        self.headers = FakeHeaders({"host": "sts", "x-request-id": f"req{path}"})


class FakeProto:
    """``hangs_up_after``: seconds after which ``client_disconnect()`` resolves (None: never)."""

    def __init__(self, hangs_up_after: float | None = None) -> None:
        self.answer: tuple[int, dict[str, str], bytes] | None = None
        self.hangs_up_after = hangs_up_after

    async def client_disconnect(self) -> None:
        if self.hangs_up_after is None:
            await asyncio.Event().wait()
        else:
            await asyncio.sleep(self.hangs_up_after)

    def response_bytes(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        self.answer = (status, dict(headers), body)
