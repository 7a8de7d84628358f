"""The review page over HTTP (Flask test client): sign-in, what each page shows, and what it never shows.

Decisions come from real exchanges (tests/support/review_support.py) against a
development issuer serving its JWKS over HTTP; the app's clock is shared with
the review page, so session ages and "new" edges move with it.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import text
from werkzeug.test import TestResponse

from sts.app import create_app
from sts.core.baseline import Baseline
from sts.core.client_secrets import hash_secret
from sts.core.subject_state import identity_key
from sts.dev.issuer import DevIssuer, RunningServer
from sts.errors import ConfigurationError
from sts.settings import Settings
from tests.conftest import STS_ISSUER, exchange_form
from tests.support.clock import Clock
from tests.support.review_support import (
    APP,
    DEPLOY,
    MARKUP_REPO,
    PASSWORD,
    REPORTS,
    REPORTS_JOB,
    REVIEWER,
    make_decisions,
    review_policy,
    review_settings,
)

PAGES = ["/review/", "/review/timeline", "/review/graph", "/review/decision/1",
         f"/review/identity?issuer=upstream&subject={APP}"]  # fmt: skip


@pytest.fixture(scope="module")
def upstream() -> Iterator[RunningServer]:
    with DevIssuer.serve_ephemeral(alg="RS256") as server:
        yield server


@dataclass
class Review:
    app: Flask
    web: FlaskClient
    clock: Clock
    made: dict[str, Any]

    def sign_in(
        self, username: str = REVIEWER, password: str = PASSWORD, target: str = "/review/"
    ) -> TestResponse:
        form_page = self.web.get("/review/login", query_string={"next": target})
        csrf = re.search(r'name="csrf" value="([^"]+)"', form_page.get_data(as_text=True))
        assert csrf is not None
        return self.web.post(
            "/review/login",
            data={"username": username, "password": password, "csrf": csrf.group(1), "next": target},
        )

    def page(self, path: str, **query: Any) -> str:
        response = self.web.get(path, query_string=query) if query else self.web.get(path)
        assert response.status_code == 200, (
            path,
            response.status_code,
            response.get_data(as_text=True)[:500],
        )
        return response.get_data(as_text=True)


@pytest.fixture
def review(make_settings: Callable[..., Settings], upstream: RunningServer) -> Review:
    clock = Clock(float(int(time.time())))
    app = create_app(make_settings(review_policy(), **review_settings()), clock=clock)
    web = app.test_client()

    def post(form: dict[str, Any], headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
        response = web.post("/token", data=form, headers=headers)
        return response.status_code, response.get_json()

    made = make_decisions(post, upstream.issuer, clock)
    return Review(app, app.test_client(), clock, made)


# -- configuration --------------------------------------------------------------------------------


def test_off_unless_enabled(make_settings: Callable[..., Settings]) -> None:
    web = create_app(make_settings()).test_client()
    assert web.get("/review/").status_code == 404
    assert web.get("/review/login").status_code == 404


def test_enabled_needs_users_with_recognised_hashes(make_settings: Callable[..., Settings]) -> None:
    with pytest.raises(ConfigurationError, match=r"review\.users: at least one user"):
        make_settings(review={"enabled": True})
    settings = make_settings(
        review={"enabled": True, "users": [{"username": "bob", "password_hash": "hunter2"}]}
    )
    with pytest.raises(ConfigurationError, match=r"review\.users\.bob\.password_hash: not a recognised hash"):
        create_app(settings)
    twice = [{"username": "bob", "password_hash": hash_secret("x")}] * 2
    with pytest.raises(ConfigurationError, match=r"review\.users\.bob: duplicate username"):
        make_settings(review={"enabled": True, "users": twice})


# -- the sign-in wall -----------------------------------------------------------------------------


@pytest.mark.parametrize("path", PAGES)
def test_nothing_without_signing_in(review: Review, path: str) -> None:
    response = review.web.get(path)
    body = response.get_data(as_text=True)
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"].startswith('Cookie realm="sts review"')
    assert response.headers["Cache-Control"] == "no-store"
    assert 'name="password"' in body
    # Only what the request itself named comes back (as where to go after signing in).
    for secret in (APP, REPORTS_JOB, DEPLOY, "granted", "upstream", "<svg"):
        assert secret not in body.replace(f'next" value="{path}"', "").replace(path.replace("&", "&amp;"), "")


@pytest.mark.parametrize("path", [*PAGES, "/review/login"])
def test_head_announces_the_length_get_sends(review: Review, path: str) -> None:
    """RFC 9110 §9.3.2, §8.6: a HEAD answer's Content-Length is the one GET would send (the sign-in
    form named the page to return to only for GET, and was 5 to 33 bytes shorter for HEAD)."""
    got, head = review.web.get(path), review.web.head(path)
    assert head.status_code == got.status_code and head.get_data() == b""
    assert head.headers["Content-Length"] == got.headers["Content-Length"]


@pytest.mark.parametrize("method", ["get", "post", "FOO"])
def test_a_method_not_served_lists_every_method_of_the_path(review: Review, method: str) -> None:
    """RFC 9110 §15.5.6: ``Allow`` names every method of the resource; ``/review/login`` has one rule
    for GET and one for POST (a lower-case method was answered with the methods of one of them)."""
    response = review.web.open("/review/login", method=method)
    assert response.status_code == 405
    assert {m.strip() for m in response.headers["Allow"].split(",")} >= {"GET", "HEAD", "POST"}


def test_sign_in_sets_a_strict_session_cookie_and_goes_where_asked(review: Review) -> None:
    response = review.sign_in(target="/review/timeline?outcome=refused")
    assert response.status_code == 303
    assert response.headers["Location"] == "/review/timeline?outcome=refused"
    cookie = next(c for c in response.headers.getlist("Set-Cookie") if c.startswith("sts_review="))
    attributes = {a.strip().split("=")[0].lower() for a in cookie.split(";")}
    assert {"httponly", "secure", "path", "samesite"} <= attributes  # the issuer is https
    assert "SameSite=Strict" in cookie and "Path=/review" in cookie
    cleared = next(c for c in response.headers.getlist("Set-Cookie") if c.startswith("sts_review_login="))
    assert "Secure" in cleared and "HttpOnly" in cleared and "SameSite=Strict" in cleared
    assert "refused" in review.page("/review/timeline", outcome="refused")


def test_wrong_password_unknown_user_and_missing_form_token(review: Review) -> None:
    for username, password in ((REVIEWER, "wrong"), ("mallory", PASSWORD), (REVIEWER, "")):
        response = review.sign_in(username, password)
        assert response.status_code == 401
        assert "Unknown user or wrong password." in response.get_data(as_text=True)
        assert not any(c.startswith("sts_review=") for c in response.headers.getlist("Set-Cookie"))
    fresh = review.app.test_client()
    forged = fresh.post("/review/login", data={"username": REVIEWER, "password": PASSWORD, "csrf": "x"})
    assert forged.status_code == 400
    assert fresh.get("/review/").status_code == 401


def attempt(review: Review, username: str, password: str, address: str = "127.0.0.1") -> TestResponse:
    """One sign-in from ``address`` (a client of its own), with a fresh form token."""
    web = review.app.test_client()
    web.environ_base["REMOTE_ADDR"] = address
    review.web = web
    return review.sign_in(username, password)


def test_sign_ins_are_throttled_per_user_before_the_hash_is_computed(
    review: Review, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Five tries a minute per user name (OWASP ASVS V2.2.1): the sixth is 429 with Retry-After,
    even with the right password, and costs no hash; a minute later the user signs in."""
    import sts.http.review as review_module

    hashed: list[str] = []
    verify = review_module.verify_secret
    monkeypatch.setattr(review_module, "verify_secret", lambda *a: hashed.append("h") or verify(*a))
    for number in range(5):
        assert attempt(review, REVIEWER, "wrong", f"10.0.{number}.1").status_code == 401
    assert len(hashed) == 5
    throttled = attempt(review, REVIEWER, PASSWORD, "10.0.9.1")
    assert throttled.status_code == 429
    assert 1 <= int(throttled.headers["Retry-After"]) <= 60
    assert "Too many sign-in attempts" in throttled.get_data(as_text=True)
    assert not any(c.startswith("sts_review=") for c in throttled.headers.getlist("Set-Cookie"))
    assert len(hashed) == 5
    # Another user is not held back by it.
    assert attempt(review, "mallory", "x", "10.0.9.1").status_code == 401
    review.clock.now += 60
    assert attempt(review, REVIEWER, PASSWORD, "10.0.9.1").status_code == 303


