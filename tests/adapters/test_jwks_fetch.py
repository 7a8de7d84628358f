"""Issuer keys from a JWK Set file and from a real local HTTP issuer.

The HTTP tests run a real server on 127.0.0.1 (an ephemeral port) whose
responses each test sets, and which counts the requests it receives; time
is moved with an injected clock rather than by sleeping.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest
import requests
from joserfc.errors import SecurityWarning
from joserfc.jwk import ECKey, Key, OctKey, OKPKey, RSAKey

from sts.adapters.jwks import FileJWKS, StaticJWKS
from sts.adapters.jwks_cache import BRIEF_WAIT, MAX_WAITERS, HttpJWKS
from sts.adapters.jwks_fetch import validate_jwks_url
from sts.core.ports import IssuerKeys, KeysUnavailable, UnknownKeyId
from sts.errors import ConfigurationError
from tests.support.clock import Clock

JWKS_PATH = "/jwks"


# ---------------------------------------------------------------------------
# Keys
# ---------------------------------------------------------------------------


def public_jwk(key: Key, **members: Any) -> dict[str, Any]:
    """The public JWK of ``key`` with extra members (``kid``, ``use``, ``alg``...)."""
    data: dict[str, Any] = dict(key.as_dict(private=False))
    data.update(members)
    return data


def same_key(a: Key, b: Key) -> bool:
    return a.thumbprint() == b.thumbprint()


@pytest.fixture(scope="module")
def ec_keys() -> list[ECKey]:
    return [ECKey.generate_key("P-256") for _ in range(3)]


@pytest.fixture(scope="module")
def rsa_key() -> RSAKey:
    return RSAKey.generate_key(2048)


# ---------------------------------------------------------------------------
# A fake issuer: a real HTTP server
# ---------------------------------------------------------------------------


@dataclass
class Route:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=lambda: {"Content-Type": "application/json"})
    delay: float = 0.0
    #: Send no Content-Length: the body then ends when the connection closes.
    no_length: bool = False


class Issuer:
    """Serves ``routes[path]``; counts requests per path."""

    def __init__(self) -> None:
        self.routes: dict[str, Route] = {JWKS_PATH: Route(body=b'{"keys": []}')}
        self.hits: dict[str, int] = {}
        self._lock = threading.Lock()
        issuer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                with issuer._lock:
                    issuer.hits[self.path] = issuer.hits.get(self.path, 0) + 1
                    route = issuer.routes.get(self.path, Route(status=404))
                if route.delay:
                    time.sleep(route.delay)
                self.send_response(route.status)
                for name, value in route.headers.items():
                    self.send_header(name, value)
                if not route.no_length:
                    self.send_header("Content-Length", str(len(route.body)))
                self.end_headers()
                with contextlib.suppress(OSError):  # The client may give up (timeout, size cap).
                    self.wfile.write(route.body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.01})
        self.thread.daemon = True
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}{JWKS_PATH}"

    @property
    def requests(self) -> int:
        with self._lock:
            return self.hits.get(JWKS_PATH, 0)

    def serve(self, *jwks: dict[str, Any], cache_control: str | None = None, **route: Any) -> None:
        headers = {"Content-Type": "application/json"}
        if cache_control is not None:
            headers["Cache-Control"] = cache_control
        body = json.dumps({"keys": list(jwks)}).encode()
        self.routes[JWKS_PATH] = Route(body=body, headers=headers, **route)

    def fail(self, status: int = 503) -> None:
        self.routes[JWKS_PATH] = Route(status=status, body=b"unavailable")

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def issuer() -> Iterator[Issuer]:
    server = Issuer()
    yield server
    server.stop()


@pytest.fixture
def make_jwks(issuer: Issuer, clock: Clock) -> Iterator[Callable[..., HttpJWKS]]:
    """Build an HttpJWKS for the fake issuer (ES256 and RS256 allowed unless overridden)."""
    sessions: list[requests.Session] = []

    def make(**options: Any) -> HttpJWKS:
        session = requests.Session()
        session.trust_env = False  # No proxy from the environment between us and 127.0.0.1.
        sessions.append(session)
        options.setdefault("algorithms", {"ES256", "RS256"})
        options.setdefault("clock", clock)
        return HttpJWKS(options.pop("url", issuer.url), session=session, **options)

    yield make
    for session in sessions:
        session.close()


def unused_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


# ---------------------------------------------------------------------------
# Fetching and caching
# ---------------------------------------------------------------------------


def test_first_fetch_is_lazy_and_returns_the_key(
    issuer: Issuer, make_jwks: Callable[..., HttpJWKS], ec_keys: list[ECKey]
) -> None:
    issuer.serve(public_jwk(ec_keys[0], kid="k1", use="sig"))
    jwks = make_jwks()
    assert issuer.requests == 0

    key = jwks.key_for("k1", "ES256")

    assert same_key(key, ec_keys[0])
    assert not key.is_private
    assert issuer.requests == 1


def test_fresh_cache_hit_makes_no_request(
    issuer: Issuer, make_jwks: Callable[..., HttpJWKS], clock: Clock, ec_keys: list[ECKey]
) -> None:
    issuer.serve(public_jwk(ec_keys[0], kid="k1"))
    jwks = make_jwks(default_ttl=300)
    first = jwks.key_for("k1", "ES256")
    for _ in range(50):
        clock.advance(5)  # 250 s in all, inside the 300 s default lifetime.
        assert jwks.key_for("k1", "ES256") is first
    assert issuer.requests == 1


@pytest.mark.parametrize(
    ("cache_control", "age", "lifetime"),
    [
        ("public, max-age=600", None, 600),  # RFC 9111 §5.2.2.1
        ("MAX-AGE=600", None, 600),  # directive names are case-insensitive (§5.2)
        ('max-age="600"', None, 600),
        ("max-age=600", "500", 100),  # less the Age (§4.2.3)
        ("max-age=5", None, 60),  # clamped up to min_ttl
        ("max-age=99999999999", None, 1000),  # clamped down to max_ttl
        ("max-age=600, no-cache", None, 60),  # §5.2.2.4: the most restrictive wins
        ("no-store", None, 60),  # §5.2.2.5
        ("max-age=ten", None, 60),  # invalid: stale (§4.2.1), so min_ttl
        ("max-age=700, max-age=5", None, 700),  # first occurrence wins (§4.2.1)
        (None, None, 300),  # no max-age: default_ttl
        ("public", None, 300),
    ],
)
def test_cache_lifetime_follows_cache_control(
    issuer: Issuer,
    make_jwks: Callable[..., HttpJWKS],
    clock: Clock,
    ec_keys: list[ECKey],
    cache_control: str | None,
    age: str | None,
    lifetime: float,
) -> None:
    issuer.serve(public_jwk(ec_keys[0], kid="k1"), cache_control=cache_control)
    if age is not None:
        issuer.routes[JWKS_PATH].headers["Age"] = age
    jwks = make_jwks(min_ttl=60, default_ttl=300, max_ttl=1000, refetch_interval=0)
    jwks.key_for("k1", "ES256")

    clock.advance(lifetime - 1)
    jwks.key_for("k1", "ES256")
    assert issuer.requests == 1, "refetched before the lifetime ended"

    clock.advance(2)
    jwks.key_for("k1", "ES256")
    assert issuer.requests == 2, "not refetched after the lifetime ended"


def test_unknown_kid_refetches_once_and_finds_the_rotated_key(
    issuer: Issuer, make_jwks: Callable[..., HttpJWKS], clock: Clock, ec_keys: list[ECKey]
) -> None:
    issuer.serve(public_jwk(ec_keys[0], kid="k1"))
    jwks = make_jwks(refetch_interval=30, default_ttl=300)
    jwks.key_for("k1", "ES256")
    clock.advance(31)  # Still fresh, but past the refetch interval.
    issuer.serve(public_jwk(ec_keys[0], kid="k1"), public_jwk(ec_keys[1], kid="k2"))

    key = jwks.key_for("k2", "ES256")

    assert same_key(key, ec_keys[1])
    assert issuer.requests == 2
    assert same_key(jwks.key_for("k1", "ES256"), ec_keys[0])
    assert issuer.requests == 2


def test_unknown_kid_refetch_is_rate_limited(
    issuer: Issuer, make_jwks: Callable[..., HttpJWKS], clock: Clock, ec_keys: list[ECKey]
) -> None:
    issuer.serve(public_jwk(ec_keys[0], kid="k1"))
    jwks = make_jwks(refetch_interval=30, default_ttl=300)
    jwks.key_for("k1", "ES256")

    # The first fetch counts too: keys fetched a moment ago are not refetched.
    clock.advance(10)
    with pytest.raises(UnknownKeyId):
        jwks.key_for("made-up-0", "ES256")
    assert issuer.requests == 1

    clock.advance(21)
    with pytest.raises(UnknownKeyId):
        jwks.key_for("made-up-1", "ES256")
    assert issuer.requests == 2

    # A second unknown kid inside the interval: no request, even though the
    # issuer has meanwhile published a new key.
    issuer.serve(public_jwk(ec_keys[0], kid="k1"), public_jwk(ec_keys[1], kid="k2"))
    clock.advance(29)
    for kid in ("made-up-2", "k2"):
        with pytest.raises(UnknownKeyId):
            jwks.key_for(kid, "ES256")
    assert issuer.requests == 2

    clock.advance(2)
    assert same_key(jwks.key_for("k2", "ES256"), ec_keys[1])
    assert issuer.requests == 3


@pytest.mark.parametrize("cold", [False, True], ids=["rotated-kid", "cold-cache"])
def test_concurrent_callers_share_one_request(
    issuer: Issuer, make_jwks: Callable[..., HttpJWKS], ec_keys: list[ECKey], cold: bool
) -> None:
    # refetch_interval=0 so that only single-flight, not the rate limit,
    # can keep the 20 callers from each fetching (a quick fetch is shared by any number).
    jwks = make_jwks(refetch_interval=0)
    if not cold:
        issuer.serve(public_jwk(ec_keys[0], kid="k1"))
        jwks.key_for("k1", "ES256")
    # A quick fetch (0.1 s): callers beyond the waiters wait for it while it is younger than
    # BRIEF_WAIT (0.5 s); 0.3 s left too little margin on a loaded machine (a CI run failed).
    issuer.serve(public_jwk(ec_keys[0], kid="k1"), public_jwk(ec_keys[1], kid="k2"), delay=0.1)
    before = issuer.requests

    barrier = threading.Barrier(20)
    results: list[Key | BaseException] = []
    results_lock = threading.Lock()

    def ask() -> None:
        barrier.wait()
        try:
            outcome: Key | BaseException = jwks.key_for("k2", "ES256")
        except BaseException as exc:
            outcome = exc
        with results_lock:
            results.append(outcome)

    threads = [threading.Thread(target=ask) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)

    assert issuer.requests - before == 1
    assert len(results) == 20
    assert all(isinstance(result, ECKey) and same_key(result, ec_keys[1]) for result in results), results


def test_concurrent_callers_with_an_unknown_kid_share_one_request(
    issuer: Issuer, make_jwks: Callable[..., HttpJWKS], ec_keys: list[ECKey]
) -> None:
    issuer.serve(public_jwk(ec_keys[0], kid="k1"))
    jwks = make_jwks(refetch_interval=0)
    jwks.key_for("k1", "ES256")
    issuer.serve(public_jwk(ec_keys[0], kid="k1"), delay=0.3)

    barrier = threading.Barrier(20)
    errors: list[BaseException] = []

    def ask() -> None:
        barrier.wait()
        try:
            jwks.key_for("nobody", "ES256")
        except UnknownKeyId as exc:
            errors.append(exc)

    threads = [threading.Thread(target=ask) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)

    assert issuer.requests == 2
    assert len(errors) == 20


@pytest.mark.parametrize("issuer_up", [True, False], ids=["issuer-up", "issuer-down"])
def test_a_flood_of_unknown_kids_from_many_threads_fetches_at_most_once_per_interval(
    issuer: Issuer, make_jwks: Callable[..., HttpJWKS], clock: Clock, ec_keys: list[ECKey], issuer_up: bool
) -> None:
    """Whatever clients send (issue 13), the issuer is asked at most once per ``refetch_interval``.

    Eight threads each present a stream of tokens with made-up ``kid`` values, for six
    intervals; a real key keeps working throughout.  Up or down, the issuer sees the first
    fetch and then one refetch per interval, never more.
    """
    issuer.serve(public_jwk(ec_keys[0], kid="k1"), cache_control="max-age=86400")
    jwks = make_jwks(refetch_interval=30, max_ttl=86400, max_stale=86400)
    jwks.key_for("k1", "ES256")
    if not issuer_up:
        issuer.fail()
    threads, lookups, intervals = 8, 40, 6
    problems: list[BaseException] = []

    def flood() -> None:
        for _ in range(lookups):
            try:
                jwks.key_for(f"made-up-{uuid.uuid4()}", "ES256")
            except (UnknownKeyId, KeysUnavailable):
                pass
            except BaseException as exc:
                problems.append(exc)
            if not same_key(jwks.key_for("k1", "ES256"), ec_keys[0]):
                problems.append(AssertionError("the real key changed"))

    for interval in range(intervals):
        before = issuer.requests
        workers = [threading.Thread(target=flood) for _ in range(threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(timeout=30)
        assert issuer.requests - before == (0 if interval == 0 else 1), f"interval {interval}"
        clock.advance(30)
    assert problems == []
    assert issuer.requests == intervals  # the first fetch, then one per later interval


# ---------------------------------------------------------------------------
# Outages
# ---------------------------------------------------------------------------


def test_outage_serves_stale_keys_until_max_stale(
    issuer: Issuer, make_jwks: Callable[..., HttpJWKS], clock: Clock, ec_keys: list[ECKey]
) -> None:
    issuer.serve(public_jwk(ec_keys[0], kid="k1"), cache_control="max-age=60")
    jwks = make_jwks(min_ttl=60, refetch_interval=30, max_stale=600)
    first = jwks.key_for("k1", "ES256")
    issuer.fail(503)

    clock.advance(61)  # Expired: a refetch is tried, fails, the stale key is served.
    assert jwks.key_for("k1", "ES256") is first
    assert issuer.requests == 2

    clock.advance(10)  # Inside refetch_interval: the down issuer is not asked again.
    assert jwks.key_for("k1", "ES256") is first
    assert issuer.requests == 2

    # A kid the stale set lacks cannot be ruled out while the issuer is down.
    with pytest.raises(KeysUnavailable):
        jwks.key_for("k2", "ES256")

    clock.advance(60 + 600 - 71 - 1)  # One second before max_stale runs out.
    assert jwks.key_for("k1", "ES256") is first
    requests_so_far = issuer.requests
    assert requests_so_far >= 3

    clock.advance(2)
    with pytest.raises(KeysUnavailable):
        jwks.key_for("k1", "ES256")

    issuer.serve(public_jwk(ec_keys[0], kid="k1"))
    clock.advance(31)
    assert same_key(jwks.key_for("k1", "ES256"), ec_keys[0])
    assert issuer.requests == requests_so_far + 1


def test_expired_key_is_served_while_another_thread_refetches(
    issuer: Issuer, make_jwks: Callable[..., HttpJWKS], clock: Clock, ec_keys: list[ECKey]
) -> None:
    issuer.serve(public_jwk(ec_keys[0], kid="k1"))
    jwks = make_jwks(default_ttl=300)
    first = jwks.key_for("k1", "ES256")
    issuer.serve(public_jwk(ec_keys[0], kid="k1"), delay=0.5)
    clock.advance(301)

    fetcher = threading.Thread(target=jwks.key_for, args=("k1", "ES256"))
    fetcher.start()
    deadline = time.monotonic() + 2
    while issuer.requests < 2 and time.monotonic() < deadline:
        time.sleep(0.005)
    assert issuer.requests == 2, "the refetch did not start"

    started = time.monotonic()
    assert jwks.key_for("k1", "ES256") is first
    assert time.monotonic() - started < 0.3, "waited for the other thread's fetch"
    fetcher.join(timeout=5)
    assert issuer.requests == 2


@pytest.mark.parametrize(
    "body",
    [b"not json", b'["keys"]', b'{"keys": {"kty": "EC"}}', b'{"no_keys": []}', b"[" * 100_000],
    ids=["not-json", "array", "keys-not-a-list", "no-keys", "deep-nesting"],
)
def test_bad_body_keeps_the_stale_keys(
    issuer: Issuer, make_jwks: Callable[..., HttpJWKS], clock: Clock, ec_keys: list[ECKey], body: bytes
) -> None:
    issuer.serve(public_jwk(ec_keys[0], kid="k1"))
    jwks = make_jwks(default_ttl=300)
    first = jwks.key_for("k1", "ES256")
    issuer.routes[JWKS_PATH] = Route(body=body)

    clock.advance(301)
    assert jwks.key_for("k1", "ES256") is first
    assert issuer.requests == 2


def test_never_fetched_and_down_raises_keys_unavailable_without_hammering(
    issuer: Issuer, make_jwks: Callable[..., HttpJWKS], clock: Clock
) -> None:
    issuer.fail(500)
    jwks = make_jwks(refetch_interval=30)

    for _ in range(5):
        with pytest.raises(KeysUnavailable):
            jwks.key_for("k1", "ES256")
    assert issuer.requests == 1

    clock.advance(31)
    with pytest.raises(KeysUnavailable):
        jwks.key_for("k1", "ES256")
    assert issuer.requests == 2


def test_unreachable_issuer_raises_keys_unavailable(make_jwks: Callable[..., HttpJWKS]) -> None:
    jwks = make_jwks(url=f"http://127.0.0.1:{unused_port()}/jwks")
    with pytest.raises(KeysUnavailable, match="ConnectionError"):
        jwks.key_for("k1", "ES256")


def test_only_a_few_callers_wait_for_a_slow_fetch_and_the_others_are_refused_at_once(
    issuer: Issuer, make_jwks: Callable[..., HttpJWKS], ec_keys: list[ECKey]
) -> None:
    """Each caller waiting for a fetch holds a request thread: tokens naming new ``kid`` values of a
    slow key server held every thread of a worker for the fetch's 3 s (an outside audit).  One
    fetches, MAX_WAITERS wait, the rest are refused after BRIEF_WAIT, to retry."""
    issuer.serve(public_jwk(ec_keys[0], kid="k1"), delay=1.2)
    jwks = make_jwks(refetch_interval=0)
    barrier = threading.Barrier(8)
    outcomes: list[tuple[str, float]] = []
    lock = threading.Lock()

    def ask() -> None:
        barrier.wait()
        started = time.monotonic()
        try:
            jwks.key_for("k1", "ES256")
            outcome = "key"
        except KeysUnavailable:
            outcome = "unavailable"
        with lock:
            outcomes.append((outcome, time.monotonic() - started))

    threads = [threading.Thread(target=ask) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    keys = [took for outcome, took in outcomes if outcome == "key"]
    refused = [took for outcome, took in outcomes if outcome == "unavailable"]
    assert len(keys) == 1 + MAX_WAITERS and len(refused) == 8 - 1 - MAX_WAITERS
    assert min(refused) > BRIEF_WAIT - 0.05 and max(refused) < BRIEF_WAIT + 0.3 < 1.2 < min(keys)


def test_a_caller_beyond_the_waiters_of_a_fetch_older_than_the_brief_wait_is_refused_at_once(
    issuer: Issuer, make_jwks: Callable[..., HttpJWKS], ec_keys: list[ECKey]
) -> None:
    """So a stream of tokens naming new ``kid`` values holds no more threads than MAX_WAITERS and
    the fetching one for a slow fetch's whole bound, beyond its first BRIEF_WAIT."""
    issuer.serve(public_jwk(ec_keys[0], kid="k1"), delay=1.5)
    jwks = make_jwks(refetch_interval=0)
    waiting = [threading.Thread(target=lambda: jwks.key_for("k1", "ES256")) for _ in range(1 + MAX_WAITERS)]
    for thread in waiting:
        thread.start()
    time.sleep(BRIEF_WAIT + 0.2)
    started = time.monotonic()
    with pytest.raises(KeysUnavailable, match="being fetched"):
        jwks.key_for("k1", "ES256")
    assert time.monotonic() - started < 0.1
    for thread in waiting:
        thread.join(5)
    assert same_key(jwks.key_for("k1", "ES256"), ec_keys[0])


