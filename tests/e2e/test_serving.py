"""`sts serve` on its real server: slow and idle clients, deadlines, the connection limit, shutdown,
and what malformed HTTP gets back (issue 9 item 1; issue 8, errors of the HTTP server itself).

Every test talks to a real `sts serve` process over loopback sockets, the way a client (or an
attacker) would.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from sts.adapters.sql.audit_sink import SqlAuditSink
from sts.adapters.sql.engines import make_engine
from sts.dev.issuer import DevIssuer, RunningServer
from sts.errors import ConfigurationError
from sts.serving import per_worker_connections
from sts.settings.load import load_settings
from tests.conftest import DEFAULT_POLICY, JWT_TYPE, TOKEN_EXCHANGE
from tests.support.review_support import review_settings

STS = str(Path(sys.executable).with_name("sts"))
#: Connections held open by the slow-client test: a third idle, a third mid-headers, a third mid-body.
SLOW_CLIENTS = 210
SLOW_STARTS = (
    b"",
    b"POST /token HTTP/1.1\r\nHost: sts\r\nContent-Type: application/x-www-form-urlencoded\r\n",
    b"POST /token HTTP/1.1\r\nHost: sts\r\nContent-Type: application/x-www-form-urlencoded\r\n"
    b"Content-Length: 900\r\n\r\ngrant_type=urn",
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Served:
    """One `sts serve` process with its own directory, port and settings."""

    def __init__(
        self,
        directory: Path,
        upstream: RunningServer,
        *,
        port: int | None = None,
        args: tuple[str, ...] = (),
        **settings: Any,
    ) -> None:
        self.port = port or _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.directory = directory
        (directory / "policies").mkdir()
        # The anonymous rule only: no clients are registered here.
        policy = {"version": 1, "rules": [DEFAULT_POLICY["rules"][0]]}
        (directory / "policies" / "test.yaml").write_text(yaml.safe_dump(policy))
        config = {
            "issuer": self.url,
            "port": self.port,
            "database_url": f"sqlite:///{directory / 'sts.sqlite'}",
            "keys_dir": "keys",
            "policies_dir": "policies",
            "issuers": [
                {
                    "name": "upstream",
                    "issuer": upstream.issuer.issuer_url,
                    "jwks_uri": upstream.jwks_uri,
                    "algorithms": ["RS256"],
                    "audiences": [self.url],
                }
            ],
            **settings,
        }
        self.config = directory / "sts.yaml"
        self.config.write_text(yaml.safe_dump(config))
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("STS_")}
        self.log = directory / "serve.log"
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [STS, "--config", str(self.config), "serve", *args],
                cwd=directory,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        end = time.monotonic() + 30
        while time.monotonic() < end:
            try:
                if requests.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return
            except requests.RequestException:
                pass
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        self.stop()
        raise AssertionError(f"sts serve did not come up:\n{self.log.read_text()}")

    def connect(self, data: bytes = b"") -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        if data:
            sock.sendall(data)
        return sock

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
                return None
        return self.proc.returncode


@pytest.fixture(scope="module")
def upstream_issuer() -> Iterator[RunningServer]:
    with DevIssuer.serve_ephemeral(alg="RS256") as server:
        yield server


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, upstream_issuer: RunningServer) -> Iterator[Served]:
    """`sts serve` with its default workers, threads, deadlines and connection limit."""
    server = Served(tmp_path_factory.mktemp("served"), upstream_issuer)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def short(tmp_path_factory: pytest.TempPathFactory, upstream_issuer: RunningServer) -> Iterator[Served]:
    """One worker with one-second deadlines and the smallest connection limit."""
    server = Served(
        tmp_path_factory.mktemp("short"),
        upstream_issuer,
        workers=1,
        header_read_timeout=1,
        body_read_timeout=1,
        max_connections=16,
    )
    try:
        yield server
    finally:
        server.stop()


def _exchange_form(token: str) -> dict[str, str]:
    return {
        "grant_type": TOKEN_EXCHANGE,
        "subject_token": token,
        "subject_token_type": JWT_TYPE,
        "audience": "https://deploy.example.com",
    }


def _read_all(sock: socket.socket, timeout: float = 5.0) -> bytes:
    """Everything the server sends until it closes the connection (or ``timeout`` passes)."""
    sock.settimeout(timeout)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except TimeoutError:
        return data + b"<still open>"
    except ConnectionResetError:
        return data + b"<reset>"
    return data


def _raw(served: Served, request: bytes) -> bytes:
    with served.connect(request) as sock:
        return _read_all(sock)


def _response(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, body


def _still_open(sock: socket.socket) -> bool:
    """Neither closed nor answered by the server."""
    sock.setblocking(False)
    try:
        sock.recv(1, socket.MSG_PEEK)
    except BlockingIOError:
        return True
    except OSError:
        return False
    return False


# -- slow and idle clients -----------------------------------------------------------------------


def test_slow_and_idle_connections_do_not_starve_other_clients(
    served: Served, upstream_issuer: RunningServer
) -> None:
    """Issue 9 item 1: with 200 slow connections held open, /healthz and exchanges answer within 1 s.

    Starved requests would wait for a slot until the slow clients' 10 s header deadline (or for
    good): every answer must come within 5 s, and the median of five rounds within 1 s.  One
    answer over a second is tolerated, not starvation: the machine is shared (a CI run once saw
    one /healthz take 1.24 s, every other answer within 0.05 s).
    """
    held = [served.connect(SLOW_STARTS[i % 3]) for i in range(SLOW_CLIENTS)]
    try:
        session = requests.Session()
        health_times, exchange_times = [], []
        for _ in range(5):
            started = time.monotonic()
            health = session.get(f"{served.url}/healthz", timeout=5)
            health_times.append(time.monotonic() - started)
            assert health.status_code == 200
            token = upstream_issuer.issuer.github_actions_token(audience=served.url)
            started = time.monotonic()
            granted = requests.post(f"{served.url}/token", data=_exchange_form(token), timeout=5)
            exchange_times.append(time.monotonic() - started)
            assert granted.status_code == 200, granted.text
        assert statistics.median(health_times) < 1.0, health_times
        assert statistics.median(exchange_times) < 1.0, exchange_times
        # They were held all along: neither closed nor answered.
        assert all(_still_open(sock) for sock in held)
    finally:
        for sock in held:
            sock.close()


def test_deadlines_close_slow_heads_and_answer_slow_bodies(short: Served) -> None:
    idle = short.connect()
    slow_head = short.connect(b"POST /token HTTP/1.1\r\nHost: sts\r\n")
    slow_body = short.connect(
        b"POST /token HTTP/1.1\r\nHost: sts\r\nX-Request-Id: slow-body-1\r\n"
        b"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 100\r\n\r\ngrant_type="
    )
    keep_alive = short.connect(b"GET /healthz HTTP/1.1\r\nHost: sts\r\n\r\n")
    started = time.monotonic()
    try:
        assert _read_all(idle) == b""
        assert _read_all(slow_head) == b""
        status, headers, body = _response(_read_all(slow_body))
        assert status == 408
        assert json.loads(body)["error"] == "invalid_request"
        assert headers["x-request-id"] == "slow-body-1" and headers["connection"] == "close"
        # A keep-alive connection is answered, then closed once idle for the header deadline.
        answered = _read_all(keep_alive)
        assert answered.startswith(b"HTTP/1.1 200 ") and answered.endswith(b'{"status":"ok"}')
        # The deadlines are 1 s; without them these connections stay open for minutes.
        assert time.monotonic() - started < 4.5
    finally:
        for sock in (idle, slow_head, slow_body, keep_alive):
            sock.close()


def test_connections_beyond_the_limit_wait_until_one_is_freed(short: Served) -> None:
    """max_connections 16 on one worker: the 17th connection is served only when one of 16 idle
    ones reaches the header deadline (1 s) and is closed."""
    held = [short.connect() for _ in range(16)]
    try:
        started = time.monotonic()
        assert requests.get(f"{short.url}/healthz", timeout=5).status_code == 200
        waited = time.monotonic() - started
        assert 0.5 < waited < 4.0, waited
    finally:
        for sock in held:
            sock.close()
    started = time.monotonic()
    assert requests.get(f"{short.url}/healthz", timeout=5).status_code == 200
    assert time.monotonic() - started < 0.5


def test_a_body_cut_short_never_reaches_the_application(
    served: Served, upstream_issuer: RunningServer
) -> None:
    """A client that promises more body than it sends, then hangs up: the complete-looking form it
    did send is not exchanged (nothing is audited for it), while the same request sent whole is."""
    audit = SqlAuditSink(make_engine(f"sqlite:///{served.directory / 'sts.sqlite'}"))

    def request(request_id: str, extra_length: int) -> bytes:
        token = upstream_issuer.issuer.github_actions_token(audience=served.url)
        form = "&".join(f"{k}={v}" for k, v in _exchange_form(token).items()).encode()
        return (
            f"POST /token HTTP/1.1\r\nHost: sts\r\nX-Request-Id: {request_id}\r\nConnection: close\r\n"
            f"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {len(form) + extra_length}"
            "\r\n\r\n"
        ).encode() + form

    with served.connect(request("cut-short-1", 50)):
        time.sleep(0.2)  # the head and the form reach the server before the hang-up
    assert _response(_raw(served, request("whole-1", 0)))[0] == 200
    seen: set[str] = set()
    end = time.monotonic() + 5
    while "whole-1" not in seen and time.monotonic() < end:
        seen = {r["request_id"] for r in audit.recent(50)}
        time.sleep(0.05)
    time.sleep(0.5)
    seen = {r["request_id"] for r in audit.recent(50)}
    assert "whole-1" in seen and "cut-short-1" not in seen


def test_a_body_ended_by_a_half_close_is_answered_400(served: Served) -> None:
    """The client sends part of the body it announced, then ends its side (``shutdown(SHUT_WR)``)
    and reads: a 400 with a JSON error, not granian's bare 500 for a request left unanswered."""
    form = b"grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Atoken-exchange"
    request = (
        f"POST /token HTTP/1.1\r\nHost: sts\r\nContent-Type: application/x-www-form-urlencoded\r\n"
        f"Content-Length: {len(form) + 40}\r\n\r\n"
    ).encode() + form
    with served.connect(request) as sock:
        sock.shutdown(socket.SHUT_WR)
        status, headers, body = _response(_read_all(sock))
    assert status == 400, body
    assert json.loads(body)["error"] == "invalid_request" and headers.get("x-request-id")


