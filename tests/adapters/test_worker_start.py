"""A worker that cannot build its application answers 503 and tries again, rather than exit (granian
takes an early exit for a crash loop and stops the whole server)."""

from __future__ import annotations

import json
import time
from typing import Any

from sts.adapters.worker_process import StartingApp, load_or_wait
from sts.errors import ConfigurationError


def _call(app: Any, path: str) -> tuple[str, dict[str, str], dict[str, Any]]:
    seen: dict[str, Any] = {}

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> None:
        seen["status"], seen["headers"] = status, dict(headers)

    body = b"".join(app({"PATH_INFO": path, "REQUEST_METHOD": "GET"}, start_response))
    return seen["status"], seen["headers"], json.loads(body)


def _ok(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    start_response("200 OK", [("Content-Type", "application/json")])
    return [b'{"built": true}']


def test_a_worker_that_cannot_start_answers_503_then_serves_once_it_can() -> None:
    attempts: list[int] = []

    def load() -> Any:
        attempts.append(1)
        if len(attempts) < 3:
            raise ConfigurationError("keys directory unreadable")
        return _ok

    app = load_or_wait(load, retry=0.05)
    assert isinstance(app, StartingApp)
    status, headers, body = _call(app, "/token")
    assert status.startswith("503") and body["error"] == "temporarily_unavailable"
    assert headers["Retry-After"] == "1" and headers["Cache-Control"] == "no-store"
    status, _, body = _call(app, "/readyz")
    assert status.startswith("503")
    # Alive: it recovers by itself; restarting the instance would take its healthy workers too.
    status, _, body = _call(app, "/livez")
    assert status == "200 OK" and body == {"status": "ok"}
    end = time.monotonic() + 10
    while app.app is None and time.monotonic() < end:
        time.sleep(0.01)
    assert len(attempts) == 3
    assert _call(app, "/token") == ("200 OK", {"Content-Type": "application/json"}, {"built": True})


def test_a_worker_that_starts_gets_its_application_itself() -> None:
    assert load_or_wait(lambda: _ok) is _ok