def test_slow_issuer_times_out(
    issuer: Issuer, make_jwks: Callable[..., HttpJWKS], ec_keys: list[ECKey]
) -> None:
    issuer.serve(public_jwk(ec_keys[0], kid="k1"), delay=0.6)
    jwks = make_jwks(timeout=0.2)
    started = time.monotonic()
    with pytest.raises(KeysUnavailable):
        jwks.key_for("k1", "ES256")
    assert time.monotonic() - started < 0.55


# ---------------------------------------------------------------------------
# The transport
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "http://issuer.example/jwks",
        "http://10.0.0.1/jwks",
        "http://[::2]/jwks",
        "http://127.0.0.1.nip.io/jwks",
        "http://localhost.evil.example/jwks",
        "ftp://issuer.example/jwks",
        "file:///etc/jwks.json",
        "https:///jwks",
        "https://issuer.example/jwks#frag",
        "https://issuer.example:99999/jwks",
        "issuer.example/jwks",
    ],
)
def test_insecure_or_malformed_url_is_refused(url: str) -> None:
    with pytest.raises(ConfigurationError):
        validate_jwks_url(url)
    with pytest.raises(ConfigurationError):
        HttpJWKS(url, algorithms={"ES256"})


def test_credentials_in_the_url_are_refused_and_not_echoed() -> None:
    with pytest.raises(ConfigurationError) as caught:
        validate_jwks_url("https://user:s3cret@issuer.example/jwks")
    assert "s3cret" not in str(caught.value)