# -- what malformed HTTP gets --------------------------------------------------------------------

_HOST = b"Host: sts\r\nConnection: close\r\n"
#: Refused by the HTTP server (hyper) before the application sees them: a bare status line,
#: an empty body, no request id (documented in the README).
SERVER_REFUSALS = {
    "bad request line": (b"GARBAGE\r\n\r\n", 400),
    "bad method": (b"G@T / HTTP/1.1\r\n" + _HOST + b"\r\n", 400),
    "bad HTTP version": (b"GET / HTTP/9.9\r\n" + _HOST + b"\r\n", 400),
    "header block over 16 KiB": (
        b"GET /healthz HTTP/1.1\r\n"
        + _HOST
        + b"".join(b"X-Pad-%d: %s\r\n" % (i, b"a" * 1000) for i in range(17))
        + b"\r\n",
        431,
    ),
    "too many headers": (
        b"GET /healthz HTTP/1.1\r\n" + _HOST + b"".join(b"X-H%d: 1\r\n" % i for i in range(120)) + b"\r\n",
        431,
    ),
    "request line over 16 KiB": (b"GET /" + b"a" * 17000 + b" HTTP/1.1\r\n" + _HOST + b"\r\n", 431),
    "Content-Length not a number": (
        b"POST /token HTTP/1.1\r\n" + _HOST + b"Content-Length: abc\r\n\r\n",
        400,
    ),
    "Content-Length negative": (b"POST /token HTTP/1.1\r\n" + _HOST + b"Content-Length: -1\r\n\r\n", 400),
    "Content-Length overflowing": (
        b"POST /token HTTP/1.1\r\n" + _HOST + b"Content-Length: 99999999999999999999999\r\n\r\n",
        400,
    ),
    "two different Content-Lengths": (
        b"POST /token HTTP/1.1\r\n" + _HOST + b"Content-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
        400,
    ),
    "Transfer-Encoding not ending in chunked": (
        b"POST /token HTTP/1.1\r\n" + _HOST + b"Transfer-Encoding: gzip\r\n\r\nabc",
        400,
    ),
    "unknown Transfer-Encoding": (
        b"POST /token HTTP/1.1\r\n" + _HOST + b"Transfer-Encoding: bogus\r\n\r\n",
        400,
    ),
    "header without a colon": (b"GET /healthz HTTP/1.1\r\n" + _HOST + b"NoColon\r\n\r\n", 400),
    "space before the colon": (b"GET /healthz HTTP/1.1\r\n" + _HOST + b"X-A : 1\r\n\r\n", 400),
    "obsolete line folding": (b"GET /healthz HTTP/1.1\r\n" + _HOST + b"X-A: 1\r\n  folded\r\n\r\n", 400),
    "NUL in a header": (b"GET /healthz HTTP/1.1\r\n" + _HOST + b"X-A: a\x00b\r\n\r\n", 400),
}


