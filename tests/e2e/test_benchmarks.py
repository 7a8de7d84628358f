"""The benchmark's pieces that can break unnoticed: its exchange configuration and request (the
full exchange: single use, DPoP, risk), the floor, and the parsing of wrk and py-spy output."""

from __future__ import annotations

import collections
import importlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
import yaml
from joserfc import jwt
from joserfc.jwk import ECKey, KeySet

from sts.app import create_app
from sts.dev.issuer import DevIssuer
from sts.settings.load import load_settings

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
bench: Any = importlib.import_module("bench")
stage_times: Any = importlib.import_module("stage_times")


@pytest.fixture(scope="module")
def upstream() -> DevIssuer:
    return DevIssuer.ephemeral(bench.GITHUB_ISS, alg="RS256")


def form(token: str) -> str:
    return urlencode(
        {
            "grant_type": "urn:ietf:params:oauth:grant-type:token-exchange",
            "subject_token_type": "urn:ietf:params:oauth:token-type:jwt",
            "audience": bench.AUDIENCE,
            "scope": bench.SCOPE,
            "subject_token": token,
        }
    )


def test_the_benchmark_request_is_the_full_exchange(tmp_path: Path, upstream: DevIssuer) -> None:
    """The benchmark's configuration and policy load, its request is granted a DPoP-bound token
    after a risk assessment, and the same subject token is refused the second time (single use)."""
    (tmp_path / "jwks.json").write_text(json.dumps(upstream.jwks()))
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "bench.yaml").write_text(
        yaml.safe_dump({"version": 1, "rules": bench.rule_set(10)})
    )
    settings = load_settings(
        config_file=None,
        environ={},
        overrides={
            "issuer": bench.STS_ISSUER,
            "database_url": f"sqlite:///{tmp_path / 'sts.sqlite'}",
            "keys_dir": str(tmp_path / "keys"),
            "policies_dir": str(tmp_path / "policies"),
            "issuers": [bench.github_issuer(tmp_path / "jwks.json")],
        },
    )
    client = create_app(settings).test_client()
    proofs = bench.Proofs()
    token = upstream.github_actions_token(audience=bench.SUBJECT_AUDIENCE)
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    first = client.post("/token", data=form(token), headers={**headers, "DPoP": proofs.make(1)[0]})
    assert first.status_code == 200, first.get_json()
    assert first.get_json()["token_type"] == "DPoP"
    published = KeySet.import_key_set(client.get("/.well-known/jwks.json").get_json())
    claims = jwt.decode(first.get_json()["access_token"], published)
    assert claims.header["typ"] == "at+jwt" and claims.header["alg"] == "ES256"
    assert claims.claims["cnf"]["jkt"] == proofs.key.thumbprint()
    again = client.post("/token", data=form(token), headers={**headers, "DPoP": proofs.make(1)[0]})
    assert again.status_code == 400 and again.get_json()["error"] == "invalid_request"
    without_proof = client.post(
        "/token", data=form(upstream.github_actions_token(audience=bench.SUBJECT_AUDIENCE)), headers=headers
    )
    assert without_proof.get_json()["error"] == "invalid_dpop_proof"


@pytest.fixture
def floor(monkeypatch: pytest.MonkeyPatch, upstream: DevIssuer) -> Any:
    monkeypatch.setenv("BARE_JWKS", json.dumps(upstream.jwks()))
    monkeypatch.setenv("BARE_ISSUER", bench.GITHUB_ISS)
    monkeypatch.setenv("BARE_AUDIENCE", bench.SUBJECT_AUDIENCE)
    monkeypatch.setenv("BARE_HTU", bench.HTU)
    sys.modules.pop("bare_app", None)
    return importlib.import_module("bare_app")