@pytest.mark.parametrize(
    "url",
    [
        "https://issuer.example/jwks",
        "https://issuer.example:8443/.well-known/jwks.json",
        "http://127.0.0.1:8080/jwks",
        "http://127.5.6.7/jwks",
        "http://[::1]:9000/jwks",
        "http://localhost/jwks",
        "HTTP://LOCALHOST/jwks",
    ],
)
def test_https_and_loopback_http_urls_are_accepted(url: str) -> None:
    validate_jwks_url(url)
    HttpJWKS(url, algorithms={"ES256"})


def test_redirect_is_not_followed(
    issuer: Issuer, make_jwks: Callable[..., HttpJWKS], ec_keys: list[ECKey]
) -> None:
    target = "/elsewhere"
    issuer.routes[target] = Route(body=json.dumps({"keys": [public_jwk(ec_keys[0], kid="k1")]}).encode())
    issuer.routes[JWKS_PATH] = Route(status=302, headers={"Location": target})
    jwks = make_jwks()

    with pytest.raises(KeysUnavailable, match="redirect"):
        jwks.key_for("k1", "ES256")
    assert issuer.requests == 1
    assert issuer.hits.get(target, 0) == 0


@pytest.mark.parametrize("no_length", [False, True], ids=["content-length", "read-to-close"])
def test_body_is_capped_at_max_bytes(
    issuer: Issuer,
    make_jwks: Callable[..., HttpJWKS],
    clock: Clock,
    ec_keys: list[ECKey],
    no_length: bool,
) -> None:
    issuer.serve(public_jwk(ec_keys[0], kid="k1"), no_length=no_length)
    size = len(issuer.routes[JWKS_PATH].body)

    exact = make_jwks(max_bytes=size)
    assert same_key(exact.key_for("k1", "ES256"), ec_keys[0])

    over = make_jwks(max_bytes=size - 1)
    with pytest.raises(KeysUnavailable, match="byte limit"):
        over.key_for("k1", "ES256")

    padded = {"keys": [public_jwk(ec_keys[0], kid="k1")], "padding": "x" * 200_000}
    issuer.routes[JWKS_PATH] = Route(body=json.dumps(padded).encode(), no_length=no_length)
    big = make_jwks(max_bytes=64 * 1024)
    with pytest.raises(KeysUnavailable, match="byte limit"):
        big.key_for("k1", "ES256")