@pytest.mark.parametrize("case", sorted(SERVER_REFUSALS))
def test_the_http_server_refuses_malformed_requests_with_an_empty_body(served: Served, case: str) -> None:
    request, expected = SERVER_REFUSALS[case]
    raw = _raw(served, request)
    status, headers, body = _response(raw)
    assert status == expected
    # Not HTML, nothing about the server or the request: a status line, a length of 0, a close.
    assert body == b"" and headers["content-length"] == "0" and headers["connection"] == "close"
    assert set(headers) <= {"content-length", "connection", "date"}


#: Refused by `sts serve` itself before the application: JSON, no-store, with a request id.
ADAPTER_REFUSALS = {
    "chunked body": (
        b"POST /token HTTP/1.1\r\n" + _HOST + b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        411,
    ),
    "chunked body with a Content-Length": (
        b"POST /token HTTP/1.1\r\n" + _HOST + b"Transfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n"
        b"3\r\nabc\r\n0\r\n\r\n",
        411,
    ),
    "body over max_body_bytes": (
        b"POST /token HTTP/1.1\r\n" + _HOST + b"Expect: 100-continue\r\nContent-Length: 16385\r\n\r\n",
        413,
    ),
    "header value not ASCII": (b"GET /healthz HTTP/1.1\r\n" + _HOST + b"X-Note: caf\xc3\xa9\r\n\r\n", 400),
    # RFC 9112 §3.2: an HTTP/1.1 request without Host, or with two, or with an invalid one (each
    # reached the application, and a token was issued for one without Host).
    "no Host": (b"POST /token HTTP/1.1\r\nX-Request-Id: caller-42\r\nContent-Length: 3\r\n\r\nabc", 400),
    "two Host lines": (b"GET /healthz HTTP/1.1\r\n" + _HOST + b"Host: other\r\n\r\n", 400),
    # RFC 9110 §8.3: one media type (the application read the last of two, a proxy may read the first).
    "two Content-Type lines": (
        b"GET /.well-known/oauth-authorization-server HTTP/1.1\r\n" + _HOST + b"Content-Type: text/plain\r\n"
        b"Content-Type: application/x-www-form-urlencoded\r\n\r\n",
        400,
    ),
    "invalid Host": (
        b"GET /healthz HTTP/1.1\r\n" + _HOST.replace(b"sts", b"sts b/c") + b"X-Request-Id: caller-42\r\n\r\n",
        400,
    ),
}


