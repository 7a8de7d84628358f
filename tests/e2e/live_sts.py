"""The STS on a real HTTP server on loopback, for interoperability tests with third-party clients.

Third-party libraries talk to the service over real sockets, so the service
must know the URL it is reached at: client assertions must name its issuer or
token endpoint, and it publishes its JWKS at ``<issuer>/.well-known/jwks.json``.
The socket is therefore bound first (port 0, no race for a "free" port) and
the app is built for the URL it got, the way ``DevIssuer.serve_ephemeral``
does.  The upstream development issuer is trusted with that URL as its
audience, so upstream tokens must be minted for ``LiveSts.issuer``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from werkzeug.serving import make_server

from sts.app import create_app
from sts.dev.issuer import RunningServer
from sts.settings import Settings

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIEnvironment


@dataclass(frozen=True)
class LiveSts:
    issuer: str
    upstream: RunningServer

    @property
    def token_endpoint(self) -> str:
        return self.issuer + "/token"

    @property
    def jwks_uri(self) -> str:
        return self.issuer + "/.well-known/jwks.json"

    def github_actions_token(self, **kwargs: Any) -> str:
        """A subject token for the anonymous ``deploy`` rule."""
        return self.upstream.issuer.github_actions_token(audience=self.issuer, **kwargs)

    def kubernetes_token(self, **kwargs: Any) -> str:
        """A subject token for the ``ledger-with-client`` rule (which requires client authentication)."""
        return self.upstream.issuer.kubernetes_token(audience=[self.issuer], **kwargs)


def _not_ready(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
    start_response("503 Service Unavailable", [("Content-Type", "text/plain")])
    return [b"starting"]


@contextmanager
def serve_sts(
    make_settings: Callable[..., Settings], upstream: RunningServer, **overrides: Any
) -> Iterator[LiveSts]:
    """Serve the STS (default test policy and clients) at ``http://127.0.0.1:<port>`` in a thread."""
    server = make_server("127.0.0.1", 0, _not_ready, threaded=True)
    issuer = f"http://127.0.0.1:{server.server_port}"
    settings = make_settings(
        issuer=issuer,
        issuers=[
            {
                "name": "upstream",
                "issuer": upstream.issuer.issuer_url,
                "jwks_uri": upstream.jwks_uri,
                "algorithms": ["RS256"],
                "audiences": [issuer],
                "max_token_age": 3600,
            }
        ],
        **overrides,
    )
    server.app = create_app(settings)
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="live-sts", daemon=True
    )
    thread.start()
    try:
        yield LiveSts(issuer, upstream)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