# ---------------------------------------------------------------------------
# Which keys are kept (shared by both adapters)
# ---------------------------------------------------------------------------


@pytest.fixture(params=["http", "file", "static"])
def load(
    request: pytest.FixtureRequest, issuer: Issuer, make_jwks: Callable[..., HttpJWKS], tmp_path: Path
) -> Callable[..., IssuerKeys]:
    """Load a list of JWKs through each adapter in turn; the same filter must apply."""

    def load_keys(*jwks: dict[str, Any], algorithms: set[str] | None = None) -> IssuerKeys:
        algorithms = algorithms or {"ES256", "RS256"}
        if request.param == "http":
            issuer.serve(*jwks)
            return make_jwks(algorithms=algorithms)
        if request.param == "static":
            return StaticJWKS({"keys": list(jwks)}, algorithms=algorithms, source="client c1")
        path = tmp_path / "jwks.json"
        path.write_text(json.dumps({"keys": list(jwks)}))
        return FileJWKS(path, algorithms=algorithms)

    return load_keys


def test_unsafe_or_malformed_keys_are_skipped_and_logged_by_kid(
    load: Callable[..., IssuerKeys],
    ec_keys: list[ECKey],
    caplog: pytest.LogCaptureFixture,
) -> None:
    private_ec = ECKey.generate_key("P-256")
    private_jwk = dict(private_ec.as_dict(private=True), kid="k-private")
    with pytest.warns(SecurityWarning):
        weak_rsa = RSAKey.generate_key(1024, private=False)
    oct_key = OctKey.generate_key(256)
    truncated = public_jwk(ec_keys[2], kid="k-malformed")
    del truncated["y"]
    off_curve = public_jwk(ec_keys[2], kid="k-off-curve", x=public_jwk(ec_keys[1])["x"])

    with caplog.at_level(logging.WARNING, logger="sts.adapters.jwks"):
        keys = load(
            public_jwk(ec_keys[0], kid="k-good", use="sig", key_ops=["verify"]),
            private_jwk,
            dict(oct_key.as_dict(private=True), kid="k-oct"),
            public_jwk(weak_rsa, kid="k-weak-rsa"),
            public_jwk(ec_keys[1], kid="k-enc", use="enc"),
            # Not a string: membership in a set raised TypeError (a 500) for the whole key set.
            public_jwk(ec_keys[1], kid="k-use-list", use=["sig"]),
            public_jwk(ec_keys[1], kid="k-use-object", use={"a": 1}),
            public_jwk(ec_keys[1], kid="k-ops", key_ops=["encrypt"]),
            # The Ed25519 neutral point: a key of small order verifies forged signatures.
            {"kty": "OKP", "crv": "Ed25519", "x": "AQ" + "A" * 41, "kid": "k-small-order"},
            # Empty: the small-order check shifted by -1 (ValueError) for the whole key set.
            {"kty": "OKP", "crv": "Ed25519", "x": "", "kid": "k-empty-okp"},
            truncated,
            off_curve,
            public_jwk(ec_keys[1]),  # no kid, in a set of many keys
            {"kty": "XYZ", "kid": "k-unknown-kty"},
            "not-an-object",
        )
        assert same_key(keys.key_for("k-good", "ES256"), ec_keys[0])
        skipped = (
            "k-private",
            "k-oct",
            "k-weak-rsa",
            "k-enc",
            "k-use-list",
            "k-use-object",
            "k-ops",
            "k-small-order",
            "k-empty-okp",
        )
        for kid in (*skipped, "k-malformed", "k-off-curve"):
            for alg in ("ES256", "RS256", "Ed25519"):
                with pytest.raises(UnknownKeyId):
                    keys.key_for(kid, alg)
        # The kid-less key was dropped, so ES256 without a kid still has exactly one candidate.
        assert same_key(keys.key_for(None, "ES256"), ec_keys[0])

    for kid in (*skipped, "k-malformed", "k-off-curve"):
        assert kid in caplog.text, f"no warning names {kid}"
    assert "1024 bits" in caplog.text
    assert "small order" in caplog.text
    # Key material never reaches the log.
    assert str(private_jwk["d"]) not in caplog.text
    assert str(oct_key.as_dict(private=True)["k"]) not in caplog.text