@pytest.mark.parametrize("case", sorted(ADAPTER_REFUSALS))
def test_refusals_before_the_application_are_json_with_a_request_id(served: Served, case: str) -> None:
    request, expected = ADAPTER_REFUSALS[case]
    request = request.replace(b"Host: sts\r\n", b"Host: sts\r\nX-Request-Id: caller-42\r\n")
    status, headers, body = _response(_raw(served, request))
    assert status == expected
    assert headers["content-type"] == "application/json" and headers["cache-control"] == "no-store"
    assert json.loads(body)["error"] == "invalid_request"
    assert headers["x-request-id"] == "caller-42"


@pytest.mark.parametrize("case", ["body over max_body_bytes", "chunked body with a Content-Length"])
def test_a_repeated_request_id_is_replaced_before_the_application_too(served: Served, case: str) -> None:
    """The README: a repeated X-Request-Id is no acceptable id, and a new one is made; answers given
    before the application echoed the first (an outside audit)."""
    request, expected = ADAPTER_REFUSALS[case]
    twice = b"Host: sts\r\nX-Request-Id: first-id\r\nX-Request-Id: second-id\r\n"
    status, headers, _ = _response(_raw(served, request.replace(b"Host: sts\r\n", twice)))
    assert status == expected
    assert headers["x-request-id"] not in ("first-id", "second-id", "first-id, second-id")
    assert re.fullmatch(r"[0-9a-f-]{36}", headers["x-request-id"]), headers["x-request-id"]