def test_the_floor_verifies_both_tokens_and_signs_a_bound_one(floor: Any, upstream: DevIssuer) -> None:
    client = floor.app.test_client()
    proofs = bench.Proofs()
    token = upstream.github_actions_token(audience=bench.SUBJECT_AUDIENCE)
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    answer = client.post("/token", data=form(token), headers={**headers, "DPoP": proofs.make(1)[0]})
    assert answer.status_code == 200
    issued = jwt.decode(answer.get_json()["access_token"], floor._signing, algorithms=["ES256"])
    assert issued.header["typ"] == "at+jwt"
    assert issued.claims["cnf"]["jkt"] == proofs.key.thumbprint()

    forged = jwt.encode(
        dict(proofs.header),  # names the first key, signed by another
        {"jti": "x", "htm": "POST", "htu": bench.HTU, "iat": int(time.time())},
        ECKey.generate_key("P-256"),
        algorithms=["ES256"],
    )
    refused = client.post("/token", data=form(token), headers={**headers, "DPoP": forged})
    assert refused.status_code == 400 and "BadSignature" in refused.get_json()["error_description"]
    wrong_audience = upstream.github_actions_token(audience="someone-else")
    refused = client.post("/token", data=form(wrong_audience), headers={**headers, "DPoP": proofs.make(1)[0]})
    assert refused.status_code == 400 and "aud" in refused.get_json()["error_description"]


WRK_OUTPUT = """Running 10s test @ http://127.0.0.1:8080
  1 threads and 8 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     6.46ms    3.10ms  45.10ms   80.00%
  Latency Distribution
     50%    5.90ms
     75%    7.20ms
     90%    9.00ms
     99%    1.02s
  12345 requests in 10.00s, 9.00MB read
  Socket errors: connect 0, read 1, write 0, timeout 2
Requests/sec:   1234.50
Transfer/sec:      0.90MB
bench-lua sent=12350 ok=12340 failed=5 reused=0 first_failure=400 {"error":"invalid_request"}
"""


def test_wrk_output_is_read() -> None:
    result = bench.parse_wrk(WRK_OUTPUT)
    assert result["rps"] == 1234.5 and result["requests"] == 12345 and result["sent"] == 12350
    assert result["p50"] == pytest.approx(5.9) and result["p99"] == pytest.approx(1020.0)
    assert (result["ok"], result["failed"], result["reused"], result["socket_errors"]) == (12340, 5, 0, 3)
    assert result["first_failure"].startswith("400")


@pytest.mark.parametrize(
    ("pool", "idle"),
    [
        (
            "Thread.run (threading.py:1);RequestThreads._serve (sts/serving.py:280)",
            "Thread.run (threading.py:1);RequestThreads._serve (sts/serving.py:279)",
        ),
        (  # the thread pool of earlier versions (a --source copy)
            "Thread.run (threading.py:1);_worker (concurrent/futures/thread.py:83);"
            "_WorkItem.run (concurrent/futures/thread.py:58)",
            "Thread.run (threading.py:1);_worker (concurrent/futures/thread.py:83)",
        ),
    ],
    ids=["request-threads", "thread-pool"],
)
def test_profile_shares_leave_idle_waits_out(pool: str, idle: str) -> None:
    loop = "BaseEventLoop.run_forever (asyncio/base_events.py:1);BaseEventLoop._run_once (asyncio/x.py:2)"
    stacks = collections.Counter(
        {
            f"{loop};EpollSelector.select (selectors.py:3)": 50,  # waiting for events: idle
            f"{loop};Handle._run (asyncio/events.py:4)": 25,
            f"{pool};TokenExchange.handle (sts/core/exchange.py:9);verify_token (sts/core/attest.py:1)": 60,
            f"{pool};TokenExchange.handle (sts/core/exchange.py:9);write (sts/adapters/sql.py:5)": 15,
            idle: 500,  # an idle request thread
        }
    )
    summary = bench.profile_summary(stacks)
    assert summary["samples"] == 100 and summary["idle_samples"] == 550
    assert dict(summary["threads"]) == {"request threads (the WSGI app)": 0.75, "event loop": 0.25}
    assert dict(summary["self_by_package"]) == {"sts.core": 0.6, "asyncio": 0.25, "sts.adapters": 0.15}
    assert dict(summary["inclusive_sts"])["TokenExchange.handle (sts/core/exchange.py)"] == 0.75