def test_algorithm_must_fit_the_key(
    load: Callable[..., IssuerKeys], ec_keys: list[ECKey], rsa_key: RSAKey
) -> None:
    ed_key = OKPKey.generate_key("Ed25519")
    p384 = ECKey.generate_key("P-384")
    keys = load(
        public_jwk(ec_keys[0], kid="ec"),
        public_jwk(p384, kid="ec384"),
        public_jwk(rsa_key, kid="rsa", alg="RS256"),
        public_jwk(ed_key, kid="ed"),
        algorithms={"ES256", "ES384", "RS256", "PS256", "EdDSA", "Ed25519"},
    )
    assert same_key(keys.key_for("ec", "ES256"), ec_keys[0])
    assert same_key(keys.key_for("ec384", "ES384"), p384)
    assert same_key(keys.key_for("rsa", "RS256"), rsa_key)
    assert same_key(keys.key_for("ed", "EdDSA"), ed_key)
    assert same_key(keys.key_for("ed", "Ed25519"), ed_key)

    refused = [
        ("ec", "RS256"),  # key type
        ("ec", "ES384"),  # curve
        ("ec384", "ES256"),
        ("rsa", "ES256"),
        ("rsa", "PS256"),  # the JWK declares alg RS256
        ("ed", "ES256"),
        ("ec", "ES512"),  # not in the allow-list
        ("ec", "none"),
        ("ec", "HS256"),
    ]
    for kid, alg in refused:
        with pytest.raises(UnknownKeyId):
            keys.key_for(kid, alg)


