"""The README quickstart, run for real: `sts serve` (granian), `sts dev issuer`, `sts dev token`.

The shipped sts.yaml and policies/quickstart.yaml are used as they are, except for the
ports (taken free here so the test never collides with a running service).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import yaml

REPO = Path(__file__).resolve().parents[2]
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


def _raw_request(base: str, head: bytes) -> bytes:
    """Send ``head`` (request line and header fields) as is; the whole answer, read to the close."""
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as conn:
        conn.sendall(head + b"Connection: close\r\n\r\n")
        answer = b""
        for _ in range(1000):
            chunk = conn.recv(65536)
            if not chunk:
                break
            answer += chunk
    return answer


def test_tokens_in_the_path_never_reach_the_log(quickstart: dict[str, object]) -> None:
    """The access log is the application's: route rules, never a path segment that may be a credential."""
    base, cwd = str(quickstart["sts"]), Path(str(quickstart["dir"]))
    secret = "eyJhbGciOiJSUzI1NiJ9.c2VjcmV0LXRva2VuLWluLXRoZS1wYXRo.c2ln"
    paths = (f"/{secret}", f"/token/{secret}", f"/.well-known/oauth-authorization-server/{secret}")
    unknown = [requests.get(f"{base}{path}?access_token={secret}", timeout=10) for path in paths]
    options = requests.options(f"{base}/token", timeout=10)
    refused = requests.post(
        f"{base}/token", data={"grant_type": GRANT}, headers={"X-Request-Id": "q-77"}, timeout=10
    )

    log_text = Path(str(quickstart["log"])).read_text()
    assert secret not in log_text and "c2VjcmV0" not in log_text and "access_token" not in log_text
    assert all(r.status_code == 404 and r.json()["error"] == "not_found" for r in unknown)
    assert options.status_code == 405 and options.json()["error"] == "invalid_request"
    assert options.headers["Allow"] == "POST"
    assert refused.status_code == 400 and refused.headers["X-Request-Id"] == "q-77"
    assert log_text.count('"GET <unmatched>" 404 ') == 3, log_text
    assert '"OPTIONS <unmatched>" 405 ' in log_text
    assert re.search(r'sts\.access: 127\.0\.0\.1 "POST /token" 400 \d+ [\d.]+ms request_id=q-77\n', log_text)

    # The audit database (written by the refusal above), its WAL and shared memory: owner only.
    database = cwd / "var" / "sts.sqlite"
    for path in (database, Path(f"{database}-wal"), Path(f"{database}-shm")):
        assert oct(path.stat().st_mode & 0o777) == "0o600", path


#: Header fields whose request id is unusable: each is answered with a fresh UUID instead.
UNUSABLE_REQUEST_IDS = {
    "empty": b"X-Request-Id: \r\n",
    "empty-no-space": b"X-Request-Id:\r\n",
    "dash": b"X-Request-Id: -\r\n",
    "dots": b"X-Request-Id: ...\r\n",
    "non-ascii": b"X-Request-Id: caf\xc3\xa9\r\n",
    "two": b"X-Request-Id: abc\r\nX-Request-Id: def\r\n",
    "two-same": b"X-Request-Id: abc\r\nX-Request-Id: abc\r\n",
    "too-long": b"X-Request-Id: " + b"a" * 65 + b"\r\n",
}


def test_unusable_request_ids_are_replaced_by_the_running_service(quickstart: dict[str, object]) -> None:
    for name, fields in UNUSABLE_REQUEST_IDS.items():
        answer = _raw_request(
            str(quickstart["sts"]), b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n" + fields
        )
        head = answer.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
        # A header value with a byte outside printable ASCII is refused by `sts serve` before the
        # application (400, JSON; README "Answered before the application"); the rest reach it.
        status = "HTTP/1.1 400" if name == "non-ascii" else "HTTP/1.1 200"
        assert head[0].startswith(status), (name, head)
        echoed = [line.split(":", 1)[1].strip() for line in head if line.lower().startswith("x-request-id:")]
        assert len(echoed) == 1 and str(uuid.UUID(echoed[0])) == echoed[0], (name, head)


def readme_block(containing: str) -> str:
    """The README's ``sh`` code block that contains ``containing`` (exactly one does)."""
    readme = (REPO / "README.md").read_text()
    blocks = [b for b in re.findall(r"```sh\n(.*?)```", readme, flags=re.DOTALL) if containing in b]
    assert len(blocks) == 1, blocks
    return blocks[0]


def test_the_readme_introspection_and_revocation_commands_work(quickstart: dict[str, object]) -> None:
    """The README's commands, run as they are (with this test's port), by the client sts.yaml registers."""
    cwd, base, env = quickstart["dir"], str(quickstart["sts"]), quickstart["env"]
    assert isinstance(env, dict)
    token = subprocess.run(
        [STS, "dev", "token", "github-actions", "--issuer-url", f"http://127.0.0.1:{quickstart['dev_port']}",
         "--audience", base],
        cwd=cwd, env=env, capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    script = readme_block("/introspect").replace("http://127.0.0.1:8080", base)
    ran = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=cwd, env={**env, "TOKEN": token}, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert ran.returncode == 0, ran.stderr

    answers, decoder, rest = [], json.JSONDecoder(), ran.stdout.strip()
    while rest:
        answer, end = decoder.raw_decode(rest)
        answers.append(answer)
        rest = rest[end:].strip()
    # Introspection, revocation (an empty body), introspection: as the README's comments show.
    assert len(answers) == 2, ran.stdout
    active, inactive = answers
    assert active["active"] is True and active["aud"] == "https://deploy.example.com"
    assert active["sub"] == "repo:acme/app:ref:refs/heads/main" and active["scope"] == "deploy:read"
    assert inactive == {"active": False}
    comments = [line[2:] for line in script.splitlines() if line.startswith("# {")]
    shown = [json.loads(comment.replace(",...}", "}")) for comment in comments]
    assert shown[0].items() <= active.items() and shown[1] == inactive

    tail = subprocess.run(
        [STS, "audit", "tail", "-n", "3"], cwd=cwd, env=env, capture_output=True, text=True, check=True
    ).stdout
    records = [json.loads(line) for line in tail.splitlines()]
    assert [(r["endpoint"], r["client_id"]) for r in records] == [
        ("introspect", "deploy-api"), ("revoke", "deploy-api"), ("introspect", "deploy-api"),
    ]  # fmt: skip
    assert token not in tail and "PFqnSjk0" not in tail
