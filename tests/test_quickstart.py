"""The README quickstart, run for real: `sts serve` (granian), `sts dev issuer`, `sts dev token`.

The shipped sts.yaml and policies/quickstart.yaml are used as they are, except for the
ports (taken free here so the test never collides with a running service).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import yaml

REPO = Path(__file__).resolve().parent.parent
STS = str(Path(sys.executable).with_name("sts"))
GRANT = "urn:ietf:params:oauth:grant-type:token-exchange"
JWT = "urn:ietf:params:oauth:token-type:jwt"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_for(url: str, deadline: float = 20.0) -> None:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        try:
            if requests.get(url, timeout=0.5).status_code < 500:
                return
        except requests.RequestException:
            pass
        time.sleep(0.1)
    raise AssertionError(f"{url} did not come up")


@pytest.fixture
def quickstart(tmp_path: Path) -> Iterator[dict[str, object]]:
    sts_port, dev_port = _free_port(), _free_port()
    config = yaml.safe_load((REPO / "sts.yaml").read_text())
    text = json.dumps(config).replace("127.0.0.1:8080", f"127.0.0.1:{sts_port}")
    text = text.replace("127.0.0.1:8081", f"127.0.0.1:{dev_port}")
    config = json.loads(text)
    config["port"] = sts_port
    config["workers"] = 2
    config["threads"] = 2
    shutil.copytree(REPO / "policies", tmp_path / "policies")
    (tmp_path / "sts.yaml").write_text(yaml.safe_dump(config))
    env = {k: v for k, v in os.environ.items() if not k.startswith("STS_")}
    log = (tmp_path / "serve.log").open("wb")
    procs = [
        subprocess.Popen([STS, "serve"], cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT),
        subprocess.Popen(
            [STS, "dev", "issuer", "--port", str(dev_port)],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        ),
    ]
    try:
        _wait_for(f"http://127.0.0.1:{sts_port}/healthz")
        _wait_for(f"http://127.0.0.1:{dev_port}/.well-known/jwks")
        yield {
            "dir": tmp_path,
            "sts": f"http://127.0.0.1:{sts_port}",
            "dev_port": dev_port,
            "env": env,
            "log": tmp_path / "serve.log",
        }
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
        log.close()


def test_quickstart_exchange_refusal_and_audit(quickstart: dict[str, object]) -> None:
    cwd, base, env = quickstart["dir"], str(quickstart["sts"]), quickstart["env"]
    token = subprocess.run(
        [STS, "dev", "token", "github-actions", "--issuer-url", f"http://127.0.0.1:{quickstart['dev_port']}",
         "--audience", base],
        cwd=cwd, env=env, capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    assert token.count(".") == 2

    granted = requests.post(
        f"{base}/token",
        data={
            "grant_type": GRANT,
            "subject_token": token,
            "subject_token_type": JWT,
            "audience": "https://deploy.example.com",
            "scope": "deploy:write",
        },
        timeout=10,
    )
    assert granted.status_code == 200, granted.text
    body = granted.json()
    assert body["token_type"] == "Bearer" and body["scope"] == "deploy:write"
    assert granted.headers["Cache-Control"] == "no-store"

    refused = requests.post(
        f"{base}/token",
        data={"grant_type": GRANT, "subject_token": token, "subject_token_type": JWT,
              "audience": "https://elsewhere.example.com"},
        timeout=10,
    )  # fmt: skip
    assert refused.status_code == 400 and refused.json()["error"] == "invalid_target"

    metadata = requests.get(f"{base}/.well-known/oauth-authorization-server", timeout=5).json()
    assert metadata["issuer"] == base
    assert len(requests.get(metadata["jwks_uri"].replace(base, base), timeout=5).json()["keys"]) == 2

    tail = subprocess.run(
        [STS, "audit", "tail", "-n", "2"], cwd=cwd, env=env, capture_output=True, text=True, check=True
    ).stdout
    records = [json.loads(line) for line in tail.splitlines()]
    assert [r["outcome"] for r in records] == ["refused", "granted"]
    assert token not in tail and body["access_token"] not in tail

    keys_dir = Path(str(cwd)) / "keys"
    assert oct(keys_dir.stat().st_mode & 0o777) == "0o700"
    assert all(oct(p.stat().st_mode & 0o777) == "0o600" for p in keys_dir.glob("*.pem"))


def test_tokens_in_the_query_string_are_refused_and_never_logged(quickstart: dict[str, object]) -> None:
    base = str(quickstart["sts"])
    secret = "eyJhbGciOiJSUzI1NiJ9.c2VjcmV0LXRva2VuLWluLXRoZS1xdWVyeQ.c2ln"
    refused = requests.post(
        f"{base}/token?subject_token={secret}",
        data={"grant_type": GRANT, "subject_token": secret, "subject_token_type": JWT},
        timeout=10,
    )
    assert refused.status_code == 400 and refused.json()["error"] == "invalid_request"
    requests.get(f"{base}/healthz", timeout=5)  # flush at least one more access-log line
    log_text = Path(str(quickstart["log"])).read_text()
    # The HTTP server writes no access log of its own (it would show raw paths); the application's
    # access log is another item of issue 8.
    assert secret not in log_text and "c2VjcmV0" not in log_text