def test_algorithm_outside_the_allow_list_is_refused_even_if_the_key_fits(
    load: Callable[..., IssuerKeys], rsa_key: RSAKey
) -> None:
    keys = load(public_jwk(rsa_key, kid="rsa"), algorithms={"RS256"})
    assert same_key(keys.key_for("rsa", "RS256"), rsa_key)
    with pytest.raises(UnknownKeyId):
        keys.key_for("rsa", "PS256")


def test_missing_kid_needs_exactly_one_fitting_key(
    load: Callable[..., IssuerKeys], ec_keys: list[ECKey], rsa_key: RSAKey
) -> None:
    single = load(public_jwk(ec_keys[0]))
    assert same_key(single.key_for(None, "ES256"), ec_keys[0])
    with pytest.raises(UnknownKeyId):
        single.key_for("some-kid", "ES256")

    mixed = load(public_jwk(ec_keys[0], kid="a"), public_jwk(rsa_key, kid="b"))
    assert same_key(mixed.key_for(None, "ES256"), ec_keys[0])  # the only ES256 key
    assert same_key(mixed.key_for(None, "RS256"), rsa_key)

    two = load(public_jwk(ec_keys[0], kid="a"), public_jwk(ec_keys[1], kid="b"))
    with pytest.raises(UnknownKeyId):
        two.key_for(None, "ES256")


