"""Benchmark: the full token exchange against the bare floor and node oidc-provider, in one run.

    .venv/bin/python benchmarks/bench.py [--rounds 3] [--seconds 10] [--connections 8]
        [--systems floor,exchange-embedded,exchange-redis,exchange-pg,peer]
        [--policy-rules 10000] [--audit-rows 1000000] [--memory-requests 100000]
        [--profile exchange-embedded] [--source LABEL=DIR] [--json FILE]

Systems (every server gets ``--workers`` processes with ``--server-threads`` threads, of which
``--active-threads`` run Python at once, on loopback):

``floor``
    ``benchmarks/bare_app.py`` served by granian exactly as ``sts serve`` serves the exchange
    (``python -m sts.serving bare_app:app``): it verifies the DPoP proof and the subject token and
    signs one DPoP-bound ``at+jwt``, nothing else.
``exchange-embedded``, ``exchange-redis``, ``exchange-pg``
    ``sts serve`` with the embedded store on SQLite; with a private ``redis-server`` (started here,
    append-only file synced on every write, as in production) and the audit trail on SQLite; with
    PostgreSQL (a private database created here and dropped at the end).  The policy has 10 rules,
    the request matches the last: issuer, exact subject and ``repository_id`` fact, ``require_dpop``,
    ``single_use``, and a ``risk`` section.
``serving`` (not in the default set)
    ``bare_app.py`` answering a constant after reading the form: what serving a request costs.
``peer``
    node oidc-provider 9 with an RFC 8693 grant (``benchmarks/node-peer/``), ``WORKERS`` processes,
    with its own request (``client_secret_basic``; it verifies the subject token and ignores DPoP).

Every request carries a distinct GitHub-Actions-shaped RS256 subject token (``single_use`` holds: a
token is accepted once) and a fresh ES256 DPoP proof with a unique ``jti`` (one key, as one
workload has), and the exchange answers with a DPoP-bound ES256 ``at+jwt`` after the policy, the
risk assessment, the single-use check and the audit record committed.  The subject tokens are
signed in advance (in parallel, cached in ``--cache-dir`` for a day: every server starts with empty
stores, so a later run may send them again); the proofs are signed before each round.  ``wrk``
sends them from a file (``benchmarks/token_requests.lua``).

The systems are measured in turn, ``--rounds`` times (floor, exchange..., peer, floor, ...), each
for ``--seconds`` with ``wrk -t1 -c<connections> --latency``.  Per run: requests per second, p50 and
p99 latency, CPU per request (utime + stime of the server's process tree from ``/proc``, with the
stime alone as ``of it kernel``; ``loop``: of the workers' main threads, which run granian's event
loops; and of the store's processes: redis-server, the PostgreSQL backends of the database still
open at the end, so a lower bound when the pool opens and closes connections, which is counted
too), the resident memory of
the tree, and the busiest worker's share of the CPU (0.5 is even over 2 workers).  The table gives
medians over rounds; the ratios are medians of the per-round ratios (``x floor by CPU``: the floor's
CPU per request over the system's, what the throughput ratio would be if CPU alone limited both).

Options adding systems or runs:

``--policy-rules N``
    adds ``exchange-embedded-N-rules``: the embedded exchange with an N-rule policy (the request
    matches the last rule), compared with the 10-rule ``exchange-embedded``.
``--audit-rows N``
    adds ``exchange-embedded-N-audit`` and ``exchange-pg-N-audit``, whose audit tables are filled
    with N rows before they start, compared with their empty twins.
``--memory-requests N``
    after the rounds, sends N more requests to ``--memory-system`` and samples the resident memory
    of its process tree every ``--memory-interval`` seconds (start, end, maximum).
``--profile SYSTEM[,SYSTEM]``
    after the rounds, samples every worker of each SYSTEM with py-spy under the same load for
    ``--profile-seconds`` (``--profile-mode gil``: the thread holding the GIL; ``cpu``: every thread
    py-spy does not see as idle), keeps the stacks in the work directory and prints the top frames
    as shares (samples waiting for work left out): by thread (event loop or request threads), self
    time by package and by function, inclusive time by function.  uvloop runs in C: its work, and
    its waits for the GIL, show as the frame that started the loop (granian's
    ``MPServer._spawn_rsgi_worker``), where asyncio's waits showed as ``EpollSelector.select``
    (left out); the per-round ``loop`` CPU is the exact cost of the loops.
``--source LABEL=DIR``
    adds ``exchange-embedded@LABEL``: the embedded exchange run from another copy of the ``sts``
    package (``DIR/sts``), to compare a change in the same interleaved run (and
    ``exchange-redis@LABEL``, ``exchange-pg@LABEL`` on a store of their own when those run).
``--setting NAME=VALUE``
    a setting for every exchange's ``sts.yaml`` (``database_pool_size=9``).
``--redis-appendfsync always|everysec|no``
    the private Redis's fsync policy (``always``, as production runs it).

Needs: ``wrk`` (installed with apt-get when missing and running as root, else explained),
``redis-server``, PostgreSQL on ``--postgres`` (trust auth), ``node`` and ``npm`` for the peer
(``npm install`` runs once into the cache), ``py-spy`` for ``--profile`` (``pip install py-spy``).
"""

from __future__ import annotations

import argparse
import base64
import collections
import contextlib
import hashlib
import json
import multiprocessing
import os
import re
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests
import yaml

REPO = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
sys.path.insert(0, str(REPO))

from joserfc import jwt  # noqa: E402
from joserfc.jwk import ECKey  # noqa: E402

from sts.dev.issuer import DevIssuer  # noqa: E402

GITHUB_ISS = "https://token.actions.githubusercontent.com"
STS_ISSUER = "https://sts.bench"
HTU = STS_ISSUER + "/token"
SUBJECT_AUDIENCE = "sts"  # the node peer checks aud=sts
AUDIENCE, SCOPE = "payments", "read"
PEER_AUTHORIZATION = "Basic " + base64.b64encode(b"client_2:hemligt").decode()
TOKEN_LIFETIME = 86400
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
_STS_MAIN = "import sys; sys.argv[0] = 'sts'; from sts.cli import main; main()"
BASE_SYSTEMS = ("floor", "exchange-embedded", "exchange-redis", "exchange-pg", "peer")
#: Optional: bare_app.py answering a constant (form parsed, nothing verified): the cost of serving.
EXTRA_SYSTEMS = ("serving",)


# -- tools -------------------------------------------------------------------------------------------


