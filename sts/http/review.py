"""The review page: a read-only view of the audit trail for operators, under ``/review/``.

Served only when ``review.enabled``.  What it shows:

* ``/review/``: decisions over time by outcome, the risk signals that fire most,
  how far the summaries have read, and the status of the audit chain (a slot
  filled once tamper evidence exists);
* ``/review/timeline``: decisions, newest first, with the filters of
  ``sts audit query`` (:class:`~sts.core.audit_filter.AuditFilter`), paged by id;
* ``/review/identity?issuer=...&subject=...``: one identity's baseline, recent
  signals, step-ups and issued tokens;
* ``/review/decision/<id>``: one record;
* ``/review/graph``: subject-to-audience edges, new ones marked.

Authentication is its own: a sign-in form (``POST /review/login``) checks a
configured user's password against its hash (made by ``sts clients secret``;
constant-time comparison, :mod:`sts.core.client_secrets`) and sets a signed,
expiring session cookie: ``HttpOnly``, ``SameSite=Strict``, ``Path=/review``,
``Secure`` when the issuer is https.  Without it every page answers 401 with the
sign-in form and nothing else, and ``WWW-Authenticate: Cookie`` (RFC 9110
§11.6.1 requires a challenge with 401; the ``Cookie`` scheme of
draft-broyer-http-cookie-auth names a form, so browsers show the page rather
than a password dialog).  The pages only read (GET); the two forms that POST
(sign in, sign out) carry a token checked against a cookie.  Every response is
``no-store`` with a Content-Security-Policy that allows nothing but this
page's own stylesheet: no script runs, and charts are inline SVG.  Records hold
token hashes, never tokens; hashes are shown shortened.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
import logging
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any
from urllib.parse import urlencode

from flask import Blueprint, Response, g, redirect, render_template, request
from itsdangerous import BadSignature, TimestampSigner, URLSafeTimedSerializer

from ..core.audit_filter import (
    MAX_RECORD_ID,
    OUTCOMES,
    SIGNAL_NAMES,
    STEP_UP_ERROR,
    AuditFilter,
    FilterError,
    filter_from_params,
    parse_record_id,
)
from ..core.audit_views import COUNT_CAP, AuditReader, fired_signals
from ..core.client_secrets import dummy_hash_like, verify_secret
from ..core.ports import BaselineStore, RevokedTokens, StoreUnavailable
from ..core.subject_state import identity_key
from ..errors import RateLimited, TemporarilyUnavailable
from . import review_svg, review_values
from .review_text import identity_issuer_ok, visible
from .review_values import display, short_hash, when

log = logging.getLogger(__name__)
#: The longest a sign-in may last (``review.session_lifetime``'s maximum in the config schema).
MAX_SESSION_LIFETIME = 86400

PREFIX = "/review"
SESSION_COOKIE = "sts_review"
LOGIN_COOKIE = "sts_review_login"
CSP = (
    "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'"
)
WINDOWS = {"24h": 86400, "7d": 7 * 86400, "30d": 30 * 86400, "90d": 90 * 86400}
_STEPS = {"24h": 3600, "7d": 6 * 3600, "30d": 86400, "90d": 3 * 86400}


@dataclass(frozen=True)
class ChainStatus:
    """What the audit chain's verification says, for the overview (filled in by tamper evidence)."""

    state: str  # "verified", "broken", "unknown"
    detail: str


@dataclass(frozen=True)
class ReviewConfig:
    users: Mapping[str, str]
    session_secret: bytes
    session_lifetime: int = 8 * 3600
    secure_cookie: bool = True
    new_edge_days: int = 7
    #: Tamper evidence (issue 14) plugs in here; None shows "not available".
    chain_status: Callable[[], ChainStatus] | None = None
    #: Admits a sign-in attempt (user name, client address, now) before its password hash is
    #: computed; raises :class:`RateLimited` or :class:`TemporarilyUnavailable`.
    admit_sign_in: Callable[[str, str | None, float], None] | None = None
    #: Sessions ended by signing out, for every instance (a copied cookie stops working).
    ended: RevokedTokens | None = None
    #: Runs the password check, letting the worker's other requests run meanwhile.
    slow: Callable[[Callable[[], bool]], bool] | None = None
    #: The configured issuers' names: re-exchanges of our tokens keep baselines as ``self:<name>``.
    issuer_names: tuple[str, ...] = ()


def _fingerprint(password_hash: str) -> str:
    """Sessions name the hash they were made under: changing a password ends them."""
    return hashlib.sha256(password_hash.encode()).hexdigest()[:16]


def _session_key(nonce: str) -> str:
    """A session's entry among the ended ones: a hash of its random nonce."""
    return "review-session:" + hashlib.sha256(nonce.encode()).hexdigest()[:32]