def test_duplicate_kid_is_used_only_when_the_algorithm_tells_the_keys_apart(
    load: Callable[..., IssuerKeys], ec_keys: list[ECKey], rsa_key: RSAKey
) -> None:
    # RFC 7517 §4.5: the same kid on keys of different types is legitimate.
    keys = load(
        public_jwk(ec_keys[0], kid="same"),
        public_jwk(rsa_key, kid="same"),
        public_jwk(ec_keys[1], kid="twin"),
        public_jwk(ec_keys[2], kid="twin"),
    )
    assert same_key(keys.key_for("same", "ES256"), ec_keys[0])
    assert same_key(keys.key_for("same", "RS256"), rsa_key)
    with pytest.raises(UnknownKeyId):
        keys.key_for("twin", "ES256")


@pytest.mark.parametrize("kid", [17, ["a"], {"a": 1}])
def test_non_string_kid_is_refused(load: Callable[..., IssuerKeys], ec_keys: list[ECKey], kid: Any) -> None:
    keys = load(public_jwk(ec_keys[0], kid="k1"))
    with pytest.raises(UnknownKeyId):
        keys.key_for(kid, "ES256")


@pytest.mark.parametrize("algorithms", [set(), {"HS256"}, {"none"}, {"ES256", "RSA-OAEP"}, "ES256"], ids=repr)
def test_bad_algorithm_allow_list_is_a_configuration_error(
    issuer: Issuer, tmp_path: Path, ec_keys: list[ECKey], algorithms: Any
) -> None:
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [public_jwk(ec_keys[0], kid="k1")]}))
    with pytest.raises(ConfigurationError):
        FileJWKS(path, algorithms=algorithms)
    with pytest.raises(ConfigurationError):
        HttpJWKS(issuer.url, algorithms=algorithms)