def need(tool: str, hint: str, *, apt: str | None = None) -> str:
    found = shutil.which(tool)
    if found:
        return found
    if apt and os.geteuid() == 0 and shutil.which("apt-get"):
        print(f"{tool} is missing: apt-get install -y {apt}", flush=True)
        subprocess.run(["apt-get", "install", "-y", apt], check=False, capture_output=True)
        found = shutil.which(tool)
        if found:
            return found
    raise SystemExit(f"{tool} is needed: {hint}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{url}: the server exited\n{log.read_text(errors='replace')[-3000:]}")
        try:
            if requests.get(url, timeout=1).status_code < 500:
                return
        except requests.RequestException:
            pass
        time.sleep(0.2)
    raise SystemExit(f"{url} did not come up\n{log.read_text(errors='replace')[-3000:]}")


# -- /proc -------------------------------------------------------------------------------------------


def children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = collections.defaultdict(list)
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        kids[ppid].append(int(entry))
    return kids


def process_tree(pid: int) -> list[int]:
    kids, tree, todo = children_map(), [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(kids.get(current, []))
    return tree


def cpu_ticks(pid: int, thread: int | None = None, *, kernel_only: bool = False) -> int:
    """CPU ticks of process ``pid``, or of its thread ``thread`` only; ``kernel_only``: in the kernel."""
    stat = f"/proc/{pid}/stat" if thread is None else f"/proc/{pid}/task/{thread}/stat"
    try:
        fields = Path(stat).read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0
    # utime + stime (fields 14 and 15 of stat)
    return int(fields[12]) if kernel_only else int(fields[11]) + int(fields[12])


def rss_bytes(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
    return total


# -- tokens and proofs ---------------------------------------------------------------------------------


def _sign_tokens(args: tuple[str, int, float]) -> list[str]:
    key_dir, count, now = args
    issuer = DevIssuer.load_or_create(Path(key_dir), GITHUB_ISS, "RS256")
    return [
        issuer.github_actions_token(audience=SUBJECT_AUDIENCE, now=now, lifetime=TOKEN_LIFETIME)
        for _ in range(count)
    ]


class TokenPool:
    """Distinct subject tokens, signed in parallel and cached on disk (the key with them)."""

    def __init__(self, cache: Path, *, min_remaining: float) -> None:
        self.dir = cache / "subject-tokens"
        self.file = self.dir / "tokens.txt"
        self.meta = self.dir / "meta.json"
        self.min_remaining = min_remaining
        self.next = 0
        self.tokens: list[str] = []

    def prepare(self, needed: int) -> None:
        now = time.time()
        tokens: list[str] = []
        created = now
        if self.meta.exists() and self.file.exists():
            meta = json.loads(self.meta.read_text())
            if meta["created"] + TOKEN_LIFETIME - now > self.min_remaining:
                created = meta["created"]
                tokens = self.file.read_text().split()
        if not tokens:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir.mkdir(parents=True, mode=0o700)
        missing = needed - len(tokens)
        if missing > 0:
            started = time.perf_counter()
            print(f"signing {missing} RS256 subject tokens (cached in {self.dir}) ...", flush=True)
            procs = max(1, os.cpu_count() or 1)
            chunks = [(missing + i) // procs for i in range(procs)]
            with multiprocessing.get_context("fork").Pool(procs) as pool:
                made = pool.map(_sign_tokens, [(str(self.dir / "issuer"), n, created) for n in chunks])
            new = [t for chunk in made for t in chunk]
            with self.file.open("a") as out:
                out.write("".join(t + "\n" for t in new))
            self.meta.write_text(json.dumps({"created": created}))
            tokens += new
            elapsed = time.perf_counter() - started
            print(f"  {elapsed:.1f} s ({elapsed / missing * 1000:.2f} ms per token, {procs} processes)")
        self.tokens = tokens

    def issuer(self) -> DevIssuer:
        return DevIssuer.load_or_create(self.dir / "issuer", GITHUB_ISS, "RS256")

    def take(self, count: int) -> list[str]:
        taken = self.tokens[self.next : self.next + count]
        if len(taken) < count:
            raise SystemExit("token pool too small (a bug in the plan)")
        self.next += count
        return taken


class Proofs:
    """DPoP proofs by one key (one workload), each with its own jti, dated when made (RFC 9449 §4.2)."""

    def __init__(self, key: ECKey | None = None) -> None:
        self.key = key if key is not None else ECKey.generate_key("P-256")
        self.header = {"typ": "dpop+jwt", "alg": "ES256", "jwk": self.key.as_dict(private=False)}

    def make(self, count: int) -> list[str]:
        now = int(time.time())
        return [
            jwt.encode(
                self.header,
                {"jti": uuid.uuid4().hex, "htm": "POST", "htu": HTU, "iat": now},
                self.key,
                algorithms=["ES256"],
            )
            for _ in range(count)
        ]


def write_requests(path: Path, tokens: list[str], proofs: list[str]) -> Path:
    path.write_text("".join(f"{t}\t{p}\n" for t, p in zip(tokens, proofs, strict=True)))
    return path


# -- systems -----------------------------------------------------------------------------------------


@dataclass
class System:
    name: str
    kind: str  # floor | exchange | peer
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    log: Path | None = None
    store_pids: Callable[[], list[int]] = lambda: []
    store_sessions: Callable[[], int] | None = None
    database_url: str | None = None
    compare_with: str | None = None  # the twin a variant is compared with

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def authorization(self) -> str:
        return PEER_AUTHORIZATION if self.kind == "peer" else "-"

    def workers(self) -> list[int]:
        assert self.proc is not None
        tree = process_tree(self.proc.pid)
        kids = children_map()
        # granian and node:cluster: the workers are the main process's children
        direct = [pid for pid in kids.get(self.proc.pid, []) if pid in tree]
        return direct or [self.proc.pid]


def rule_set(count: int) -> list[dict[str, Any]]:
    """``count - 1`` decoy rules (exact subjects and literal-prefix patterns), then the one that applies."""
    rules: list[dict[str, Any]] = []
    for i in range(count - 1):
        rule: dict[str, Any] = {
            "name": f"decoy{i}",
            "issuer": "github",
            "require_client_authentication": False,
            "grant": {"audiences": [AUDIENCE], "scopes": [SCOPE]},
        }
        if i % 3 == 0:
            rule["subject_pattern"] = f"repo:org{i}/.*:ref:refs/heads/main"
        else:
            rule["subject"] = f"repo:acme/app{i}:ref:refs/heads/main"
        rules.append(rule)
    rules.append(
        {
            "name": "bench",
            "issuer": "github",
            "subject": "repo:acme/app:ref:refs/heads/main",
            "facts": {"repository_id": "123456"},
            "require_client_authentication": False,
            "require_dpop": True,
            "single_use": True,
            "grant": {
                "audiences": [AUDIENCE],
                "scopes": [SCOPE],
                "default_scopes": [SCOPE],
                "max_lifetime": 300,
            },
            "risk": {"networks": ["127.0.0.0/8"]},
        }
    )
    return rules


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.work = Path(tempfile.mkdtemp(prefix="sts-bench-"))
        self.cache = Path(args.cache_dir)
        self.systems: dict[str, System] = {}
        self.cleanups: list[Callable[[], None]] = []
        self.jwks_file = self.work / "issuer-jwks.json"

    # -- setup ----------------------------------------------------------------------------------------

    def env(self, source: Path | None = None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("STS_", "BARE_"))}
        paths = [str(HERE), str(REPO)]
        if source is not None:
            paths.insert(0, str(source))
        env["PYTHONPATH"] = os.pathsep.join(paths)
        return env

    def sizing(self, port: int) -> list[str]:
        a = self.args
        return ["--port", str(port), "--workers", str(a.workers), "--threads", str(a.server_threads)]

    def spawn(self, system: System, command: list[str], env: dict[str, str], cwd: Path) -> None:
        system.log = self.work / f"{system.name}.log"
        with system.log.open("wb") as log:
            system.proc = subprocess.Popen(command, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT)
        self.systems[system.name] = system

    def start_floor(self, issuer: DevIssuer, name: str = "floor") -> None:
        system = System(name, "floor", free_port())
        env = self.env()
        env.update(
            BARE_JWKS=json.dumps(issuer.jwks()),
            BARE_ISSUER=GITHUB_ISS,
            BARE_AUDIENCE=SUBJECT_AUDIENCE,
            BARE_HTU=HTU,
            BARE_NULL="1" if name == "serving" else "",
        )
        command = [sys.executable, "-m", "sts.serving", "bare_app:app", *self.sizing(system.port)]
        if self.args.active_threads != 1:
            command += ["--active-threads", str(self.args.active_threads)]
        self.spawn(system, command, env, self.work)

    def start_exchange(
        self,
        name: str,
        *,
        store: str = "embedded",
        database_url: str | None = None,
        redis_url: str | None = None,
        rules: int = 10,
        source: Path | None = None,
        store_pids: Callable[[], list[int]] = lambda: [],
        store_sessions: Callable[[], int] | None = None,
        compare_with: str | None = None,
        prepare: Callable[[str], None] | None = None,
    ) -> None:
        system = System(
            name,
            "exchange",
            free_port(),
            store_pids=store_pids,
            store_sessions=store_sessions,
            compare_with=compare_with,
        )
        home = self.work / name
        (home / "policies").mkdir(parents=True)
        (home / "policies" / "bench.yaml").write_text(
            yaml.safe_dump({"version": 1, "rules": rule_set(rules)})
        )
        system.database_url = database_url or f"sqlite:///{home / 'sts.sqlite'}"
        config: dict[str, Any] = {
            "issuer": STS_ISSUER,
            "host": "127.0.0.1",
            "store": store,
            "database_url": system.database_url,
            "keys_dir": str(home / "keys"),
            "policies_dir": str(home / "policies"),
            "log_level": "WARNING",
            # One identity from one address, thousands of times a second: the default flood guards
            # would answer most requests 429 (benchmarks/rate_limits.py measures what they cost;
            # --setting 'rate_limits={enabled: true}' turns them back on here).
            "rate_limits": {"enabled": False},
            "issuers": [github_issuer(self.jwks_file)],
        }
        if redis_url:
            config["redis_url"] = redis_url
        if self.args.active_threads != 1:
            config["active_threads"] = self.args.active_threads
        config.update(self.args.setting)
        (home / "sts.yaml").write_text(yaml.safe_dump(config))
        if prepare is not None:
            prepare(system.database_url)
        env = self.env(source)
        env["STS_CONFIG"] = str(home / "sts.yaml")
        # `sts serve`, from whichever copy of the package comes first on PYTHONPATH
        command = [sys.executable, "-c", _STS_MAIN, "serve", *self.sizing(system.port)]
        self.spawn(system, command, env, home)

    def start_redis(self, name: str = "redis") -> tuple[str, Callable[[], list[int]]]:
        server = need("redis-server", "apt-get install redis-server", apt="redis-server")
        port, home = free_port(), self.work / name
        home.mkdir()
        proc = subprocess.Popen(
            [server, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(home), "--save", "",
             "--appendonly", "yes", "--appendfsync", self.args.redis_appendfsync,
             "--maxmemory-policy", "noeviction"],
            stdout=(home / "redis.log").open("wb"), stderr=subprocess.STDOUT,
        )  # fmt: skip

        def stop() -> None:
            proc.terminate()
            proc.wait(10)

        self.cleanups.append(stop)
        for _ in range(100):
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                break
            time.sleep(0.1)
        return f"redis://127.0.0.1:{port}/0", lambda: [proc.pid]

    def create_database(self, suffix: str) -> tuple[str, Callable[[], list[int]], Callable[[], int]]:
        import psycopg

        name = f"sts_bench_{os.getpid()}_{secrets.token_hex(3)}_{suffix}"
        admin = self.args.postgres
        try:
            with psycopg.connect(f"{admin}/postgres", autocommit=True) as conn:
                conn.execute(f'CREATE DATABASE "{name}"')
        except psycopg.Error as exc:
            raise SystemExit(
                f"PostgreSQL at {admin} is needed for exchange-pg ({exc}); or leave it out"
            ) from exc

        def drop() -> None:
            with psycopg.connect(f"{admin}/postgres", autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

        self.cleanups.append(drop)

        def backends() -> list[int]:
            with psycopg.connect(f"{admin}/postgres", autocommit=True) as conn:
                rows = conn.execute("SELECT pid FROM pg_stat_activity WHERE datname = %s", (name,)).fetchall()
            return [int(r[0]) for r in rows]

        def sessions() -> int:
            """Connections opened to the database so far (PostgreSQL 14+; flushed about every second)."""
            with psycopg.connect(f"{admin}/postgres", autocommit=True) as conn:
                conn.execute("SELECT pg_stat_clear_snapshot()")
                row = conn.execute(
                    "SELECT sessions FROM pg_stat_database WHERE datname = %s", (name,)
                ).fetchone()
            return int(row[0]) if row and row[0] is not None else 0

        url = admin.replace("postgresql://", "postgresql+psycopg://", 1) + "/" + name
        return url, backends, sessions

    def start_peer(self, issuer: DevIssuer) -> None:
        need("node", "apt-get install nodejs npm (or leave out the peer: --systems ...)", apt="nodejs")
        npm = need("npm", "apt-get install npm", apt="npm")
        source = HERE / "node-peer"
        digest = hashlib.sha256((source / "package.json").read_bytes()).hexdigest()[:12]
        installed = self.cache / f"node-peer-{digest}"
        if not (installed / "node_modules" / "oidc-provider").exists():
            print(f"npm install for the node peer into {installed} ...", flush=True)
            installed.mkdir(parents=True, exist_ok=True)
            for name in ("package.json", "package-lock.json"):
                if (source / name).exists():
                    shutil.copy(source / name, installed / name)
            subprocess.run([npm, "install", "--no-audit", "--no-fund"], cwd=installed, check=True)
        shutil.copy(source / "sts.mjs", installed / "sts.mjs")
        home = self.work / "peer"
        home.mkdir()
        public = issuer.jwks()["keys"][0]
        (home / "issuer_pub.json").write_text(json.dumps(public))
        (home / "sts_priv.json").write_text(json.dumps(ECKey.generate_key("P-256").as_dict(private=True)))
        system = System("peer", "peer", free_port())
        env = {k: v for k, v in os.environ.items() if not k.startswith(("STS_", "BARE_"))}
        env.update(
            PORT=str(system.port), WORKERS=str(self.args.workers), MINT="provider", NODE_ENV="production"
        )
        self.spawn(system, ["node", str(installed / "sts.mjs")], env, home)

    def prefill_audit(self, rows: int) -> Callable[[str], None]:
        def prepare(url: str) -> None:
            from sts.adapters.sql.engines import make_engine
            from sts.migrations import upgrade

            started = time.perf_counter()
            engine = make_engine(url)
            upgrade(engine)
            engine.dispose()
            fill_audit_rows(url, rows)
            print(
                f"  {rows} audit rows in {time.perf_counter() - started:.0f} s ({url.split('/')[-1]})",
                flush=True,
            )

        return prepare

    def start_all(self, issuer: DevIssuer) -> None:
        a = self.args
        wanted = set(a.systems)
        self.jwks_file.write_text(json.dumps(issuer.jwks()))
        if "floor" in wanted:
            self.start_floor(issuer)
        if "serving" in wanted:
            self.start_floor(issuer, "serving")
        if "exchange-embedded" in wanted:
            self.start_exchange("exchange-embedded")
        if "exchange-redis" in wanted:
            redis_url, redis_pids = self.start_redis()
            self.start_exchange("exchange-redis", store="redis", redis_url=redis_url, store_pids=redis_pids)
        if "exchange-pg" in wanted:
            url, backends, sessions = self.create_database("pg")
            self.start_exchange("exchange-pg", database_url=url, store_pids=backends, store_sessions=sessions)
        if "peer" in wanted:
            self.start_peer(issuer)
        if a.policy_rules:
            self.start_exchange(
                f"exchange-embedded-{a.policy_rules}-rules",
                rules=a.policy_rules,
                compare_with="exchange-embedded",
            )
        if a.audit_rows:
            print(f"filling audit tables with {a.audit_rows} rows ...", flush=True)
            self.start_exchange(
                f"exchange-embedded-{a.audit_rows}-audit",
                compare_with="exchange-embedded",
                prepare=self.prefill_audit(a.audit_rows),
            )
            if "exchange-pg" in wanted:
                url, backends, sessions = self.create_database("audit")
                self.start_exchange(
                    f"exchange-pg-{a.audit_rows}-audit",
                    database_url=url,
                    store_pids=backends,
                    store_sessions=sessions,
                    compare_with="exchange-pg",
                    prepare=self.prefill_audit(a.audit_rows),
                )
        for label, directory in a.source:
            self.start_exchange(
                f"exchange-embedded@{label}", source=directory, compare_with="exchange-embedded"
            )
            if "exchange-redis" in wanted:
                redis_url, redis_pids = self.start_redis(f"redis-{label}")
                self.start_exchange(
                    f"exchange-redis@{label}",
                    store="redis",
                    redis_url=redis_url,
                    source=directory,
                    store_pids=redis_pids,
                    compare_with="exchange-redis",
                )
            if "exchange-pg" in wanted:
                url, backends, sessions = self.create_database(f"pg_{label}")
                self.start_exchange(
                    f"exchange-pg@{label}",
                    database_url=url,
                    source=directory,
                    store_pids=backends,
                    store_sessions=sessions,
                    compare_with="exchange-pg",
                )
        for system in self.systems.values():
            assert system.proc is not None and system.log is not None
            probe = "/.well-known/openid-configuration" if system.kind == "peer" else "/healthz"
            wait_http(system.url + probe, system.proc, system.log)

    def stop_all(self) -> None:
        for system in self.systems.values():
            if system.proc is not None and system.proc.poll() is None:
                system.proc.terminate()
        for system in self.systems.values():
            if system.proc is not None:
                try:
                    system.proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    system.proc.kill()
        for cleanup in reversed(self.cleanups):
            with contextlib.suppress(Exception):
                cleanup()

    # -- one measurement ------------------------------------------------------------------------------

    def wrk(self, system: System, requests_file: Path, seconds: float, limit: int = 0) -> dict[str, Any]:
        a = self.args
        command = [
            "wrk", f"-t{a.wrk_threads}", f"-c{a.connections}", f"-d{int(seconds)}s", "--latency",
            "-s", str(HERE / "token_requests.lua"), system.url,
            "--", str(requests_file), AUDIENCE, SCOPE, system.authorization, str(limit),
        ]  # fmt: skip
        out = subprocess.run(command, capture_output=True, text=True, check=False)
        if out.returncode != 0:
            raise SystemExit(f"wrk failed on {system.name}: {out.stderr}{out.stdout}")
        return parse_wrk(out.stdout)

    def measure(self, system: System, requests_file: Path) -> dict[str, Any]:
        assert system.proc is not None
        tree = process_tree(system.proc.pid)
        workers = system.workers()
        stores = system.store_pids()
        before = {pid: cpu_ticks(pid) for pid in tree}
        kernel_before = {pid: cpu_ticks(pid, kernel_only=True) for pid in tree}
        # A worker's main thread runs its event loop (granian): the loop's own cost, apart.
        loops_before = {pid: cpu_ticks(pid, pid) for pid in workers}
        store_before = {pid: cpu_ticks(pid) for pid in stores}
        sessions_before = system.store_sessions() if system.store_sessions else 0
        result = self.wrk(system, requests_file, self.args.seconds)
        after_tree = process_tree(system.proc.pid)
        spent = {pid: max(0, cpu_ticks(pid) - before.get(pid, 0)) for pid in after_tree}
        kernel = sum(
            max(0, cpu_ticks(pid, kernel_only=True) - kernel_before.get(pid, 0)) for pid in after_tree
        )
        # Store processes alive at the end (a PostgreSQL backend that closed took its CPU time along).
        store_spent = sum(max(0, cpu_ticks(pid) - store_before.get(pid, 0)) for pid in system.store_pids())
        if system.store_sessions:
            time.sleep(1.2)  # PostgreSQL flushes its session counts about every second
            result["store_connections"] = system.store_sessions() - sessions_before
        worker_spent = [spent.get(pid, 0) for pid in workers]
        loop_spent = sum(max(0, cpu_ticks(pid, pid) - ticks) for pid, ticks in loops_before.items())
        total = max(1, result["requests"])
        result.update(
            cpu_ms=sum(spent.values()) / CLK_TCK * 1000 / total,
            kernel_cpu_ms=kernel / CLK_TCK * 1000 / total,
            loop_cpu_ms=loop_spent / CLK_TCK * 1000 / total,
            store_cpu_ms=store_spent / CLK_TCK * 1000 / total if stores else None,
            rss_mb=rss_bytes(after_tree) / 2**20,
            busiest_worker=max(worker_spent) / max(1, sum(worker_spent)) if len(worker_spent) > 1 else 1.0,
        )
        return result

    def check(self, system: System, result: dict[str, Any], what: str) -> None:
        reused = result["reused"] if system.kind == "exchange" else 0
        if result["failed"] or reused or result["socket_errors"]:
            r = result
            print(
                f"  !! {system.name} {what}: {r['failed']} failed, {r['reused']} requests sent again "
                f"(raise --max-rate), socket errors {r['socket_errors']}; first: {r['first_failure']}",
                flush=True,
            )

    # -- the run --------------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        a = self.args
        per_run = int(a.max_rate * a.seconds)
        warm = int(a.max_rate * a.warmup)
        needed = (
            warm
            + per_run * a.rounds
            + (a.memory_requests + a.max_rate * a.memory_chunk if a.memory_requests else 0)
            + int(a.max_rate * a.profile_seconds) * len(a.profile)
        )
        pool = TokenPool(self.cache, min_remaining=a.rounds * 600 + 3600)
        pool.prepare(needed)
        issuer = pool.issuer()
        proofs = Proofs()
        print(f"work directory {self.work}", flush=True)
        self.start_all(issuer)
        order = [name for name in self.systems]
        print("systems: " + ", ".join(f"{n} ({s.url})" for n, s in self.systems.items()), flush=True)

        warm_file = write_requests(
            self.work / "warm.txt", tokens := pool.take(warm), proofs.make(len(tokens))
        )
        for name in order:
            system = self.systems[name]
            result = self.wrk(system, warm_file, a.warmup)
            if result["ok"] == 0:
                raise SystemExit(f"{name} refused the warm-up requests: {result['first_failure']}")
            self.check(system, result, "warm-up")

        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in order}
        for round_number in range(1, a.rounds + 1):
            tokens = pool.take(per_run)
            requests_file = write_requests(
                self.work / f"round{round_number}.txt", tokens, proofs.make(len(tokens))
            )
            for name in order:
                time.sleep(a.pause)
                result = self.measure(self.systems[name], requests_file)
                self.check(self.systems[name], result, f"round {round_number}")
                runs[name].append(result)
                r = result
                print(
                    f"round {round_number} {name:34} {r['rps']:8.0f} req/s  p50 {r['p50']:6.1f} ms  "
                    f"p99 {r['p99']:6.1f} ms  cpu {r['cpu_ms']:5.2f} ms/req (loop {r['loop_cpu_ms']:4.2f})  "
                    f"rss {r['rss_mb']:5.0f} MB  "
                    f"busiest worker {r['busiest_worker']:.2f}"
                    + (f"  new db connections {r['store_connections']}" if "store_connections" in r else ""),
                    flush=True,
                )
            requests_file.unlink()
        report: dict[str, Any] = {
            "settings": settings(a),
            "runs": runs,
            "summary": summarise(runs, self.systems),
        }
        if a.rounds:
            print()
            print(render(report["summary"], a))
        if a.memory_requests:
            report["memory"] = self.memory(pool, proofs)
        missing = set(a.profile) - set(self.systems)
        if missing:
            raise SystemExit(f"--profile: no system {', '.join(sorted(missing))}")
        report["profile"] = {name: self.profile(self.systems[name], pool, proofs) for name in a.profile}
        return report

    def memory(self, pool: TokenPool, proofs: Proofs) -> dict[str, Any]:
        a = self.args
        system = self.systems[a.memory_system]
        assert system.proc is not None
        samples: list[tuple[float, float]] = []
        stop = threading.Event()
        started = time.monotonic()

        def sample() -> None:
            while not stop.is_set():
                samples.append((time.monotonic() - started, rss_bytes(process_tree(system.proc.pid)) / 2**20))  # type: ignore[union-attr]
                stop.wait(a.memory_interval)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        sent = failed = 0
        rate = float(a.max_rate)
        try:
            # Runs of at most --memory-chunk seconds, each with proofs made just before it (their iat
            # must be recent); a run sends what it can, and the next takes the tokens it did not send.
            while sent < a.memory_requests:
                left = a.memory_requests - sent
                seconds = max(2, min(a.memory_chunk, int(left / rate) + 2))
                size = min(left + 2 * a.connections, int(min(a.max_rate, 2 * rate) * seconds))
                start = pool.next
                tokens = pool.take(size)
                file = write_requests(self.work / "memory.txt", tokens, proofs.make(len(tokens)))
                result = self.wrk(system, file, seconds, limit=left)
                self.check(system, result, "memory run")
                # Sent but unanswered when wrk stopped still reached the server: used up too.
                pool.next = start + min(size, result["sent"])
                sent += result["requests"]
                failed += result["failed"]
                rate = max(50.0, result["rps"])
                print(f"memory {system.name}: {sent} requests, {samples[-1][1]:.0f} MB", flush=True)
        finally:
            stop.set()
            sampler.join()
        rss = [mb for _, mb in samples]
        outcome = {
            "system": system.name,
            "requests": sent,
            "failed": failed,
            "interval": a.memory_interval,
            "start_mb": rss[0],
            "end_mb": rss[-1],
            "max_mb": max(rss),
            "samples": samples,
        }
        print(
            f"\nmemory over {sent} requests to {system.name} "
            f"(RSS of the process tree, every {a.memory_interval} s): "
            f"start {rss[0]:.0f} MB, end {rss[-1]:.0f} MB, max {max(rss):.0f} MB ({len(rss)} samples)"
        )
        return outcome

    def profile(self, system: System, pool: TokenPool, proofs: Proofs) -> dict[str, Any]:
        a = self.args
        pyspy = shutil.which("py-spy") or str(BIN / "py-spy")
        if not Path(pyspy).exists():
            raise SystemExit("py-spy is needed for --profile: .venv/bin/pip install py-spy")
        count = int(a.max_rate * a.profile_seconds)
        file = write_requests(self.work / "profile.txt", tokens := pool.take(count), proofs.make(len(tokens)))
        outputs, spies = [], []
        for pid in system.workers():
            raw = self.work / f"profile-{system.name}-{pid}.txt"
            outputs.append(raw)
            spies.append(
                subprocess.Popen(
                    [
                        pyspy,
                        "record",
                        "--pid",
                        str(pid),
                        "--duration",
                        str(int(a.profile_seconds)),
                        "--rate",
                        "200",
                        "--format",
                        "raw",
                        "--output",
                        str(raw),
                        *(["--gil"] if a.profile_mode == "gil" else []),
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        time.sleep(0.5)
        result = self.wrk(system, file, a.profile_seconds)
        for spy in spies:
            spy.wait(timeout=60)
        stacks: collections.Counter[str] = collections.Counter()
        for raw in outputs:
            if raw.exists():
                for line in raw.read_text().splitlines():
                    stack, _, count_text = line.rpartition(" ")
                    if stack and count_text.isdigit():
                        stacks[stack] += int(count_text)
        summary = profile_summary(stacks)
        print(
            f"\nprofile of {system.name} under load ({result['rps']:.0f} req/s while sampled), "
            f"py-spy ({a.profile_mode}), {summary['samples']} samples (and {summary['idle_samples']} waiting "
            f"for work, left out); stacks in {self.work}"
        )
        print(render_profile(summary))
        return summary


# -- audit prefill -------------------------------------------------------------------------------------


def audit_rows(count: int) -> Iterator[tuple[Any, ...]]:
    """Rows shaped like the exchange's records (random hashes and ids, so the indexes are realistic)."""
    base = time.time() - 30 * 86400
    record = {
        "endpoint": "token",
        "outcome": "granted",
        "grant_type": "urn:ietf:params:oauth:grant-type:token-exchange",
        "requested_audience": [AUDIENCE],
        "granted_scope": [SCOPE],
        "reasons": ["policy.matched"],
        "details": {"risk": {"mode": "enforce", "score": 0, "signals": []}, "dpop_jkt": "x" * 43},
        "pad": "x" * 2000,  # a real record is about 2.7 kB
    }
    text = json.dumps(record)
    for i in range(count):
        moment = base + i * 2.5
        yield (
            str(uuid.uuid4()),
            time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(moment)) + f".{int(moment % 1 * 1e6):06d}",
            uuid.uuid4().hex,
            "token",
            "granted",
            None,
            None,
            None,
            "github",
            f"repo:acme/app{i % 5000}:ref:refs/heads/main",
            "urn:ietf:params:oauth:token-type:jwt",
            secrets.token_hex(32),
            str(uuid.uuid4()),
            None,
            None,
            None,
            "bench",
            secrets.token_urlsafe(16),
            moment + 300,
            "kid",
            "127.0.0.1",
            text,
        )


AUDIT_COLUMNS = (
    "event_id, time, request_id, endpoint, outcome, error, client_id, client_auth_method, issuer, subject, "
    "subject_token_type, subject_token_sha256, subject_token_jti, actor_issuer, actor_subject, "
    "actor_token_sha256, rule, issued_jti, issued_exp, issued_kid, source_ip, record"
)


def fill_audit_rows(url: str, count: int) -> None:
    if url.startswith("sqlite:///"):
        import sqlite3

        conn = sqlite3.connect(url.removeprefix("sqlite:///"))
        conn.execute("PRAGMA synchronous=OFF")
        marks = ", ".join("?" * 22)
        with conn:
            conn.executemany(
                f"INSERT INTO audit_events ({AUDIT_COLUMNS}) VALUES ({marks})", audit_rows(count)
            )
        conn.close()
        return
    import psycopg

    with psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://", 1)) as pg:
        with pg.cursor() as cur, cur.copy(f"COPY audit_events ({AUDIT_COLUMNS}) FROM STDIN") as copy:
            for row in audit_rows(count):
                copy.write_row((*row[:1], row[1] + "+00", *row[2:]))
        pg.execute("ANALYZE audit_events")


# -- output --------------------------------------------------------------------------------------------

_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}


def parse_wrk(out: str) -> dict[str, Any]:
    def latency(percent: str) -> float:
        found = re.search(rf"^\s+{percent}%\s+([\d.]+)(us|ms|s|m)\s*$", out, re.M)
        return float(found.group(1)) * _UNITS[found.group(2)] if found else float("nan")

    lua = re.search(r"bench-lua sent=(\d+) ok=(\d+) failed=(\d+) reused=(\d+) first_failure=(.*)", out)
    total = re.search(r"(\d+) requests in ([\d.]+)(\w+)", out)
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if not (lua and total and rps):
        raise SystemExit(f"unexpected wrk output:\n{out}")
    return {
        "rps": float(rps.group(1)),
        "requests": int(total.group(1)),
        "sent": int(lua.group(1)),
        "p50": latency("50"),
        "p99": latency("99"),
        "ok": int(lua.group(2)),
        "failed": int(lua.group(3)),
        "reused": int(lua.group(4)),
        "first_failure": lua.group(5).strip(),
        "socket_errors": sum(int(x) for x in socket_errors.groups()) if socket_errors else 0,
    }


def github_issuer(jwks_file: Path | str) -> dict[str, Any]:
    """The trusted issuer of the benchmark's subject tokens, as an ``issuers`` entry of the settings
    (also used by ``exchange_cpu.py`` and the tests that run the benchmark's exchange)."""
    return {
        "name": "github",
        "issuer": GITHUB_ISS,
        "jwks_file": str(jwks_file),
        "algorithms": ["RS256"],
        "audiences": [SUBJECT_AUDIENCE],
        "profile": "github-actions",
        "require_jti": True,
    }


def settings(a: argparse.Namespace) -> dict[str, Any]:
    return {
        "rounds": a.rounds,
        "seconds": a.seconds,
        "connections": a.connections,
        "wrk_threads": a.wrk_threads,
        "workers": a.workers,
        "server_threads": a.server_threads,
        "active_threads": a.active_threads,
        "cpus": os.cpu_count(),
        "load_before": os.getloadavg(),
    }


def summarise(runs: dict[str, list[dict[str, Any]]], systems: dict[str, System]) -> dict[str, Any]:
    def median(name: str, key: str) -> float | None:
        values = [r[key] for r in runs[name] if r.get(key) is not None]
        return statistics.median(values) if values else None

    def ratio(name: str, other: str | None) -> float | None:
        if other is None or other not in runs or not runs[name]:
            return None
        pairs = zip(runs[name], runs[other], strict=True)
        return float(statistics.median(a["rps"] / b["rps"] for a, b in pairs))

    def cpu_ratio(name: str) -> float | None:
        if "floor" not in runs or name == "floor" or not runs[name]:
            return None
        pairs = zip(runs["floor"], runs[name], strict=True)
        return float(statistics.median(f["cpu_ms"] / s["cpu_ms"] for f, s in pairs if s["cpu_ms"]))

    rows = {}
    for name, system in systems.items():
        if not runs.get(name):
            continue
        rows[name] = {
            "rps": median(name, "rps"),
            "p50": median(name, "p50"),
            "p99": median(name, "p99"),
            "cpu_ms": median(name, "cpu_ms"),
            "kernel_cpu_ms": median(name, "kernel_cpu_ms"),
            "store_cpu_ms": median(name, "store_cpu_ms"),
            "store_connections_per_1k": (
                statistics.median(1000 * r["store_connections"] / max(1, r["requests"]) for r in runs[name])
                if "store_connections" in runs[name][0]
                else None
            ),
            "rss_mb": max(r["rss_mb"] for r in runs[name]),
            "busiest_worker": max(r["busiest_worker"] for r in runs[name]),
            "x_floor": ratio(name, "floor") if name != "floor" else None,
            "x_floor_cpu": cpu_ratio(name),
            "x_peer": ratio(name, "peer") if name != "peer" else None,
            "x_twin": ratio(name, system.compare_with),
            "twin": system.compare_with,
            # A token sent again is refused only by the exchange (single use); the others may reuse them.
            "failed": sum(
                r["failed"] + (r["reused"] if system.kind == "exchange" else 0) for r in runs[name]
            ),
        }
    return rows


def render(summary: dict[str, Any], a: argparse.Namespace) -> str:
    def fmt(value: float | None, pattern: str) -> str:
        return "" if value is None else format(value, pattern)

    lines = [
        f"Medians of {a.rounds} interleaved rounds, wrk -t{a.wrk_threads} -c{a.connections} -d{a.seconds}s; "
        f"servers {a.workers} workers x {a.server_threads} threads ({a.active_threads} running at once); "
        f"{os.cpu_count()} CPUs.",
        "",
        "| System | req/s | p50 ms | p99 ms | CPU ms/req | of it kernel | store CPU ms/req | RSS MB "
        "| busiest worker | x floor | x floor by CPU | x peer | x twin |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in summary.items():
        twin = f"{fmt(row['x_twin'], '.2f')} ({row['twin']})" if row["x_twin"] is not None else ""
        flag = f" ({row['failed']} failed)" if row["failed"] else ""
        cells = [
            f"{name}{flag}",
            fmt(row["rps"], ",.0f"),
            fmt(row["p50"], ".1f"),
            fmt(row["p99"], ".1f"),
            fmt(row["cpu_ms"], ".2f"),
            fmt(row["kernel_cpu_ms"], ".2f"),
            fmt(row["store_cpu_ms"], ".2f"),
            fmt(row["rss_mb"], ".0f"),
            fmt(row["busiest_worker"], ".2f"),
            fmt(row["x_floor"], ".2f"),
            fmt(row["x_floor_cpu"], ".2f"),
            fmt(row["x_peer"], ".2f"),
            twin,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    for name, row in summary.items():
        if row["store_connections_per_1k"] is not None:
            lines.append(
                f"\n{name}: {row['store_connections_per_1k']:.1f} database connections opened"
                " per 1,000 requests"
            )
    return "\n".join(lines)


# -- profile summary -------------------------------------------------------------------------------------


def _location(frame: str) -> tuple[str, str]:
    """``"Flask.wsgi_app (flask/app.py:1511)"`` -> ``("Flask.wsgi_app", "flask/app.py")``."""
    name, _, location = frame.rpartition(" (")
    return name, location.rstrip(")").rsplit(":", 1)[0]


def _package(path: str) -> str:
    """py-spy's short path -> a package: ``sts/core/x.py`` -> ``sts.core``, ``flask/app.py`` -> ``flask``."""
    parts = path.split("/")
    if parts[0] == "sts":
        return "sts." + parts[1].removesuffix(".py") if len(parts) > 1 else "sts"
    if len(parts) == 1:
        return parts[0].removesuffix(".py")  # a standard-library module
    return parts[0]


#: What runs the request threads: ``sts.serving.RequestThreads`` (``_WorkItem.run``: the thread pool
#: of earlier versions, for ``--source`` copies from before it).
_REQUEST_THREADS = frozenset({"RequestThreads._serve", "_WorkItem.run"})
_ROOTS = frozenset({"BaseEventLoop._run_once"}) | _REQUEST_THREADS
#: Innermost frames that wait for work (an idle pool thread, the event loop in epoll): left out of the
#: shares, counted apart.  py-spy does not always see such a thread as idle.
_IDLE = frozenset(
    {
        "_worker",
        "RequestThreads._serve",
        "EpollSelector.select",
        "Condition.wait",
        "Event.wait",
        "Thread.join",
    }
)


def profile_summary(stacks: collections.Counter[str]) -> dict[str, Any]:
    """Shares of the samples: per thread kind, self time per package and per function, inclusive
    time per function (each function counted once per sample), and the same for ``sts`` only."""
    idle = 0
    threads: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    own_function: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    for stack, count in stacks.items():
        frames = [_location(f) for f in stack.split(";") if "(" in f]
        if not frames:
            continue
        if frames[-1][0] in _IDLE:
            idle += count
            continue
        kind = (
            "request threads (the WSGI app)"
            if any(n in _REQUEST_THREADS for n, _ in frames)
            else "event loop"
        )
        threads[kind] += count
        name, path = frames[-1]
        own[_package(path)] += count
        own_function[f"{name} ({path})"] += count
        # Inclusive time from below the loops that run everything (the event loop, the thread pool).
        roots = [i for i, (n, _) in enumerate(frames) if n in _ROOTS]
        below = frames[roots[-1] + 1 :] if roots else frames
        for function in {f"{n} ({p})" for n, p in below}:
            inclusive[function] += count

    total = sum(threads.values())

    def shares(counter: collections.Counter[str], top: int, only: str = "") -> list[tuple[str, float]]:
        chosen = [(k, n) for k, n in counter.most_common() if only in k][:top]
        return [(k, n / max(1, total)) for k, n in chosen]

    return {
        "samples": total,
        "idle_samples": idle,
        "threads": shares(threads, 4),
        "self_by_package": shares(own, 18),
        "self_by_function": shares(own_function, 20),
        "inclusive": shares(inclusive, 25),
        "inclusive_sts": shares(inclusive, 40, only="(sts/"),
    }


def render_profile(summary: dict[str, Any]) -> str:
    sections = (
        ("threads", "By thread:"),
        ("self_by_package", "Self time by package (innermost frame):"),
        ("self_by_function", "Self time by function:"),
        ("inclusive", "Inclusive time by function:"),
        ("inclusive_sts", "Inclusive time, functions of sts:"),
    )
    lines: list[str] = []
    for key, title in sections:
        lines += ["", title]
        lines += [f"  {share:6.1%}  {name}" for name, share in summary[key]]
    return "\n".join(lines)


# -- main ------------------------------------------------------------------------------------------------


def setting_option(value: str) -> tuple[str, Any]:
    name, sep, text = value.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError("NAME=VALUE")
    return name, yaml.safe_load(text)


def source_option(value: str) -> tuple[str, Path]:
    label, sep, directory = value.partition("=")
    path = Path(directory).resolve()
    if not sep or not label or not (path / "sts" / "__init__.py").exists():
        raise argparse.ArgumentTypeError("LABEL=DIR, where DIR/sts is a copy of the package")
    return label, path


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=10, help="per system and round")
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--wrk-threads", type=int, default=1)
    parser.add_argument("--workers", type=int, default=2, help="processes of every server (and of the peer)")
    parser.add_argument(
        "--server-threads", type=int, default=8, help="threads per worker (floor and exchange)"
    )
    parser.add_argument(
        "--active-threads",
        type=int,
        default=1,
        help="of those, how many run Python at once (setting active_threads; a --source twin of code "
        "from before the setting takes only the default)",
    )
    parser.add_argument("--warmup", type=int, default=2, help="seconds of warm-up per system, once")
    parser.add_argument("--pause", type=float, default=1.0, help="seconds between runs")
    parser.add_argument(
        "--systems", type=lambda v: [s for s in v.split(",") if s], default=list(BASE_SYSTEMS),
        help="comma-separated, from " + ",".join(BASE_SYSTEMS + EXTRA_SYSTEMS),
    )  # fmt: skip
    parser.add_argument(
        "--max-rate", type=int, default=3000,
        help="the most requests per second any system is expected to answer: how many tokens each run gets",
    )  # fmt: skip
    parser.add_argument("--policy-rules", type=int, default=0, metavar="N")
    parser.add_argument("--audit-rows", type=int, default=0, metavar="N")
    parser.add_argument("--memory-requests", type=int, default=0, metavar="N")
    parser.add_argument("--memory-system", default="exchange-embedded")
    parser.add_argument("--memory-interval", type=float, default=5.0)
    parser.add_argument("--memory-chunk", type=int, default=20, help="seconds per run (fresh proofs each)")
    parser.add_argument(
        "--profile", type=lambda v: [s for s in v.split(",") if s], default=[], metavar="SYSTEM[,SYSTEM]"
    )
    parser.add_argument("--profile-seconds", type=int, default=10)
    parser.add_argument(
        "--profile-mode",
        choices=("cpu", "gil"),
        default="gil",
        help="gil: the thread holding the GIL (on a busy machine py-spy may see the last holder); "
        "cpu: every thread py-spy does not see as idle (threads waiting for the GIL included)",
    )
    parser.add_argument("--source", type=source_option, action="append", default=[], metavar="LABEL=DIR")
    parser.add_argument(
        "--setting",
        type=setting_option,
        action="append",
        default=[],
        metavar="NAME=YAML",
        help="a setting for every exchange's sts.yaml (e.g. database_pool_size=8)",
    )
    parser.add_argument(
        "--redis-appendfsync",
        default="always",
        choices=("always", "everysec", "no"),
        help="as in production: always",
    )
    parser.add_argument("--postgres", default="postgresql://postgres@127.0.0.1:5432")
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "workload-sts-bench"
    parser.add_argument(
        "--cache-dir", default=str(cache), help="signed subject tokens, the peer's npm install"
    )
    parser.add_argument("--json", type=Path, default=None, help="write every measurement here")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs, profiles)")
    args = parser.parse_args()
    unknown = set(args.systems) - set(BASE_SYSTEMS) - set(EXTRA_SYSTEMS)
    if unknown:
        parser.error(f"unknown systems: {', '.join(sorted(unknown))}")
    if args.memory_requests and args.memory_system not in args.systems and args.memory_system != "floor":
        parser.error("--memory-system must be one of --systems")
    need("wrk", "apt-get install wrk (https://github.com/wg/wrk)", apt="wrk")

    bench = Bench(args)
    try:
        report = bench.run()
    finally:
        bench.stop_all()
        if not args.keep and not args.profile:
            shutil.rmtree(bench.work, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1, default=str))


if __name__ == "__main__":
    main()
