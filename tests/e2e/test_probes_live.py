"""`sts serve`'s health probes answer on time while every request thread waits on a backend.

Each request thread of the server below waits on an issuer's JWKS endpoint that never answers
(a fetch gives up after 3 s).  Before the probes had a thread of their own, ``/readyz`` queued
behind those requests and answered only once a thread came free.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from sts.dev.issuer import DevIssuer, RunningServer
from tests.e2e.fault_server import FaultServer, Hang
from tests.e2e.test_serving import Served, _exchange_form, _free_port


@pytest.fixture(scope="module")
def upstream() -> Iterator[RunningServer]:
    with DevIssuer.serve_ephemeral(alg="RS256") as server:
        yield server


def test_probes_answer_while_every_request_thread_waits_on_a_backend(
    tmp_path: Path, upstream: RunningServer
) -> None:
    with FaultServer(Hang()) as jwks:
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        issuer = {
            "name": "upstream",
            "issuer": upstream.issuer.issuer_url,
            "jwks_uri": jwks.url + "/jwks",  # never answers
            "algorithms": ["RS256"],
            "audiences": [url],
        }
        server = Served(tmp_path, upstream, port=port, workers=1, threads=2, issuers=[issuer])
        try:
            answers: list[int] = []

            def exchange() -> None:
                token = upstream.issuer.github_actions_token(audience=url)
                answers.append(
                    requests.post(f"{url}/token", data=_exchange_form(token), timeout=30).status_code
                )

            senders = [threading.Thread(target=exchange) for _ in range(4)]
            for sender in senders:
                sender.start()
            time.sleep(0.5)  # both request threads are waiting on the JWKS fetch by now
            timings = {}
            for path in ("/readyz", "/livez", "/healthz"):
                asked = time.monotonic()
                response = requests.get(url + path, timeout=30)
                timings[path] = time.monotonic() - asked
                assert response.status_code == 200, (path, response.text)
            answered_before = len(answers)
            for sender in senders:
                sender.join(timeout=30)
            # Every exchange was still waiting when the probes had answered (the fetch gives up
            # after 3 s), each probe within a second or so.
            assert answered_before == 0, timings
            assert all(took < 2.0 for took in timings.values()), timings
            assert len(answers) == 4 and all(status == 503 for status in answers), answers
        finally:
            server.stop()
