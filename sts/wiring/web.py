"""The Flask application: its limits and middleware, and the blueprints, each given its services."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from flask import Flask, request
from flask.globals import request_ctx
from werkzeug.exceptions import MethodNotAllowed, NotFound

from ..adapters.metrics import Metrics
from ..core.token_status import TokenStatus
from ..http import metrics as metrics_http
from ..http import responses
from ..http import tracing as tracing_http
from ..http.body_limit import BodyLimit
from ..http.client_address import trusted_networks
from ..http.oauth import TokenEndpoint, discovery_blueprint, health_blueprint, token_blueprint, token_paths
from ..http.ssf import events_blueprint
from ..http.token_fast import LeanTokenEndpoint
from ..http.token_status import token_status_blueprint
from ..http.wire import FormLimits
from .review import build_review
from .runtime import Runtime


def build_flask_app(
    runtime: Runtime, *, token_status: TokenStatus, metrics: Metrics, lean_token: bool = True
) -> Flask:
    """The WSGI application serving ``runtime``'s services (kept in ``app.extensions["sts"]``).

    ``lean_token``: ``POST /token`` is answered in front of Flask (:mod:`sts.http.token_fast`),
    with the same answer Flask's route gives (which serves it when this is off).
    """
    settings, exchange, clock, keyring = runtime.settings, runtime.exchange, runtime.clock, runtime.keyring

    def published_jwks() -> dict[str, Any]:
        keyring.reload_if_changed(clock())
        return keyring.public_jwks(clock())

    # No static route: the review page serves its stylesheet itself (``/review.css``), and nothing
    # else is a file.
    app = Flask("sts", static_folder=None)
    # Werkzeug answers a path with ``//`` by a 308 to an absolute URL built from the Host header
    # (a cacheable off-site redirect for a spoofed Host); here such a path is simply not found.
    app.url_map.merge_slashes = False
    app.config.update(
        MAX_CONTENT_LENGTH=settings.max_body_bytes,
        MAX_FORM_MEMORY_SIZE=settings.max_body_bytes,
        MAX_FORM_PARTS=200,
        JSON_SORT_KEYS=False,
    )
    app.extensions["sts"] = runtime
    trusted = trusted_networks(settings.trusted_proxies)
    responses.install(app, trusted_proxies=trusted)
    app.before_request(_as_routed)
    tracing_http.install(app, runtime.tracing)
    metrics_http.install(app, metrics.observe_request)
    # An issuer with a path: the endpoints its metadata names live under that path too
    # (and stay at the root, for a proxy that strips the prefix).
    path = urlsplit(settings.issuer).path.rstrip("/")
    mtls_header = settings.mtls_client_cert_header
    token_endpoint = TokenEndpoint(
        exchange,
        clock=clock,
        nonce_secret=exchange.config.dpop.nonce_secret if exchange.config.dpop else None,
        database_ready=runtime.database_ready,
        mtls_header=mtls_header,
    )
    app.register_blueprint(token_blueprint(token_endpoint, issuer_path=path))
    app.register_blueprint(discovery_blueprint(runtime.metadata, published_jwks, issuer_path=path))
    app.register_blueprint(health_blueprint(runtime.health))
    token_status_bp = token_status_blueprint(token_status, mtls_header=mtls_header)
    app.register_blueprint(token_status_bp)
    if path:
        app.register_blueprint(token_status_bp, url_prefix=path, name="token_status_under_issuer_path")
    if runtime.signals is not None:
        app.register_blueprint(events_blueprint(runtime.signals))
    if settings.review.enabled:
        ended = runtime.token_status.revoked if runtime.token_status is not None else None
        review = build_review(
            settings, runtime.engine, runtime.baselines, clock, redis_client=runtime.redis_client, ended=ended
        )
        app.register_blueprint(review)
    served: Any = app.wsgi_app
    if lean_token:
        served = LeanTokenEndpoint(
            served,
            token_endpoint,
            paths=token_paths(path),
            trusted_proxies=trusted,
            tracing=runtime.tracing,
            observe_request=metrics.observe_request,
            limits=FormLimits(
                app.config["MAX_CONTENT_LENGTH"],
                app.config["MAX_FORM_MEMORY_SIZE"],
                app.config["MAX_FORM_PARTS"],
            ),
        )
    # Outermost: a chunked body is read (at most the cap) before either path sees it.
    app.wsgi_app = BodyLimit(served, settings.max_body_bytes)  # type: ignore[method-assign]
    return app


def _as_routed() -> None:
    """Refuse what Werkzeug's routing matched only by reading the request loosely: it strips every
    leading slash of the path (``//token`` is matched as ``/token``: here it is not found, as any
    unknown path) and upper-cases the method (RFC 9110 §9.1: a method is case-sensitive, so
    ``post`` is not ``POST``: ``405`` with the methods the path serves, as for any other)."""
    if request.environ.get("PATH_INFO", "").startswith("//"):
        # Also where Werkzeug's own 405 would follow: no method is served there.  Unrouted, so the
        # access log and the metrics name it ``<unmatched>``, not the rule Werkzeug read it as.
        request.url_rule = None
        raise NotFound()
    if request.url_rule is None:
        return  # not routed: Werkzeug's own 404 or 405 follows
    if request.environ.get("REQUEST_METHOD") != request.method:
        # Every method of every rule of the path, as Werkzeug's own 405 lists (a path may have
        # several rules: ``/review/login`` has one for GET and one for POST).
        adapter = request_ctx.url_adapter
        allowed = adapter.allowed_methods() if adapter is not None else list(request.url_rule.methods or ())
        raise MethodNotAllowed(valid_methods=sorted(allowed))