def blueprint(
    config: ReviewConfig,
    *,
    query: AuditReader,
    baselines: BaselineStore | None,
    clock: Callable[[], float],
) -> Blueprint:
    """The review blueprint, given everything it uses (it never reaches into the app)."""
    bp = Blueprint("review", __name__, url_prefix=PREFIX, template_folder="../templates")
    # Every value the templates print shows its invisible characters (see review_text).
    bp.record_once(lambda state: setattr(state.app.jinja_env, "finalize", visible))

    class ClockedSigner(TimestampSigner):
        """Session ages by the service's clock (a parameter), not the machine's."""

        def get_timestamp(self) -> int:
            return int(clock())

    signer = URLSafeTimedSerializer(config.session_secret, salt="sts-review-session", signer=ClockedSigner)
    css = resources.files("sts").joinpath("static/review/review.css").read_bytes()
    unknown_user = dummy_hash_like(list(config.users.values()))  # costs what the slowest user's does

    def cookie(response: Response, name: str, value: str, max_age: int) -> None:
        response.set_cookie(name, value, max_age=max_age, path=PREFIX, secure=config.secure_cookie,
                            httponly=True, samesite="Strict")  # fmt: skip

    def session_user() -> tuple[str, str] | None:
        raw = request.cookies.get(SESSION_COOKIE)
        if not raw:
            return None
        try:
            data = signer.loads(raw, max_age=config.session_lifetime)
        except BadSignature:
            return None
        if not isinstance(data, dict):
            return None
        user, stored = data.get("u"), config.users.get(str(data.get("u")))
        if stored is None or not hmac.compare_digest(str(data.get("h")), _fingerprint(stored)):
            return None
        nonce = str(data.get("c", ""))
        try:
            if config.ended is not None and config.ended.revoked(_session_key(nonce)):
                return None
        except StoreUnavailable:
            return None  # Whether it was ended cannot be told: not signed in (fail closed).
        return str(user), nonce

    def safe_next(target: str | None) -> str:
        return review_values.safe_next(target, PREFIX)

    def login_page(status: int, message: str = "", target: str | None = None) -> Response:
        token = secrets.token_urlsafe(24)
        here = request.full_path.rstrip("?") if request.method in ("GET", "HEAD") else None
        body = render_template(
            "review/login.html", csrf=token, message=message, next=safe_next(target or here)
        )
        response = Response(body, status=status, mimetype="text/html")
        cookie(response, LOGIN_COOKIE, token, 3600)
        if status == 401:
            response.headers["WWW-Authenticate"] = (
                f'Cookie realm="sts review", form-action="{PREFIX}/login", cookie-name="{SESSION_COOKIE}"'
            )
        return response

    @bp.before_request
    def require_sign_in() -> Response | None:
        if request.endpoint in ("review.login", "review.login_submit", "review.stylesheet", "review.root"):
            return None
        found = session_user()
        if found is None:
            return login_page(401)
        g.review_user, g.review_csrf = found
        return None

    @bp.after_app_request  # every answer under /review, the app's own 404 and 405 there too (a re-check)
    def headers(response: Response) -> Response:
        if not request.path.lstrip("/").startswith(PREFIX.lstrip("/")):
            return response
        response.headers.update({"Content-Security-Policy": CSP, "Referrer-Policy": "no-referrer"})
        response.headers.update({"X-Frame-Options": "DENY", "X-Content-Type-Options": "nosniff"})
        if config.secure_cookie:  # An https issuer: browsers keep to https (RFC 6797).
            response.headers["Strict-Transport-Security"] = "max-age=31536000"
        if request.endpoint != "review.stylesheet":
            response.headers["Cache-Control"] = "no-store"
        return response

    @bp.get("/review.css")
    def stylesheet() -> Response:
        response = Response(css, mimetype="text/css")
        response.headers["Cache-Control"] = "public, max-age=3600"
        return response

    @bp.get("/login")
    def login() -> Response:
        if session_user() is not None:
            return redirect(safe_next(request.args.get("next")), 303)  # type: ignore[return-value]
        return login_page(200, target=request.args.get("next"))

    @bp.post("/login")
    def login_submit() -> Response:
        form = request.form
        target = form.get("next")
        expected = request.cookies.get(LOGIN_COOKIE, "")
        if not expected or not hmac.compare_digest(form.get("csrf", "").encode(), expected.encode()):
            return login_page(400, "The sign-in form expired; please try again.", target)
        username, password = form.get("username", "")[:64], form.get("password", "")[:1024]
        try:
            if config.admit_sign_in is not None:
                config.admit_sign_in(username, g.get("client_address"), clock())
        except RateLimited as exc:
            log.warning("review sign-in throttled (%s) from %s", exc.reason, g.get("client_address"))
            message = f"Too many sign-in attempts; try again in {exc.retry_after} s."
            throttled = login_page(429, message, target)
            throttled.headers["Retry-After"] = str(exc.retry_after)
            return throttled
        except TemporarilyUnavailable:
            return login_page(503, "Signing in is unavailable for a moment; try again.", target)
        stored = config.users.get(username)
        check = functools.partial(verify_secret, password, stored or unknown_user)
        ok = config.slow(check) if config.slow is not None else check()
        if not ok or stored is None:
            # A mistyped password can land in the username field: only a configured name is logged.
            who = repr(username) if stored is not None else "an unknown user"
            log.warning("review sign-in refused for %s from %s", who, g.get("client_address"))
            return login_page(401, "Unknown user or wrong password.", target)
        value = signer.dumps({"u": username, "h": _fingerprint(stored), "c": secrets.token_urlsafe(16)})
        response: Response = redirect(safe_next(target), 303)  # type: ignore[assignment]
        cookie(response, SESSION_COOKIE, value, config.session_lifetime)
        response.delete_cookie(
            LOGIN_COOKIE, path=PREFIX, secure=config.secure_cookie, httponly=True, samesite="Strict"
        )
        log.info("review sign-in by %r", username)
        return response

    @bp.post("/logout")
    def logout() -> Response:
        if not hmac.compare_digest(request.form.get("csrf", "").encode(), g.review_csrf.encode()):
            return page("review/error.html", 400, message="The sign-out form expired; please try again.")
        try:
            if config.ended is not None:
                # As long as any setting lets a session last (a raised lifetime revived it: a re-check).
                config.ended.revoke(_session_key(g.review_csrf), clock() + MAX_SESSION_LIFETIME)
        except StoreUnavailable:
            return page("review/error.html", 503, message="Could not sign out just now; please try again.")
        response: Response = redirect(PREFIX + "/login", 303)  # type: ignore[assignment]
        response.delete_cookie(SESSION_COOKIE, path=PREFIX, secure=config.secure_cookie, httponly=True,
                               samesite="Strict")  # fmt: skip
        return response

    def page(template: str, status: int = 200, **values: Any) -> Response:
        body = render_template(template, user=g.get("review_user"), csrf=g.get("review_csrf"),
                               prefix=PREFIX, when=when, short=short_hash, **values)  # fmt: skip
        return Response(body, status=status, mimetype="text/html")

    def refresh() -> Any:
        try:
            return query.refresh(budget=0.2)
        except query.errors:
            log.warning("review: audit summaries could not be refreshed", exc_info=True)
            return query.status()

    def window(default: str) -> tuple[str, float]:
        name = request.args.get("window", default)
        if name not in WINDOWS:
            name = default
        return name, float(WINDOWS[name])

    def link(view: str, **params: Any) -> str:
        kept = {k: v for k, v in params.items() if v not in (None, "")}
        return f"{PREFIX}/{view}" + ("?" + urlencode(kept) if kept else "")

    def unavailable(exc: Exception) -> Response:
        log.error("review: the audit trail cannot be read: %s", type(exc).__name__, exc_info=exc)
        return page("review/error.html", 503, message="The audit trail cannot be read right now.")

    for error in query.errors:
        bp.register_error_handler(error, unavailable)

    @bp.get("", strict_slashes=False)
    def root() -> Response:
        """``/review``: to the overview, by a path (a redirect Werkzeug makes for a missing
        slash names the Host header's host, which a request chooses).  Without a session too:
        the session cookie's path is ``/review/``, and the redirect shows nothing."""
        return redirect(f"{PREFIX}/", 308)  # type: ignore[return-value]

    @bp.get("/")
    def overview() -> Response:
        now = clock()
        name, span = window("24h")
        status = refresh()
        buckets = query.decisions_over_time(now - span, now, _STEPS[name])
        top = query.top_signals(now - span, now)
        chain = config.chain_status() if config.chain_status else None
        totals = {o: sum(b.counts.get(o, 0) for b in buckets) for o in OUTCOMES}
        return page("review/overview.html", window=name, windows=list(WINDOWS), summary=status, chain=chain,
                    outcomes=review_svg.outcome_chart(buckets), signals=review_svg.signal_chart(top), top=top,
                    totals=totals, link=link)  # fmt: skip

    @bp.get("/timeline")
    def timeline() -> Response:
        try:
            wanted = filter_from_params(request.args, clock())
            before = parse_record_id(request.args["before"]) if request.args.get("before") else None
        except FilterError as exc:
            message = str(exc)
            return page("review/timeline.html", 400, error=message, rows=[], older=None, params=request.args,
                        outcomes=OUTCOMES, signals=SIGNAL_NAMES, link=link, filtered=True)  # fmt: skip
        if wanted.signal or wanted.audience:
            refresh()
        result = query.page(wanted, limit=50, before=before)
        params = wanted.as_params()
        rows = [_timeline_row(r) for r in result.rows]
        return page("review/timeline.html", rows=rows, older=result.older, params=params, error=None,
                    outcomes=OUTCOMES, signals=SIGNAL_NAMES, link=link, filtered=bool(params))  # fmt: skip

    @bp.get("/identity")
    def identity() -> Response:
        issuer, subject = request.args.get("issuer", ""), request.args.get("subject", "")
        if not identity_issuer_ok(issuer) or not subject or max(len(issuer), len(subject)) > 600:
            return page("review/error.html", 400, message="An identity needs an issuer and a subject.")
        refresh()  # (the trail names ``self:<issuer>`` baselines' decisions ``self``: both are shown)
        summary = query.identity_summary(trail_issuer := issuer.partition(":")[0], subject)
        recent = query.page(AuditFilter(issuer=trail_issuer, subject=subject), limit=20)
        baseline: dict[str, Any] | None = None
        baseline_problem = None
        if baselines is None:
            baseline_problem = "No baseline store is configured."
        else:
            # Issuer ``self`` (tokens of ours): each workload's re-exchanges have ``self:<issuer>``.
            names = [issuer] + ([f"self:{n}" for n in config.issuer_names] if issuer == "self" else [])
            try:
                held = [(n, b) for n in names if (b := baselines.load(identity_key(n, subject))).count]
                baseline = json.loads(held[0][1].to_json()) if held else None
            except StoreUnavailable:
                baseline_problem = "The baseline store cannot be reached."
        kept = [n for n, _ in held] if baselines is not None and not baseline_problem else []
        return page("review/identity.html", issuer=issuer, subject=subject, summary=summary, kept=kept,
                    recent=[_timeline_row(r) for r in recent.rows], baseline=baseline,
                    baseline_problem=baseline_problem, step_up_error=STEP_UP_ERROR, link=link,
                    count_cap=COUNT_CAP,
                    signal_rows=[_timeline_row(r) for r in summary.signals],
                    token_rows=[_token_row(r) for r in summary.tokens])  # fmt: skip

    @bp.get("/decision/<int:audit_id>")
    def decision(audit_id: int) -> Response:
        record = query.get(audit_id) if audit_id <= MAX_RECORD_ID else None
        if record is None:
            return page("review/error.html", 404, message=f"No decision {audit_id}.")
        shown = {k: display(k, v) for k, v in record.items()}
        return page("review/decision.html", record=shown, row=_timeline_row(record), link=link,
                    pretty=json.dumps(shown, indent=2, sort_keys=True, default=str))  # fmt: skip

    @bp.get("/graph")
    def graph() -> Response:
        now = clock()
        name, span = window("30d")
        refresh()
        new_since = now - config.new_edge_days * 86400
        edges, total = query.edges(since=now - span, new_since=new_since, limit=120)
        return page("review/graph.html", window=name, windows=list(WINDOWS), edges=edges, total=total,
                    graph_figure=review_svg.edge_graph(edges), new_days=config.new_edge_days, link=link,
                    shorten=review_svg.shorten)  # fmt: skip

    return bp