def test_requests_the_server_accepts_reach_the_application_and_get_json(served: Served) -> None:
    for request, expected in (
        (b"GET /%FF/x HTTP/1.1\r\n" + _HOST + b"\r\n", 404),
        ("GET /é HTTP/1.1\r\n".encode() + _HOST + b"\r\n", 404),
        (b"GET http://elsewhere/healthz HTTP/1.1\r\n" + _HOST + b"\r\n", 200),
        (b"POST /token HTTP/1.1\r\n" + _HOST + b"Content-Length: 3\r\nContent-Length: 3\r\n\r\nabc", 400),
        (b"GET /healthz HTTP/1.0\r\n\r\n", 200),
        (b"GET /healthz HTTP/1.1\r\nHost: [::1]:8080\r\nConnection: close\r\n\r\n", 200),
        (b"GET /healthz HTTP/1.1\r\nHost: \r\nConnection: close\r\n\r\n", 200),
        # Werkzeug matched these by stripping leading slashes and upper-casing the method.
        (b"POST //token HTTP/1.1\r\n" + _HOST + b"Content-Length: 3\r\n\r\nabc", 404),
        (b"GET ///healthz HTTP/1.1\r\n" + _HOST + b"\r\n", 404),
        (b"post /token HTTP/1.1\r\n" + _HOST + b"Content-Length: 3\r\n\r\nabc", 405),
        (b"head /.well-known/jwks.json HTTP/1.1\r\n" + _HOST + b"\r\n", 405),
    ):
        status, headers, body = _response(_raw(served, request))
        assert status == expected, request
        assert headers["content-type"] == "application/json" and headers["x-request-id"]
        json.loads(body)
        if status == 405:
            assert "POST" in headers["allow"] or "GET" in headers["allow"]


def test_a_header_name_with_an_underscore_is_not_read_as_its_dashed_twin(served: Served) -> None:
    """``X_Request_Id`` (or ``X_Client_Cert``) must not stand in for the header a proxy sets."""
    raw = _raw(served, b"GET /healthz HTTP/1.1\r\n" + _HOST + b"X_Request_Id: spoofed\r\n\r\n")
    status, headers, _ = _response(raw)
    assert status == 200 and headers["x-request-id"] != "spoofed"


# -- start and stop ------------------------------------------------------------------------------


