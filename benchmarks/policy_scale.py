"""Benchmark: policy size.  Load time of 10,000 rules, and the exchange with 10,000 rules against 10.

    .venv/bin/python benchmarks/policy_scale.py [--rules 10000] [--rounds 5] [--seconds 2]

Two policy directories are generated: the big one (``--rules`` GitHub-shaped rules: two thirds
exact subjects, one third ``subject_pattern`` with a literal prefix, in one file and in one file
per rule) and a 10-rule one.  Loading each is timed (wall and CPU, best of three).  Then the
full pipeline (``TokenExchange.handle``: RS256 subject token verified, policy, risk, ES256 mint,
audit record committed to SQLite) runs in process for ``--seconds`` per round on each policy,
interleaved over ``--rounds`` rounds, and the median ratio of exchanges per second is printed.
The request matches the LAST rule of the big policy, the worst case for trying rules in order.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from sts.adapters.policy_files import load_policies, policy_files  # noqa: E402
from sts.app import create_app  # noqa: E402
from sts.dev.issuer import DevIssuer  # noqa: E402
from sts.protocol.wire import WireRequest  # noqa: E402
from sts.settings.load import load_settings  # noqa: E402

ISSUER = "https://sts.bench"
AUDIENCE = "https://deploy.example.com"


def rules(count: int) -> list[dict[str, Any]]:
    made = []
    for i in range(count):
        rule: dict[str, Any] = {
            "name": f"r{i}",
            "issuer": "upstream",
            "require_client_authentication": False,
            "grant": {"audiences": [AUDIENCE], "scopes": ["deploy:read"], "max_lifetime": 300},
        }
        if i % 3 == 0:
            rule["subject_pattern"] = f"repo:org{i}/.*:ref:refs/heads/main"
        else:
            rule["subject"] = f"repo:acme/app{i}:ref:refs/heads/main"
        made.append(rule)
    # The benchmark's token matches the last rule only.
    made[-1].pop("subject_pattern", None)
    made[-1]["subject"] = "repo:acme/app:ref:refs/heads/main"
    return made


def write_policy(directory: Path, count: int, *, one_file: bool) -> Path:
    directory.mkdir(parents=True)
    made = rules(count)
    if one_file:
        (directory / "all.yaml").write_text(yaml.safe_dump({"version": 1, "rules": made}))
    else:
        for i, rule in enumerate(made):
            (directory / f"r{i:05d}.yaml").write_text(yaml.safe_dump({"version": 1, "rules": [rule]}))
    return directory


def time_load(directory: Path) -> tuple[float, float]:
    best_wall = best_cpu = float("inf")
    for _ in range(3):
        wall, cpu = time.perf_counter(), time.process_time()
        load_policies(
            policy_files(directory), issuers=frozenset({"upstream"}), clients=frozenset(), max_lifetime=3600
        )
        best_wall = min(best_wall, time.perf_counter() - wall)
        best_cpu = min(best_cpu, time.process_time() - cpu)
    return best_wall, best_cpu


def exchanges_per_second(handle: Any, wire: WireRequest, seconds: float) -> float:
    count, end = 0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        handle(wire)
        count += 1
    return count / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rules", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=2.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, DevIssuer.serve_ephemeral(alg="RS256") as upstream:
        root = Path(tmp)
        big_one = write_policy(root / "big-one-file", args.rules, one_file=True)
        big_many = write_policy(root / "big-many-files", args.rules, one_file=False)
        small = write_policy(root / "small", 10, one_file=True)
        for label, directory in (("one file", big_one), ("one file per rule", big_many)):
            wall, cpu = time_load(directory)
            print(f"load {args.rules} rules, {label}: {wall:.2f} s wall, {cpu:.2f} s CPU (best of 3)")

        def app_for(policies: Path, name: str) -> Any:
            settings = load_settings(
                config_file=None,
                environ={},
                overrides={
                    "issuer": ISSUER,
                    "database_url": f"sqlite:///{root / name}.sqlite",
                    "keys_dir": str(root / "keys"),
                    "policies_dir": str(policies),
                    # One identity, thousands of times a second: the flood guards would refuse most
                    # (as in bench.py; benchmarks/rate_limits.py measures what they cost).
                    "rate_limits": {"enabled": False},
                    "issuers": [
                        {
                            "name": "upstream",
                            "issuer": upstream.issuer.issuer_url,
                            "jwks_uri": upstream.jwks_uri,
                            "algorithms": ["RS256"],
                            "audiences": [ISSUER],
                        }
                    ],
                },
            )
            return create_app(settings).extensions["sts"].exchange.handle

        token = upstream.issuer.github_actions_token(audience=ISSUER, lifetime=3600)
        wire = WireRequest(
            form={
                "grant_type": ["urn:ietf:params:oauth:grant-type:token-exchange"],
                "subject_token": [token],
                "subject_token_type": ["urn:ietf:params:oauth:token-type:jwt"],
                "audience": [AUDIENCE],
            },
            query={},
            content_type="application/x-www-form-urlencoded",
            authorization=None,
            request_id="bench",
            source_ip="127.0.0.1",
        )
        handles = {"10 rules": app_for(small, "small"), f"{args.rules} rules": app_for(big_one, "big")}
        for handle in handles.values():
            handle(wire)  # warm up, and fail loudly if the request is refused
        rates: dict[str, list[float]] = {name: [] for name in handles}
        for _ in range(args.rounds):
            for name, handle in handles.items():
                rates[name].append(exchanges_per_second(handle, wire, args.seconds))
        medians = {name: statistics.median(r) for name, r in rates.items()}
        for name, median in medians.items():
            print(f"exchange, {name}: {median:.0f}/s (median of {args.rounds} rounds, in process)")
        small_rate, big_rate = medians.values()
        print(f"ratio {args.rules} rules / 10 rules: {big_rate / small_rate:.2f} (goal: at least 0.90)")


if __name__ == "__main__":
    main()