def test_sign_ins_are_throttled_per_network_and_for_everyone(review: Review) -> None:
    """Ten tries a minute from one /24 network, whatever the user names; twenty at once from
    everywhere (then one a second): a flood cannot spend the CPU that issues tokens on hashes."""
    for number in range(10):
        assert attempt(review, f"guess{number}", "x", f"192.0.2.{number}").status_code == 401
    assert attempt(review, "guess-next", "x", "192.0.2.77").status_code == 429
    assert attempt(review, "elsewhere", "x", "198.51.100.1").status_code == 401
    review.clock.now += 120
    statuses = [attempt(review, f"u{n}", "x", f"203.0.{n}.1").status_code for n in range(21)]
    assert statuses == [401] * 20 + [429]


def test_the_password_check_lets_the_workers_other_requests_run(
    review: Review, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The hash runs outside the worker's turn (:func:`sts.adapters.request_threads.waiting`)."""
    import contextlib

    import sts.wiring.review as wiring

    entered: list[bool] = []

    @contextlib.contextmanager
    def recording() -> Iterator[None]:
        entered.append(True)
        yield

    monkeypatch.setattr(wiring, "waiting", recording)
    assert attempt(review, REVIEWER, PASSWORD).status_code == 303
    assert entered == [True]


def test_signing_out_ends_the_session_for_every_copy_of_the_cookie(review: Review) -> None:
    """OWASP ASVS V3.3.1: a copied cookie stops working once its session signs out, on this
    instance and on another sharing the store."""
    review.sign_in()
    cookie = review.web.get_cookie("sts_review", path="/review")
    assert cookie is not None
    copy = review.app.test_client()
    copy.set_cookie("sts_review", cookie.value, path="/review")
    other = create_app(review.app.extensions["sts"].settings, clock=review.clock).test_client()
    other.set_cookie("sts_review", cookie.value, path="/review")
    assert copy.get("/review/timeline").status_code == 200
    assert other.get("/review/timeline").status_code == 200
    csrf = re.search(r'name="csrf" value="([^"]+)"', review.page("/review/"))
    assert csrf is not None
    assert review.web.post("/review/logout", data={"csrf": csrf.group(1)}).status_code == 303
    assert copy.get("/review/timeline").status_code == 401
    assert other.get("/review/timeline").status_code == 401
    # A new sign-in is a new session.
    review.sign_in()
    assert review.web.get("/review/timeline").status_code == 200


@pytest.mark.parametrize("backend", ["embedded", "redis", "postgresql"])
def test_throttle_and_sign_out_hold_on_every_store(
    backend: str, request: pytest.FixtureRequest, make_settings: Callable[..., Settings]
) -> None:
    """The sign-in counts and the ended sessions live in the shared store: two instances on one
    Redis or PostgreSQL (or SQLite file) see the same ones."""
    stores: dict[str, Any] = {}
    if backend == "redis":
        stores = {"store": "redis", "redis_url": request.getfixturevalue("fresh_redis_url")}
    elif backend == "postgresql":
        stores = {"database_url": request.getfixturevalue("pg").url}
    settings = make_settings(review_policy(), **review_settings(**stores))
    clock = Clock(float(int(time.time())))
    apps = [create_app(settings, clock=clock) for _ in range(2)]
    one, two = (Review(app, app.test_client(), clock, {}) for app in apps)
    assert attempt(one, REVIEWER, PASSWORD).status_code == 303
    session = one.web.get_cookie("sts_review", path="/review")
    assert session is not None
    for number in range(4):
        assert attempt(two if number % 2 else one, REVIEWER, "wrong", f"10.9.{number}.1").status_code == 401
    assert attempt(two, REVIEWER, PASSWORD, "10.9.8.1").status_code == 429
    copy = two.app.test_client()
    copy.set_cookie("sts_review", session.value, path="/review")
    assert copy.get("/review/timeline").status_code == 200
    one.web.set_cookie("sts_review", session.value, path="/review")
    csrf = re.search(r'name="csrf" value="([^"]+)"', one.page("/review/"))
    assert csrf is not None
    assert one.web.post("/review/logout", data={"csrf": csrf.group(1)}).status_code == 303
    assert copy.get("/review/timeline").status_code == 401


def test_users_with_hashes_of_several_costs_are_warned_about(
    make_settings: Callable[..., Settings], caplog: pytest.LogCaptureFixture
) -> None:
    """A wrong password takes less time for a user whose hash is cheaper than the dearest (which an
    unknown name costs): that tells the name is a user's.  Said at start; one kind, nothing said."""
    one_kind = [{"username": n, "password_hash": hash_secret("p", slow=True)} for n in ("ann", "cy")]
    with caplog.at_level(logging.WARNING, logger="sts.wiring.review"):
        create_app(make_settings(review={"enabled": True, "users": one_kind}))
    assert "hashes of" not in caplog.text
    mixed = [*one_kind, {"username": "dee", "password_hash": hash_secret("generated")}]
    with caplog.at_level(logging.WARNING, logger="sts.wiring.review"):
        create_app(make_settings(review={"enabled": True, "users": mixed}))
    assert "review.users: password hashes of 2 kinds or costs (pbkdf2-sha256$600000, sha256)" in caplog.text


def test_a_slow_hash_signs_in_too(make_settings: Callable[..., Settings], upstream: RunningServer) -> None:
    users = [{"username": "carol", "password_hash": hash_secret("a chosen passphrase", slow=True)}]
    app = create_app(make_settings(review_policy(), review={"enabled": True, "users": users}))
    review = Review(app, app.test_client(), Clock(0), {})
    assert review.sign_in("carol", "a chosen passphrase").status_code == 303
    assert review.web.get("/review/").status_code == 200


def test_sessions_expire_end_with_a_new_password_and_cannot_be_forged(
    review: Review, make_settings: Callable[..., Settings]
) -> None:
    review.sign_in()
    assert review.web.get("/review/").status_code == 200
    review.clock.now += 8 * 3600 + 1
    assert review.web.get("/review/").status_code == 401
    review.sign_in()
    cookie = review.web.get_cookie("sts_review", path="/review")
    assert cookie is not None
    other = review.app.test_client()
    # One character of the signature changed: the third from the end, whose six bits all count
    # (the last one of unpadded base64url carries bits that decoding ignores, so changing only
    # the end could give the same signature back, about once in a thousand runs).
    value = cookie.value
    forged = value[:-3] + ("A" if value[-3] != "A" else "B") + value[-2:]
    other.set_cookie("sts_review", forged, path="/review")
    assert other.get("/review/").status_code == 401
    # The same cookie under a changed password (same key directory): refused.
    new_password = [{"username": REVIEWER, "password_hash": hash_secret("new one")}]
    settings = make_settings(
        review_policy(), **review_settings(review={"enabled": True, "users": new_password})
    )
    changed = create_app(settings, clock=review.clock)
    moved = changed.test_client()
    moved.set_cookie("sts_review", cookie.value, path="/review")
    assert moved.get("/review/").status_code == 401


def test_sign_out(review: Review) -> None:
    review.sign_in()
    body = review.page("/review/")
    csrf = re.search(r'name="csrf" value="([^"]+)"', body)
    assert csrf is not None
    assert review.web.post("/review/logout", data={"csrf": "nope"}).status_code == 400
    response = review.web.post("/review/logout", data={"csrf": csrf.group(1)})
    assert response.status_code == 303
    assert review.web.get("/review/").status_code == 401


def test_no_open_redirect(review: Review) -> None:
    for target in ("//evil.example/review/", "https://evil.example/", "/elsewhere", "/review\\@evil",
                   "/review/\r\nSet-Cookie: x=1"):  # fmt: skip
        assert review.sign_in(target=target).headers["Location"] == "/review/"
        review.web.delete_cookie("sts_review", path="/review")


def test_no_redirect_out_of_the_page_through_dot_segments(review: Review) -> None:
    """Dot segments, which the browser resolves, led out of the page to another path of the site, or
    to ``//evil.example/x`` on it (an outside red team)."""
    for target in ("/review/../.well-known/openid-configuration", "/review/..//evil.example/x",
                   "/review/%2e%2e/x", "/review/%2E%2E", "/review/./."):  # fmt: skip
        assert review.sign_in(target=target).headers["Location"] == "/review/"
        review.web.delete_cookie("sts_review", path="/review")
        review.clock.advance(60)  # past the sign-in limit
    assert review.sign_in(target="/review/timeline?outcome=refused").headers["Location"] == (
        "/review/timeline?outcome=refused"
    )


# -- what the pages show --------------------------------------------------------------------------


def test_every_page_is_locked_down(review: Review) -> None:
    review.sign_in()
    for path in PAGES:
        response = review.web.get(path)
        assert response.status_code == 200, path
        csp = response.headers["Content-Security-Policy"]
        assert "default-src 'none'" in csp and "script-src" not in csp and "frame-ancestors 'none'" in csp
        assert response.headers["Cache-Control"] == "no-store"
        assert response.headers["Referrer-Policy"] == "no-referrer"
        assert response.headers["Strict-Transport-Security"] == "max-age=31536000"  # the issuer is https
        body = response.get_data(as_text=True)
        assert "<script" not in body and "http://" not in body.replace(
            'xmlns="http://www.w3.org/2000/svg"', ""
        )
    css = review.web.get("/review/review.css")
    assert css.status_code == 200 and css.mimetype == "text/css"
    assert "Strict-Transport-Security" in review.web.get("/review/login").headers


def test_no_hsts_under_an_http_issuer(make_settings: Callable[..., Settings]) -> None:
    """Strict-Transport-Security only with an https issuer (a loopback http one is for development)."""
    app = create_app(make_settings(review_policy(), **review_settings(issuer="http://127.0.0.1:8080")))
    response = app.test_client().get("/review/login")
    assert response.status_code == 200 and "Strict-Transport-Security" not in response.headers


def test_timeline_filters_and_pages(review: Review) -> None:
    review.sign_in()
    body = review.page("/review/timeline")
    assert body.count('<tr class="decision ') == review.made["decisions"]
    refused = review.page("/review/timeline", outcome="refused")
    assert refused.count('<tr class="decision refused"') == 4 and 'class="decision granted"' not in refused
    step_ups = review.page("/review/timeline", error="insufficient_user_authentication")
    assert step_ups.count('<tr class="decision ') == 1 and "elevated_privilege" in step_ups
    drift = review.page("/review/timeline", signal="attestation_drift")
    assert drift.count('<tr class="decision refused"') == 1
    narrowed = review.page("/review/timeline", signal="unusual_network")
    assert narrowed.count('<tr class="decision ') == 1 and "elevated_privilege" in narrowed
    assert review.page("/review/timeline", audience=REPORTS).count('<tr class="decision ') == 1
    recent = review.page("/review/timeline", since="2h")
    assert recent.count('<tr class="decision ') == review.made["decisions"] - 5
    bad = review.web.get("/review/timeline", query_string={"since": "<b>soon</b>"})
    assert bad.status_code == 400
    assert "&lt;b&gt;soon&lt;/b&gt;" in bad.get_data(as_text=True) and "<b>soon" not in bad.get_data(
        as_text=True
    )


def test_review_without_its_slash_goes_to_the_overview_by_a_path(review: Review) -> None:
    """Not to an address made from the Host header (Werkzeug's own redirect for a missing slash),
    which a request chooses and a shared cache could keep for others."""
    for signed_in in (False, True):
        if signed_in:
            review.sign_in()
        response = review.web.get("/review", headers={"Host": "evil.example.com"})
        assert response.status_code == 308, signed_in
        assert response.headers["Location"] == "/review/"
        assert response.headers["Cache-Control"] == "no-store"
        # Nor does a doubled slash get Werkzeug's redirect to the Host header's address.
        doubled = review.web.get("/review//timeline", headers={"Host": "evil.example.com"})
        assert doubled.status_code == 404 and "Location" not in doubled.headers, signed_in
    assert "outcomes-chart" in review.page("/review/")


def test_numbers_and_times_out_of_range_are_refused_or_taken_as_bounds(review: Review) -> None:
    """Ids past 64 bits and times past the calendar never reach the database as such: an unknown
    decision is 404, a page bound that is no record id 400, a time beyond the bounds the bound."""
    review.sign_in()
    every = review.made["decisions"]
    for since, until in (("0001-01-01", None), (None, "9999-12-31T23:59:59"), ("999999w", None)):
        query = {k: v for k, v in (("since", since), ("until", until)) if v}
        assert review.page("/review/timeline", **query).count('<tr class="decision ') == every, query
    for before in ("9223372036854775808", "99999999999999999999999", "0", "-3", "1.5"):
        response = review.web.get("/review/timeline", query_string={"before": before})
        assert response.status_code == 400, before
        assert "before: must be a record id" in response.get_data(as_text=True)
    for audit_id in ("9223372036854775808", "99999999999999999999999"):
        response = review.web.get(f"/review/decision/{audit_id}")
        assert response.status_code == 404 and f"No decision {audit_id}." in response.get_data(as_text=True)
    assert review.web.get("/review/decision/9223372036854775807").status_code == 404


def test_markup_in_a_record_is_shown_as_text(review: Review) -> None:
    review.sign_in()
    body = review.page("/review/timeline")
    assert "onerror" in body and '<img src=x onerror="alert(1)">' not in body
    assert "&lt;img src=x onerror=&#34;alert(1)&#34;&gt;" in body
    assert MARKUP_REPO not in body


def test_invisible_characters_in_a_record_are_shown_as_escapes(
    review: Review, upstream: RunningServer
) -> None:
    """A bidi override or a zero-width space would make two identities look alike (or reverse the
    text after it): the page writes them as ``\\u202e``, as ``sts audit`` does."""
    sneaky = "https://deploy.example.com/\u202eniam\u200b\u00a0\u3164\u034f\u2800"
    subject = upstream.issuer.github_actions_token(audience=STS_ISSUER, now=review.clock.now)
    refused = review.app.test_client().post("/token", data=exchange_form(subject, audience=sneaky))
    assert refused.status_code == 400
    review.sign_in()
    for path in ("/review/timeline", "/review/decision/13"):
        body = review.page(path)
        assert "niam" in body, path
        # Also those Python calls printable that show nothing: Hangul filler, grapheme joiner, blank.
        assert not {"\u202e", "\u200b", "\u00a0", "\u3164", "\u034f", "\u2800"} & set(body), path
        assert "\\u202eniam\\u200b\\u00a0\\u3164\\u034f\\u2800" in body, path


def test_overview_charts(review: Review) -> None:
    review.sign_in()
    body = review.page("/review/")
    assert (
        '<svg id="outcomes-chart"' in body
        and '<rect class="granted"' in body
        and '<rect class="refused"' in body
    )
    assert '<svg id="signals-chart"' in body
    for name in ("unusual_network", "elevated_privilege", "attestation_drift"):
        assert f">{name}</tspan></text>" in body
    assert 'id="chain-status"' in body
    week = review.page("/review/", window="30d")
    assert ">8</span> granted" in week and ">4</span> refused" in week


def test_the_overview_verifies_the_newest_records_and_shows_an_edit(
    review: Review, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The chain card checks the newest records itself (at most once a minute per process)."""
    import sts.wiring.review as wiring

    review.sign_in()
    body = review.page("/review/")
    assert '<span class="chain-verified">verified</span>' in body and "the newest 12 records" in body
    engine = review.app.extensions["sts"].engine
    with engine.begin() as conn:
        conn.execute(text("UPDATE audit_events SET outcome = 'granted', error = NULL WHERE id = 12"))
    assert "chain-verified" in review.page("/review/")  # the answer is kept for a minute
    monkeypatch.setattr(wiring, "CHAIN_STATUS_SECONDS", 0.0)
    edited = review.page("/review/")
    assert '<span class="chain-broken">broken</span>' in edited and "(record id 12)" in edited


def test_the_overview_finds_summaries_that_disagree_with_the_records(
    review: Review, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The charts, the graph and the signal and audience filters read the summary tables, which no
    chain covers: the watermark moved past the newest record hid every later decision from them
    while the card said *verified* (an outside audit)."""
    import sts.wiring.review as wiring

    monkeypatch.setattr(wiring, "CHAIN_STATUS_SECONDS", 0.0)
    review.sign_in()
    assert '<span class="chain-verified">verified</span>' in review.page("/review/")
    engine = review.app.extensions["sts"].engine
    with engine.begin() as conn:
        conn.execute(text("UPDATE audit_summary_state SET last_id = last_id + 1000000"))
    body = review.page("/review/")
    assert '<span class="chain-broken">broken</span>' in body
    assert "the summaries disagree with the records: summaries claim records up to id" in body


def test_identity_page(review: Review) -> None:
    review.sign_in()
    body = review.page("/review/identity", issuer="upstream", subject=APP)
    baseline = body[body.index('id="baseline"') : body.index('id="signals"')]
    assert "<th>count</th><td>7</td>" in baseline.replace("\n", "")
    assert "10.1.2.0/24" in baseline and "192.0.2.0/24" in baseline and "github-hosted" in baseline
    signals = body[body.index('id="signals"') : body.index('id="step-ups"')]
    assert "unusual_network" in signals and "elevated_privilege" in signals
    step_ups = body[body.index('id="step-ups"') : body.index('id="tokens"')]
    assert "elevated_privilege" in step_ups and "risk.step_up" in step_ups
    tokens = body[body.index('id="tokens"') : body.index('id="recent"')]
    assert tokens.count("<tr><td><a") == 7 and DEPLOY in tokens and "deploy:read" in tokens


def test_identity_page_of_self_shows_the_re_exchange_baseline_of_the_workload(review: Review) -> None:
    """A record's issuer ``self`` (a token of ours re-exchanged): the baseline is kept per upstream
    issuer, ``self:<issuer>|<sub>``, and the page shows it (it looked at ``self|<sub>`` alone)."""
    review.sign_in()
    baselines = review.app.extensions["sts"].baselines
    baselines.save(identity_key("self:upstream", APP), Baseline(count=3, max_depth=2), 3600)
    body = review.page("/review/identity", issuer="self", subject=APP)
    baseline = body[body.index('id="baseline"') : body.index('id="signals"')].replace("\n", "")
    assert "<th>count</th><td>3</td>" in baseline and "<th>max_depth</th><td>2</td>" in baseline
    assert f"Baseline of self:upstream / {APP}" in baseline  # which one is shown is said
    assert "Also kept" not in baseline
    baselines.save(identity_key("self", APP), Baseline(count=1), 3600)  # and one of an older token
    both = review.page("/review/identity", issuer="self", subject=APP)
    assert "Also kept for this subject" in both and "identity?issuer=self%3Aupstream" in both
    # An issuer of nothing before the colon is no identity: 400, as an empty one (it was a 503
    # and a traceback in the log: a review).
    for bad in (":x", "self:", "upstream:bogus", "self:up:stream"):  # (``upstream:bogus`` showed upstream's)
        assert (
            review.web.get("/review/identity", query_string={"issuer": bad, "subject": APP}).status_code
            == 400
        )
    direct = review.page("/review/identity", issuer="self:upstream", subject=APP)
    assert "<th>count</th><td>3</td>" in direct.replace("\n", "")
    # Its decisions are the trail's ``self`` ones (the re-check: the linked page said none), and
    # the page links back to the ``self`` view.
    assert "timeline?issuer=self&amp;subject=" in direct and "identity?issuer=self&amp;subject=" in direct


def test_no_token_is_ever_shown(review: Review) -> None:
    review.sign_in()
    pages = [review.page(p) for p in PAGES] + [
        review.page(f"/review/decision/{i}") for i in range(1, review.made["decisions"] + 1)
    ]
    for token in review.made["issued"]:
        signature = token.split(".")[2]
        assert all(signature not in page for page in pages)
    decision = review.page("/review/decision/1")
    full_hashes = re.findall(r"\b[0-9a-f]{64}\b", decision)
    assert full_hashes == []


def test_graph_marks_new_edges(review: Review) -> None:
    review.sign_in()
    body = review.page("/review/graph")
    assert '<svg id="edge-graph"' in body
    assert body.count('<path class="edge new"') == 1 and body.count('<path class="edge"') == 1
    assert f"upstream / {REPORTS_JOB}" in body and REPORTS in body
    assert ">new</tspan></text>" in body
    # A week later, the reports edge is no longer new (but still drawn: the window is 30 days).
    review.clock.now += 8 * 86400
    review.sign_in()
    later = review.page("/review/graph")
    assert '<path class="edge new"' not in later and later.count('<path class="edge"') == 2


def test_an_unreadable_audit_trail_is_a_503_page(review: Review) -> None:
    review.sign_in()
    with review.app.extensions["sts"].engine.begin() as conn:
        conn.execute(text("DROP TABLE audit_events"))
    response = review.web.get("/review/timeline")
    assert response.status_code == 503
    body = response.get_data(as_text=True)
    assert "The audit trail cannot be read right now." in body and "Traceback" not in body


def test_records_that_are_not_json_objects_are_listed_not_a_500(
    review: Review, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A trail edited by hand (a record that is an array, a string, or not JSON at all) still shows
    every page, each such record marked unreadable, and the overview calls the chain broken: an
    outside audit had the timeline, the identity page and the decision answer 500."""
    import sts.wiring.review as wiring

    monkeypatch.setattr(wiring, "CHAIN_STATUS_SECONDS", 0.0)
    review.sign_in()
    engine = review.app.extensions["sts"].engine
    with engine.begin() as conn:
        for audit_id, text_value in ((4, "[]"), (5, '"x"'), (6, "not json {")):
            conn.execute(
                text("UPDATE audit_events SET record = :r WHERE id = :i"), {"r": text_value, "i": audit_id}
            )
    for path in (
        "/review/timeline",
        "/review/",
        "/review/decision/4",
        "/review/decision/5",
        "/review/decision/6",
    ):
        assert "unreadable" in review.page(path) or path == "/review/", path
    review.page("/review/identity", issuer="upstream", subject=APP)
    review.page("/review/graph")
    assert '<span class="chain-broken">broken</span>' in review.page("/review/")
    # ``sts audit tail`` and ``export`` read them the same way.
    outcomes = [r["outcome"] for r in review.app.extensions["sts"].audit.recent()]
    assert outcomes.count("unreadable") == 3


def test_a_record_whose_signals_are_not_objects_leaves_the_summaries_and_filters_working(
    review: Review,
) -> None:
    """A record edited by hand so that an item of ``details.risk.signals`` is no object (a string, a
    number): on SQLite, the summaries and every filter by signal failed with "malformed JSON" on
    each run, the page, ``sts audit summarize`` and ``sts audit query --signal`` alike (an outside
    audit); PostgreSQL reads such an item as no signal."""
    review.sign_in()
    engine = review.app.extensions["sts"].engine
    with engine.begin() as conn:
        record = json.loads(conn.execute(text("SELECT record FROM audit_events WHERE id = 3")).scalar_one())
        record.setdefault("details", {}).setdefault("risk", {})["signals"] = [
            "x",
            5,
            None,
            {"name": "unusual_network", "fired": True},
        ]
        conn.execute(text("UPDATE audit_events SET record = :r WHERE id = 3"), {"r": json.dumps(record)})
    review.page("/review/")
    review.page("/review/timeline", signal="attestation_drift")
    assert "/review/decision/3" in review.page("/review/timeline", signal="unusual_network")


@pytest.mark.parametrize("forgery", ["unchained", "unregistered chain"])
def test_the_overview_sees_forged_records_on_top_of_the_timeline(
    review: Review, monkeypatch: pytest.MonkeyPatch, forgery: str
) -> None:
    """A grant inserted as the newest record, without a chain or in a chain never registered, is no
    record the service wrote: the chain card says broken (an outside audit had it say verified)."""
    import sts.wiring.review as wiring

    monkeypatch.setattr(wiring, "CHAIN_STATUS_SECONDS", 0.0)
    review.sign_in()
    assert '<span class="chain-verified">verified</span>' in review.page("/review/")
    from sts.core.audit_chain import genesis_hash, link_hash

    engine = review.app.extensions["sts"].engine
    with engine.begin() as conn:
        record = conn.execute(text("SELECT record FROM audit_events WHERE id = 3")).scalar_one()
        # A made-up chain whose one record links and hashes as a chain's first would.
        chain = None if forgery == "unchained" else "0123456789abcdef0123456789abcdef"
        prev = genesis_hash(chain) if chain else None
        digest = link_hash(prev, chain, 1, record) if chain and prev else None
        conn.execute(
            text(
                "INSERT INTO audit_events (chain_id, seq, prev_hash, hash, event_id, time, request_id,"
                " endpoint, outcome, error, client_id, client_auth_method, issuer, subject,"
                " subject_token_type, subject_token_sha256, subject_token_jti, rule, issued_jti,"
                " issued_exp, issued_kid, source_ip, record) SELECT :chain, :seq, :prev, :hash, event_id,"
                " time, request_id, endpoint, outcome, error, client_id, client_auth_method, issuer,"
                " subject, subject_token_type, subject_token_sha256, subject_token_jti, rule, issued_jti,"
                " issued_exp, issued_kid, source_ip, record FROM audit_events WHERE id = 3"
            ),
            {"chain": chain, "seq": 1 if chain else None, "prev": prev, "hash": digest},
        )
    assert '<span class="chain-broken">broken</span>' in review.page("/review/")


@pytest.mark.parametrize(
    "edited",
    [
        '{"outcome":"granted","time":1e400}',
        '{"outcome":"granted","time":"x"}',
        '{"outcome":"granted","details":{"risk":{"signals":"x"}}}',
        '{"outcome":"granted","granted_audience":"abc","granted_scope":5}',
        '{"outcome":5,"issuer":[1],"subject":{"a":1}}',
        '{"outcome":"refused","reasons":5}',
    ],
    ids=[
        "huge-time",
        "text-time",
        "signals-text",
        "lists-as-scalars",
        "columns-as-containers",
        "reasons-number",
    ],
)
def test_records_with_members_of_other_types_are_never_a_500(review: Review, edited: str) -> None:
    """A JSON object the service never writes (members of other types, a number beyond a float):
    each page answers, at worst, that the trail cannot be read (503), never a 500 (an outside
    review of the fix for records that are not objects found these)."""
    review.sign_in()
    with review.app.extensions["sts"].engine.begin() as conn:
        conn.execute(text("UPDATE audit_events SET record = :r WHERE id = 4"), {"r": edited})
    for path, query in (
        ("/review/", {}),
        ("/review/timeline", {}),
        ("/review/decision/4", {}),
        ("/review/graph", {}),
        ("/review/identity", {"issuer": "upstream", "subject": APP}),
        ("/review/timeline", {"signal": "attestation_drift"}),
    ):
        response = review.web.get(path, query_string=query)
        assert response.status_code in (200, 503), (path, response.status_code)
        assert "Traceback" not in response.get_data(as_text=True)


@pytest.mark.parametrize("depth", [400, 5000])
def test_a_record_nested_too_deeply_to_show_is_shown_to_a_depth(review: Review, depth: int) -> None:
    """A record nested 300 levels deep (only a hand-edited one is) made its page fail with a
    ``RecursionError``, a 500 (an outside red team); it is shown to a depth now.  One too deep to
    decode (thousands of levels: a later review) reads as an unreadable decision, on every page."""
    review.sign_in()
    deep = '{"outcome":"granted","details":{"x":' + "[" * depth + "1" + "]" * depth + "}}"
    with review.app.extensions["sts"].engine.begin() as conn:
        conn.execute(text("UPDATE audit_events SET record = :r WHERE id = 4"), {"r": deep})
    page = review.page("/review/decision/4")
    assert ("nested too deeply to show" if depth < 1000 else "unreadable") in page
    for path in ("/review/", "/review/timeline", "/review/graph"):
        response = review.web.get(path)
        assert response.status_code in (200, 503), (path, response.status_code)


def test_a_signed_out_session_stays_out_when_the_lifetime_is_raised(
    make_settings: Callable[..., Settings],
) -> None:
    """The sign-out was kept for the lifetime set at the time, the cookie checked against the one
    set now: raising ``session_lifetime`` brought a signed-out session back once the first had
    passed (a re-check).  It is kept as long as any setting lets a session last."""
    users = [{"username": REVIEWER, "password_hash": hash_secret(PASSWORD)}]
    clock = Clock(float(int(time.time())))
    short = make_settings(review_policy(), **review_settings(review={"enabled": True, "users": users,
                                                                     "session_lifetime": 300}))  # fmt: skip
    app = create_app(short, clock=clock)
    one = Review(app, app.test_client(), clock, {})
    assert one.sign_in().status_code == 303
    session = one.web.get_cookie("sts_review", path="/review")
    assert session is not None
    csrf = re.search(r'name="csrf" value="([^"]+)"', one.page("/review/"))
    assert csrf is not None
    assert one.web.post("/review/logout", data={"csrf": csrf.group(1)}).status_code == 303
    longer = replace(short, review=replace(short.review, session_lifetime=86400))
    copy = create_app(longer, clock=clock).test_client()
    copy.set_cookie("sts_review", session.value, path="/review")
    assert copy.get("/review/timeline").status_code == 401
    clock.now += 301
    assert copy.get("/review/timeline").status_code == 401


def test_with_redis_sign_outs_are_read_from_the_database_as_long_as_a_session_lasts(
    make_settings: Callable[..., Settings], fresh_redis_url: str
) -> None:
    """After a Redis loss, what was revoked is read from the database for a token's lifetime: a
    signed-out review session (up to 24 h) came back an hour after the loss (a re-check)."""
    import json as json_module
    from importlib import resources

    from sts.adapters.sql.engines import make_engine
    from sts.http.review import MAX_SESSION_LIFETIME
    from sts.migrations import upgrade
    from sts.wiring.stores import open_stores

    schema = json_module.loads(resources.files("sts.schemas").joinpath("config.schema.json").read_text())
    lifetime = schema["properties"]["review"]["properties"]["session_lifetime"]
    assert lifetime["maximum"] == MAX_SESSION_LIFETIME  # the constant is the setting's bound
    settings = make_settings(review_policy(), **review_settings(store="redis", redis_url=fresh_redis_url))
    engine = make_engine(settings.database_url)
    upgrade(engine)
    try:
        stores = open_stores(settings, engine, time.time)
        assert getattr(stores.revoked, "max_lifetime", 0) >= MAX_SESSION_LIFETIME
        without = replace(settings, review=replace(settings.review, enabled=False))
        assert (
            getattr(open_stores(without, engine, time.time).revoked, "max_lifetime", 0) < MAX_SESSION_LIFETIME
        )
    finally:
        engine.dispose()


@pytest.mark.parametrize(
    ("method", "path"),
    [("get", "/review/nope"), ("get", "/review/timeline/"), ("get", "/review/logout"), ("put", "/review/")],
)
def test_the_apps_own_errors_under_review_carry_the_pages_headers(
    review: Review, method: str, path: str
) -> None:
    """Routing's 404 and 405 under /review had no CSP nor frame headers (an outside audit; the module
    promises them on every answer there)."""
    response = getattr(review.web, method)(path)
    assert response.status_code in (404, 405)
    assert response.headers["Content-Security-Policy"] and response.headers["X-Frame-Options"] == "DENY"
    assert (
        response.headers["Referrer-Policy"] == "no-referrer"
        and response.headers["Cache-Control"] == "no-store"
    )
    outside = review.web.get("/nope")
    assert outside.status_code == 404 and "Content-Security-Policy" not in outside.headers