def test_the_in_process_benchmark_grants_every_request(tmp_path: Path, upstream: DevIssuer) -> None:
    """``benchmarks/exchange_cpu.py``'s worker, on this checkout and on the floor: every request is
    granted (a refusal stops the run), and the copy of ``sts`` measured is the one asked for."""
    (tmp_path / "jwks.json").write_text(json.dumps(upstream.jwks()))
    tokens = [upstream.github_actions_token(audience=bench.SUBJECT_AUDIENCE, lifetime=600) for _ in range(4)]
    (tmp_path / "tokens.txt").write_text("\n".join(tokens))
    for floor in (False, True):
        command = [sys.executable, str(BENCHMARKS / "exchange_cpu.py"), "--worker", "--work", str(tmp_path)]
        command += ["--requests", "3", "--warmup", "1"] + (["--floor"] if floor else [])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(BENCHMARKS.parent), str(BENCHMARKS)])}
        out = subprocess.run(command, env=env, capture_output=True, text=True, check=True, timeout=120)
        result = json.loads(out.stdout.strip().splitlines()[-1])
        assert result["failed"] == 0 and result["cpu_us"] > 0, out.stderr
        assert Path(result["package"]) == BENCHMARKS.parent / "sts"


def test_the_in_process_benchmark_runs_workers_side_by_side_on_one_database() -> None:
    """``exchange_cpu.py --processes 2``: two processes of the exchange on one SQLite file, each
    with its own tokens and the run's one DPoP key (a key per process would be drift to the risk
    checks, and its refusals stop the run), both granted every request."""
    command = [sys.executable, str(BENCHMARKS / "exchange_cpu.py"), "--no-floor", "--processes", "2"]
    command += ["--rounds", "1", "--requests", "6", "--warmup", "2", "--in-flight", "2"]
    out = subprocess.run(command, capture_output=True, text=True, check=False, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "signing 16 RS256 subject tokens" in out.stdout
    assert re.search(r"^round 1 this +\d+ µs CPU per request", out.stdout, re.MULTILINE), out.stdout


def test_the_stage_times_cover_every_stage_of_this_checkout(tmp_path: Path, upstream: DevIssuer) -> None:
    """``exchange_cpu.py --stages``: every stage listed in ``benchmarks/stage_times.py`` exists in
    this checkout and is called by the exchange (a renamed or moved stage would drop out of the
    table unseen), and the rows nest: no stage takes longer than the serving around it."""
    (tmp_path / "jwks.json").write_text(json.dumps(upstream.jwks()))
    tokens = [upstream.github_actions_token(audience=bench.SUBJECT_AUDIENCE, lifetime=600) for _ in range(5)]
    (tmp_path / "tokens.txt").write_text("\n".join(tokens))
    command = [sys.executable, str(BENCHMARKS / "exchange_cpu.py"), "--worker", "--work", str(tmp_path)]
    command += ["--requests", "4", "--warmup", "1", "--time-stages"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(BENCHMARKS.parent), str(BENCHMARKS)])}
    out = subprocess.run(command, env=env, capture_output=True, text=True, check=True, timeout=120)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["failed"] == 0, out.stderr
    stages = result["stages"]
    assert len(stages) == len(stage_times.STAGES), sorted(stages)
    called = {name: calls for name, (calls, _) in stages.items()}
    assert all(calls >= 1 for calls in called.values()), called
    outer = stages["WSGIOverRSGI._call"][1]
    assert all(0 < micros <= outer for _, micros in stages.values()), stages