# ---------------------------------------------------------------------------
# FileJWKS
# ---------------------------------------------------------------------------


def test_file_jwks_reads_the_file_once(tmp_path: Path, ec_keys: list[ECKey]) -> None:
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [public_jwk(ec_keys[0], kid="k1", use="sig")]}))
    keys = FileJWKS(path, algorithms={"ES256"})
    path.unlink()

    assert same_key(keys.key_for("k1", "ES256"), ec_keys[0])
    with pytest.raises(UnknownKeyId):
        keys.key_for("k2", "ES256")


def test_a_worker_reads_the_key_files_its_main_process_read(tmp_path: Path, ec_keys: list[ECKey]) -> None:
    """``sts serve`` gives its workers the key-set files as its main process read them: a worker
    replacing one that died trusts those keys, not what the file holds by then (as with the
    policies; an outside fault audit saw two policies enforced in one instance)."""
    from sts.adapters.jwks import files_read, use_file_snapshot

    path = tmp_path / "bundle.json"
    path.write_text(json.dumps({"keys": [public_jwk(ec_keys[0], kid="k1", use="sig")]}))
    FileJWKS(path, algorithms={"ES256"})  # the main process, at start
    snapshot = files_read()
    assert str(path) in snapshot
    path.write_text(json.dumps({"keys": [public_jwk(ec_keys[1], kid="k2", use="sig")]}))  # changed later
    try:
        use_file_snapshot(snapshot)  # a worker, started after the change
        keys = FileJWKS(path, algorithms={"ES256"})
        assert same_key(keys.key_for("k1", "ES256"), ec_keys[0])
        with pytest.raises(UnknownKeyId):
            keys.key_for("k2", "ES256")
    finally:
        use_file_snapshot({})
    assert same_key(FileJWKS(path, algorithms={"ES256"}).key_for("k2", "ES256"), ec_keys[1])


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (None, "cannot read"),
        ("{not json", "not valid JSON"),
        ('[{"kty": "EC"}]', "not a JSON object"),
        ('{"keys": "k1"}', "no 'keys' array"),
        ('{"keys": []}', "no usable"),
        ('{"keys": [{"kty": "oct", "k": "c2VjcmV0", "kid": "k1"}]}', "no usable"),
    ],
    ids=["missing", "not-json", "array", "keys-not-a-list", "empty", "only-symmetric"],
)
def test_file_jwks_refuses_a_bad_file(tmp_path: Path, content: str | None, reason: str) -> None:
    path = tmp_path / "jwks.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigurationError, match=reason) as caught:
        FileJWKS(path, algorithms={"ES256"})
    assert str(path) in str(caught.value)


# ---------------------------------------------------------------------------
# StaticJWKS
# ---------------------------------------------------------------------------


def test_static_jwks_accepts_frozen_configuration_values(ec_keys: list[ECKey]) -> None:
    frozen = MappingProxyType({"keys": (MappingProxyType(public_jwk(ec_keys[0], kid="k1")),)})
    keys = StaticJWKS(frozen, algorithms=("ES256",), source="client c1")
    assert same_key(keys.key_for("k1", "ES256"), ec_keys[0])
    with pytest.raises(UnknownKeyId, match="client c1"):
        keys.key_for("k2", "ES256")


@pytest.mark.parametrize(
    ("document", "reason"),
    [
        ({"keys": "k1"}, "no 'keys' array"),
        ({}, "no 'keys' array"),
        ({"keys": []}, "no usable"),
        ({"keys": [{"kty": "oct", "k": "c2VjcmV0", "kid": "k1"}]}, "no usable"),
    ],
)
def test_static_jwks_refuses_a_bad_document(document: dict[str, Any], reason: str) -> None:
    with pytest.raises(ConfigurationError, match=reason) as caught:
        StaticJWKS(document, algorithms={"ES256"}, source="client c1")
    assert "client c1" in str(caught.value)


def test_a_missing_kid_is_said_as_missing() -> None:
    """Not as the name of Python's type for None."""
    from sts.adapters.jwks_acceptance import quote_untrusted

    assert quote_untrusted(None) == "(none)"
    assert quote_untrusted("k1") == "'k1'" and quote_untrusted(7) == "'int'"