def test_a_second_service_on_the_same_port_refuses_to_start(served: Served) -> None:
    """The workers bind with SO_REUSEPORT, which would let a second service share the port."""
    second = subprocess.run(
        [STS, "--config", str(served.config), "serve"],
        cwd=served.directory,
        env=served.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert second.returncode != 0
    assert f"127.0.0.1:{served.port} is already in use" in second.stderr


def test_sigterm_finishes_the_request_in_flight_then_exits(
    tmp_path: Path, upstream_issuer: RunningServer
) -> None:
    port = _free_port()
    # The command-line flags win over the file (workers 2, threads 8 by default).
    flags = ("--host", "127.0.0.1", "--port", str(port), "--workers", "1", "--threads", "2")
    server = Served(tmp_path, upstream_issuer, port=port, args=flags)
    try:
        assert "(1 workers x 2 threads" in server.log.read_text()
        body = b"grant_type=nonsense"
        in_flight = server.connect(
            b"POST /token HTTP/1.1\r\nHost: sts\r\nContent-Type: application/x-www-form-urlencoded\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body) + body[:5]
        )
        time.sleep(0.2)  # the request has reached the worker
        server.proc.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        in_flight.sendall(body[5:])
        status, _, answer = _response(_read_all(in_flight))
        assert status == 400 and json.loads(answer)["error"] == "unsupported_grant_type"
        assert server.proc.wait(timeout=20) == 0
    finally:
        server.stop()


def children_of(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (Linux /proc)."""
    found = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            lines = status.read_text().splitlines()
        except OSError:
            continue
        ppid = next((line.split()[1] for line in lines if line.startswith("PPid:")), None)
        if ppid == str(pid):
            found.append(int(status.parent.name))
    return found


def test_the_workers_end_with_a_main_process_killed_outright(
    tmp_path: Path, upstream_issuer: RunningServer
) -> None:
    """``kill -9`` of the main process (an OOM kill): its workers end too, rather than serving on the
    shared port with what they loaded and nobody watching them (PR_SET_PDEATHSIG)."""
    server = Served(tmp_path, upstream_issuer, args=("--workers", "2"))
    workers = children_of(server.proc.pid)
    try:
        assert len(workers) == 2, workers
        server.proc.kill()
        server.proc.wait(timeout=10)
        # A worker still starting ends once it has loaded; one serving ends gracefully: give both
        # time on a busy machine.
        end = time.monotonic() + 45
        while time.monotonic() < end and any(Path(f"/proc/{pid}").exists() for pid in workers):
            time.sleep(0.1)
        alive = [pid for pid in workers if Path(f"/proc/{pid}").exists()]
        assert alive == [], "workers outlived the main process"
        with pytest.raises(requests.RequestException):
            requests.get(f"{server.url}/livez", timeout=2)
    finally:
        for pid in workers:  # Whatever happened, none is left behind.
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        server.stop()


def _command_line(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    except OSError:
        return []


def _nice(pid: int) -> int:
    """Field 19 of /proc/PID/stat (proc(5)), counted after the command's closing parenthesis."""
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[16])


def _summarised_up_to(database: Path) -> int:
    with sqlite3.connect(database) as conn:
        row = conn.execute("SELECT last_id FROM audit_summary_state").fetchone()
    return int(row[0]) if row else 0


def test_the_review_page_gets_a_summary_follower_that_ends_with_the_server(
    tmp_path: Path, upstream_issuer: RunningServer
) -> None:
    """With the review page enabled, ``sts serve`` runs ``sts audit summarize --follow`` beside its
    workers, at nice 19, and it ends with the main process, also one killed outright: summaries
    no longer wait for someone to open the page (an outside audit flooded the trail with refusals,
    and each filtered view then read every record not yet summarised)."""
    server = Served(tmp_path, upstream_issuer, args=("--workers", "1"), **review_settings())
    children = children_of(server.proc.pid)
    try:
        [follower] = [pid for pid in children if "--follow" in _command_line(pid)]
        assert _command_line(follower)[-5:] == ["summarize", "--follow", "--parent", str(server.proc.pid), ""]
        end = time.monotonic() + 20
        while time.monotonic() < end and _nice(follower) != 19:
            time.sleep(0.1)
        assert _nice(follower) == 19
        # A follower that ends (a crash, the OOM killer, an operator's kill) is started again.
        os.kill(follower, signal.SIGKILL)
        end = time.monotonic() + 20
        again: list[int] = []
        while time.monotonic() < end and not again:
            time.sleep(0.1)
            again = [pid for pid in children_of(server.proc.pid) if "--follow" in _command_line(pid)]
            again = [pid for pid in again if pid != follower]
        assert again, "the follower was not started again"
        children += again
        [follower] = again
        assert "summary follower ended (exit status -9)" in server.log.read_text()
        server.proc.kill()
        server.proc.wait(timeout=10)
        end = time.monotonic() + 20
        while time.monotonic() < end and Path(f"/proc/{follower}").exists():
            time.sleep(0.1)
        assert not Path(f"/proc/{follower}").exists(), "the restarted follower outlived the server"
    finally:
        for pid in children:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        server.stop()
    # Without the review page, no follower.
    (tmp_path / "plain").mkdir()
    plain = Served(tmp_path / "plain", upstream_issuer, args=("--workers", "1"))
    try:
        assert not [pid for pid in children_of(plain.proc.pid) if "--follow" in _command_line(pid)]
    finally:
        plain.stop()


def test_the_follower_catches_up_once_enough_records_wait(
    tmp_path: Path, upstream_issuer: RunningServer
) -> None:
    """``sts audit summarize --follow --behind 5``: nothing while fewer wait, then up to the newest."""
    server = Served(tmp_path, upstream_issuer, args=("--workers", "1"))
    database = tmp_path / "sts.sqlite"
    command = ["audit", "summarize", "--follow", "--behind", "5", "--interval", "0.2"]
    follower = subprocess.Popen(
        [STS, "--config", str(server.config), *command],
        cwd=tmp_path,
        env=server.env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        assert follower.stderr is not None
        assert b"keeping the audit summaries up to date" in follower.stderr.readline()
        refusal = {"grant_type": "nonsense"}
        for _ in range(2):
            assert requests.post(f"{server.url}/token", data=refusal, timeout=10).status_code == 400
        time.sleep(1.5)
        start = _summarised_up_to(database)
        assert start < max_audit_id(database), "two records are fewer than --behind"
        for _ in range(6):
            assert requests.post(f"{server.url}/token", data=refusal, timeout=10).status_code == 400
        end = time.monotonic() + 15
        while time.monotonic() < end and _summarised_up_to(database) < max_audit_id(database):
            time.sleep(0.1)
        assert _summarised_up_to(database) == max_audit_id(database)
    finally:
        follower.terminate()
        _, errors = follower.communicate(timeout=10)
        server.stop()
    assert follower.returncode == 0, errors


def max_audit_id(database: Path) -> int:
    with sqlite3.connect(database) as conn:
        return int(conn.execute("SELECT max(id) FROM audit_events").fetchone()[0] or 0)


def _statuses(server: Served, token_for: Any, seconds: float) -> list[int]:
    """Exchanges on new connections (so both workers get some) for ``seconds``: their statuses."""
    statuses = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        answer = requests.post(
            f"{server.url}/token",
            data=_exchange_form(token_for()),
            headers={"Connection": "close"},
            timeout=10,
        )
        statuses.append(answer.status_code)
        if answer.status_code != 200:
            assert answer.status_code == 503, answer.text
            assert answer.json()["error"] == "temporarily_unavailable"
            assert answer.headers["Retry-After"]
        time.sleep(0.05)
    return statuses


def test_a_worker_that_cannot_start_neither_takes_the_instance_down_nor_changes_its_policy(
    tmp_path: Path, upstream_issuer: RunningServer
) -> None:
    """An outside fault-injection audit: with the policy file broken on disk, or the keys directory
    unreadable, the worker replacing one killed failed to start, granian took that for a crash
    loop and stopped the whole server, healthy worker and all; with a valid but different policy
    on disk, the replacement enforced it while the other worker kept the old one.  Now every
    worker compiles the policy texts the main process read at start, and one that cannot build
    its application answers 503 and tries again until it can."""
    server = Served(tmp_path, upstream_issuer, args=("--workers", "2"))
    try:

        def token() -> str:
            return upstream_issuer.issuer.github_actions_token(audience=server.url)

        assert set(_statuses(server, token, 1.0)) == {200}
        (tmp_path / "policies" / "test.yaml").write_text("version: 1\nrules: [\n")  # broken YAML
        keys = tmp_path / "keys"
        keys.rename(tmp_path / "keys.away")
        keys.write_text("not a directory")  # the key ring cannot be opened (root ignores chmod)
        before = children_of(server.proc.pid)
        assert len(before) == 2, before
        os.kill(before[0], signal.SIGKILL)
        end = time.monotonic() + 30
        while time.monotonic() < end and sorted(children_of(server.proc.pid)) in (
            [],
            sorted(before),
            [before[1]],
        ):
            time.sleep(0.1)
        assert len(children_of(server.proc.pid)) == 2
        # Past granian's crash-loop window (5.5 s): the instance serves; the new worker answers 503.
        during = _statuses(server, token, 7.0)
        assert server.proc.poll() is None, server.log.read_text()[-3000:]
        assert 200 in during and 503 in during, during
        keys.unlink()
        (tmp_path / "keys.away").rename(keys)
        # The replacement builds its application within its retry period, with the policy of the
        # start (the file on disk is still broken): every exchange is granted again.
        end = time.monotonic() + 20
        while time.monotonic() < end and set(_statuses(server, token, 1.0)) != {200}:
            pass
        assert set(_statuses(server, token, 2.0)) == {200}
        assert "cannot build the application" in server.log.read_text()
    finally:
        server.stop()


# -- settings ------------------------------------------------------------------------------------
# -- settings ------------------------------------------------------------------------------------


def test_server_settings_are_read_and_validated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # no ./sts.yaml
    environ = {"STS_HEADER_READ_TIMEOUT": "5", "STS_BODY_READ_TIMEOUT": "7", "STS_MAX_CONNECTIONS": "100"}
    settings = load_settings(None, environ=environ, overrides={"database_url": f"sqlite:///{tmp_path}/x"})
    assert (settings.header_read_timeout, settings.body_read_timeout, settings.max_connections) == (5, 7, 100)
    assert per_worker_connections(settings.max_connections, 3) == 34
    for bad in ({"header_read_timeout": 0}, {"header_read_timeout": 61}, {"body_read_timeout": 0}):
        with pytest.raises(ConfigurationError, match=next(iter(bad))):
            load_settings(None, environ={}, overrides=bad)
    with pytest.raises(ConfigurationError, match="max_connections"):
        load_settings(None, environ={"STS_MAX_CONNECTIONS": "8"})


# -- the request threads ------------------------------------------------------------------------


def test_request_threads_answer_each_call_into_the_loop() -> None:
    """Results and exceptions reach the awaiting coroutine; calls run side by side on the threads;
    a call cancelled while it runs has its result dropped; shutdown finishes what was queued."""
    import asyncio
    import threading

    from sts.serving import RequestThreads

    started = threading.Barrier(3, timeout=10)
    names: set[str] = set()
    finished: list[int] = []

    def meet(n: int) -> int:
        names.add(threading.current_thread().name)
        started.wait()  # three calls at once: only three threads can get here together
        return n * 2

    def fail() -> None:
        raise ValueError("from the thread")

    def slow(n: int) -> int:
        time.sleep(0.2)
        finished.append(n)
        return n

    async def scenario() -> RequestThreads:
        threads = RequestThreads(asyncio.get_running_loop(), 3)
        assert await asyncio.gather(*(threads.run(meet, n) for n in range(3))) == [0, 2, 4]
        assert len(names) == 3 and all(name.startswith("sts-request_") for name in names)
        with pytest.raises(ValueError, match="from the thread"):
            await threads.run(fail)
        cancelled = threads.run(slow, 1)
        await asyncio.sleep(0.05)
        cancelled.cancel()
        assert await threads.run(slow, 2) == 2
        queued = threads.run(slow, 3)
        threads.shutdown()
        assert 3 in finished and not queued.done()  # finished in the thread, answered on the next turn
        await asyncio.sleep(0)
        assert queued.result() == 3 and cancelled.cancelled()
        return threads

    threads = asyncio.run(scenario())
    assert sorted(finished) == [1, 2, 3]
    assert not any(thread.is_alive() for thread in threads._threads)


def test_calls_finished_before_the_loop_runs_wake_it_once() -> None:
    """Waking the loop costs a write to its self-pipe and a read back: a thread wakes it only
    when no wake-up is pending, and that one wake-up settles every call finished by then."""
    import asyncio

    from sts.serving import RequestThreads

    async def scenario() -> tuple[list[int], int]:
        loop = asyncio.get_running_loop()
        wakes = 0
        call_soon_threadsafe = loop.call_soon_threadsafe

        def counted(*args: Any, **kwargs: Any) -> Any:
            nonlocal wakes
            wakes += 1
            return call_soon_threadsafe(*args, **kwargs)

        loop.call_soon_threadsafe = counted  # type: ignore[method-assign]
        threads = RequestThreads(loop, 4)
        futures = [threads.run(lambda n=n: n * 3) for n in range(4)]
        # The loop is busy (blocked here) while every call finishes.
        deadline = time.monotonic() + 10
        while len(threads._finished) < 4 and time.monotonic() < deadline:
            time.sleep(0.001)
        results = list(await asyncio.gather(*futures))
        threads.shutdown()
        return results, wakes

    results, wakes = asyncio.run(scenario())
    assert results == [0, 3, 6, 9]
    assert wakes == 1


def test_the_workers_run_uvloop(monkeypatch: pytest.MonkeyPatch) -> None:
    """Named, not left to granian's "auto" (whichever loop package is installed): libuv coalesces
    the wake-ups other threads send the loop, where asyncio's own loop pays two system calls each."""
    import granian.server
    import uvloop
    from granian.constants import Loops

    from sts import serving

    given: dict[str, Any] = {}

    class Server:
        def __init__(self, target: str, **options: Any) -> None:
            given.update(options)

        def serve(self, **options: Any) -> None:
            pass

    monkeypatch.setattr(granian.server, "Server", Server)
    serving.serve(
        lambda: lambda environ, start_response: [],
        host="127.0.0.1",
        port=1,
        workers=1,
        limits=serving.Limits(),
    )
    assert given["loop"] == Loops.uvloop
    assert uvloop.new_event_loop  # installed with the service


def test_what_a_worker_built_at_start_is_frozen_out_of_the_collectors_sight() -> None:
    """The loader freezes what start-up allocated (``gc.freeze``), so full collections during
    requests no longer walk the keys, policies and modules every worker keeps."""
    import gc

    from sts import serving

    kept = object.__new__(type("BuiltAtStart", (), {}))
    loader = serving._Loader(lambda: lambda environ, start_response: [kept], serving.Limits(), None)
    gc.unfreeze()
    try:
        assert gc.get_freeze_count() == 0
        loader()
        assert gc.get_freeze_count() > 0
        # Frozen objects are left out of every generation.  (By identity: ``in`` compares with ``==``
        # against every object a long test session holds, which took over a minute.)
        assert not any(found is kept for found in gc.get_objects())
    finally:
        gc.unfreeze()