def _timeline_row(record: Mapping[str, Any]) -> dict[str, Any]:
    """What the timeline shows of a record."""
    audiences = record.get("granted_audience") or record.get("requested_audience") or []
    scopes = record.get("granted_scope") or record.get("requested_scope") or []
    return {
        "id": record.get("id"),
        "time": when(record.get("time")),
        "outcome": record.get("outcome"),
        "error": record.get("error"),
        "issuer": record.get("issuer"),
        "subject": record.get("subject"),
        "client_id": record.get("client_id"),
        "audiences": [str(a) for a in audiences] if isinstance(audiences, list) else [],
        "scopes": [str(s) for s in scopes] if isinstance(scopes, list) else [],
        "rule": record.get("rule"),
        "signals": fired_signals(dict(record)),
        "reasons": record.get("reasons") or [],
        "source_ip": record.get("source_ip"),
    }


def _token_row(record: Mapping[str, Any]) -> dict[str, Any]:
    """An issued token as recorded: its jti, expiry, audience and scope (never the token)."""
    return {
        "id": record.get("id"),
        "time": when(record.get("time")),
        "jti": record.get("issued_jti"),
        "exp": when(record.get("issued_exp")),
        "audiences": record.get("granted_audience") or [],
        "scopes": record.get("granted_scope") or [],
        "kid": record.get("issued_kid"),
    }
