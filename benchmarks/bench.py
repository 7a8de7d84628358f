"""Benchmark: one token exchange against a bare verify-and-sign Flask endpoint.

Both are served the same way, by granian through ``sts.serving`` (the floor with
``python -m sts.serving``, the exchange with ``sts serve``), with the same workers
and threads;
``wrk`` (or, without it, a Python load generator) drives each for the same
time with the same concurrency, and the ratio of requests per second is
reported.  The project's aim: the exchange reaches at least 0.75 of the floor.

    .venv/bin/python benchmarks/bench.py [--seconds 10] [--connections 16] [--workers 2] [--threads 8]
                                         [--store embedded|redis] [--database-url URL]

The exchange measured is anonymous (the subject token is the only credential),
from a GitHub-Actions-shaped RS256 token to an ES256 access token, with policy
evaluation, the audit record committed before the response, and no single use.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlencode

import requests
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from sts.dev.issuer import DevIssuer  # noqa: E402

GRANT = "urn:ietf:params:oauth:grant-type:token-exchange"
JWT = "urn:ietf:params:oauth:token-type:jwt"
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(url: str) -> None:
    for _ in range(200):
        try:
            requests.get(url, timeout=0.5)
            return
        except requests.RequestException:
            time.sleep(0.1)
    raise SystemExit(f"{url} did not come up")


def load(url: str, body: str, seconds: int, connections: int) -> float:
    """Requests per second of successful (2xx) answers."""
    if shutil.which("wrk"):
        with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
            script.write(
                'wrk.method = "POST"\n'
                'wrk.headers["Content-Type"] = "application/x-www-form-urlencoded"\n'
                f"wrk.body = {json.dumps(body)}\n"
                "local errors = 0\n"
                "response = function(status) if status ~= 200 then errors = errors + 1 end end\n"
            )
        out = subprocess.run(
            ["wrk", "-t", "2", "-c", str(connections), "-d", f"{seconds}s", "-s", script.name, url],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        os.unlink(script.name)
        rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
        non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
        if non2xx:
            raise SystemExit(f"{url}: {non2xx.group(1)} failed responses\n{out}")
        return rps
    raise SystemExit("install wrk (apt-get install wrk) to run the benchmark")


def serve(
    app: str, port: int, workers: int, threads: int, env: dict[str, str], cwd: Path
) -> subprocess.Popen[bytes]:
    """The exchange through `sts serve`; any other WSGI app through the same server (``sts.serving``)."""
    sizing = ["--port", str(port), "--workers", str(workers), "--threads", str(threads)]
    if app == "sts":
        command = [str(BIN / "sts"), "serve", *sizing]
    else:
        command = [sys.executable, "-m", "sts.serving", app, *sizing]
    with (cwd / f"serve-{port}.log").open("wb") as log:
        return subprocess.Popen(command, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--store", default="embedded")
    parser.add_argument("--database-url", default=None)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="sts-bench-"))
    issuer = DevIssuer.serve_ephemeral(alg="RS256")
    sts_port, bare_port = free_port(), free_port()
    sts_url = f"http://127.0.0.1:{sts_port}"
    (work / "policies").mkdir()
    (work / "policies" / "bench.yaml").write_text(yaml.safe_dump({"version": 1, "rules": [{
        "name": "bench", "issuer": "upstream", "subject": "repo:acme/app:ref:refs/heads/main",
        "claims": {"repository_id": "123456"}, "require_client_authentication": False,
        "grant": {"audiences": ["https://deploy.example.com"], "scopes": ["deploy:read"],
                  "default_scopes": ["deploy:read"]}}]}))  # fmt: skip
    config = {
        "issuer": sts_url, "store": args.store, "keys_dir": "keys", "policies_dir": "policies",
        "database_url": args.database_url or f"sqlite:///{work / 'sts.sqlite'}", "log_level": "WARNING",
        # One token from one address, thousands of times a second: the default flood guards would
        # answer most requests 429. benchmarks/rate_limits.py measures what the limits cost.
        "rate_limits": {"enabled": False},
        "issuers": [{"name": "upstream", "issuer": issuer.issuer.issuer_url, "jwks_uri": issuer.jwks_uri,
                     "algorithms": ["RS256"], "audiences": [sts_url]}],
    }  # fmt: skip
    (work / "sts.yaml").write_text(yaml.safe_dump(config))
    env = {k: v for k, v in os.environ.items() if not k.startswith("STS_")}
    env.update(STS_CONFIG=str(work / "sts.yaml"), BARE_JWKS=json.dumps(issuer.issuer.jwks()),
               PYTHONPATH=f"{REPO / 'benchmarks'}:{REPO}")  # fmt: skip
    subprocess.run([str(BIN / "sts"), "keys", "list"], env=env, cwd=work, check=True, capture_output=True)

    token = issuer.issuer.github_actions_token(audience=sts_url, lifetime=3600)
    body = urlencode({"grant_type": GRANT, "subject_token": token, "subject_token_type": JWT,
                      "audience": "https://deploy.example.com"})  # fmt: skip
    results = {}
    for name, app, port in (
        ("bare verify-and-sign", "bare_app:app", bare_port),
        ("token exchange", "sts", sts_port),
    ):
        proc = serve(app, port, args.workers, args.threads, env, work)
        try:
            wait_for(f"http://127.0.0.1:{port}/healthz")
            load(f"http://127.0.0.1:{port}/token", body, 2, args.connections)  # warm-up
            results[name] = load(f"http://127.0.0.1:{port}/token", body, args.seconds, args.connections)
        finally:
            proc.terminate()
            proc.wait(timeout=10)
    issuer.stop()
    floor, exchange = results["bare verify-and-sign"], results["token exchange"]
    print(f"workers={args.workers} threads={args.threads} connections={args.connections} "
          f"seconds={args.seconds} store={args.store}")  # fmt: skip
    for name, rps in results.items():
        print(f"  {name:22} {rps:8.1f} req/s")
    print(f"  ratio                  {exchange / floor:8.2f}  (aim: >= 0.75)")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
