"""Benchmark: CPU time per full token exchange, in process, comparing copies of the code.

    .venv/bin/python benchmarks/exchange_cpu.py [--source LABEL=DIR ...] [--rounds 5]
        [--requests 1500] [--warmup 200] [--no-floor] [--profile LABEL] [--top 25]
        [--store embedded|redis|pg] [--postgres postgresql://postgres@127.0.0.1:5432] [--threads 1]
        [--in-flight 0] [--processes 1]

The request is the one ``benchmarks/bench.py`` sends: a distinct GitHub-Actions-shaped RS256
subject token and a fresh ES256 DPoP proof per request, granted a DPoP-bound ES256 ``at+jwt``
by the 10-rule benchmark policy (``single_use``, ``require_dpop``, a ``risk`` section), with the
audit record committed to SQLite before the answer.  Each request goes through the same path
``sts serve`` gives it after granian has read it: :class:`sts.serving.WSGIOverRSGI` builds the
WSGI environ and calls the Flask application, here on the calling thread.

Each system runs in a process of its own (a fresh database, so the tokens can be sent again),
and the systems take turns, ``--rounds`` times: ``floor`` (``benchmarks/bare_app.py`` served the
same way, unless ``--no-floor``), then each ``--source`` (the ``sts`` package of ``DIR``; without
``--source``, this checkout).  Per run: the process's CPU time (``time.process_time``) per
request over ``--requests`` requests after ``--warmup``.  CPU time, unlike requests per second
under ``wrk``, hardly moves when other work shares the machine.  The table gives the median per
system, and the median over rounds of each system's ratio to the first source and to the floor.

``--store`` picks the exchange's store: ``embedded`` (SQLite, the default), ``redis`` (a private
``redis-server`` started for each run, append-only file synced on every write, the audit trail on
SQLite) or ``pg`` (a private PostgreSQL database on ``--postgres`` created for each run and dropped
after it).  The CPU column counts this process only, not the store's server.

``--threads N`` sends the requests from N threads at once, as a worker's request threads do
(what the GIL hand-offs and the store's group commit cost).  ``--in-flight N`` sends them from a
uvloop event loop through the measured copy's own RSGI adapter (``sts.serving``'s ``__rsgi__``: the
body read, the request threads, the answer, as a worker of ``sts serve`` runs them), N at once:
what the adapter and the threads' hand-overs cost, turns included.

``--processes N`` runs each system as N processes at once, as a server's N workers, on one database
(each sends its own share of the tokens, with the same DPoP key); they start measuring together,
after each has warmed up.  The CPU column is then the mean per process: what the workers' sharing
of the SQLite file costs (a commit by one process empties the other's page cache).  The machine's
other load moves these figures far more than those of one process: run more rounds.

``--profile LABEL`` runs one more process of that system under ``cProfile`` and prints the
functions with the most time of their own and the most time in total.  cProfile's clock is the
wall clock: a store's round trips show as time, and its per-call overhead inflates code that makes
many small calls (count instructions, e.g. with valgrind, to compare small costs).

``--stages LABEL`` runs one more process of that system with each stage of the exchange timed
(``benchmarks/stage_times.py``: about thirty functions, from serving to the commit's statement)
and prints the wall time inside each per request, one request at a time unless ``--in-flight``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import pstats
import resource
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

FORM_TYPE = "application/x-www-form-urlencoded"


# -- the worker: one system, in this process ------------------------------------------------------


class _Scope:
    """What granian hands the RSGI application for ``POST /token`` (the attributes it reads)."""

    proto = "http"
    method = "POST"
    path = "/token"
    query_string = ""
    server = "127.0.0.1:8080"
    client = "127.0.0.1:50000"
    scheme = "http"
    http_version = "1.1"

    def __init__(self, headers: dict[str, str]) -> None:
        self.headers = _Headers(headers)


class _Headers(dict[str, str]):
    """granian's header map, as the adapter reads it (one value per name here)."""

    def get_all(self, name: str) -> list[str]:
        return [self[name]] if name in self else []


class _Proto:
    """What granian hands the RSGI application to read the body and answer on (``--in-flight``)."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.answer: tuple[int, list[tuple[str, str]], bytes] = (0, [], b"")

    async def __call__(self) -> bytes:
        return self.body

    def response_bytes(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        self.answer = (status, headers, body)

    async def client_disconnect(self) -> None:
        await asyncio.Event().wait()  # the client stays


def _exchange_app(work: Path, home: Path, store: dict[str, str]) -> Any:
    import bench
    import yaml

    from sts.app import create_app

    try:
        from sts.settings.load import load_settings
    except ImportError:  # a copy of sts/ from before settings became a package
        from sts.settings import load_settings  # type: ignore[attr-defined,no-redef]

    (home / "policies").mkdir(parents=True, exist_ok=True)
    (home / "policies" / "bench.yaml").write_text(yaml.safe_dump({"version": 1, "rules": bench.rule_set(10)}))
    config = {
        "issuer": bench.STS_ISSUER,
        "database_url": f"sqlite:///{home / 'sts.sqlite'}",
        "keys_dir": str(home / "keys"),
        "policies_dir": str(home / "policies"),
        "log_level": "WARNING",
        "rate_limits": {"enabled": False},
        "issuers": [bench.github_issuer(work / "jwks.json")],
        **store,
    }
    return create_app(load_settings(config_file=None, environ={}, overrides=config))


def _floor_app(work: Path) -> Any:
    import bench

    os.environ.update(
        BARE_JWKS=(work / "jwks.json").read_text(),
        BARE_ISSUER=bench.GITHUB_ISS,
        BARE_AUDIENCE=bench.SUBJECT_AUDIENCE,
        BARE_HTU=bench.HTU,
        BARE_NULL="",
    )
    import bare_app

    return bare_app.app


def worker(args: argparse.Namespace) -> None:
    import importlib
    import logging

    # The package from PYTHONPATH, imported before bench.py puts this checkout first on sys.path
    # (a call, which import sorting leaves where it is).
    sts = importlib.import_module("sts")
    import bench
    from joserfc.jwk import ECKey

    from sts.serving import Limits, WSGIOverRSGI

    logging.disable(logging.WARNING)
    work = Path(args.work)
    with contextlib.ExitStack() as stack:
        home = args.home or stack.enter_context(tempfile.TemporaryDirectory(prefix="sts-cpu-"))
        store = json.loads(args.store_settings)
        # Before the application is built: it keeps bound methods of the stages.
        stage_times = None
        if args.time_stages:
            from stage_times import StageTimes

            stage_times = StageTimes()
        app = _floor_app(work) if args.floor else _exchange_app(work, Path(home), store)
        served = WSGIOverRSGI(app, Limits())
        per_process = args.warmup + args.requests
        tokens = (work / "tokens.txt").read_text().split()
        tokens = tokens[args.process * per_process : (args.process + 1) * per_process]
        # One workload's key for every process of a run (a new key would be drift to the risk checks).
        key_file = work / "dpop-key.json"
        key = ECKey.import_key(json.loads(key_file.read_text())) if key_file.exists() else None
        proofs = bench.Proofs(key).make(len(tokens))
        requests = []
        for token, proof in zip(tokens, proofs, strict=True):
            body = urlencode(
                {
                    "grant_type": "urn:ietf:params:oauth:grant-type:token-exchange",
                    "subject_token_type": "urn:ietf:params:oauth:token-type:jwt",
                    "audience": bench.AUDIENCE,
                    "scope": bench.SCOPE,
                    "subject_token": token,
                }
            ).encode()
            headers = {
                "host": "127.0.0.1:8080",
                "content-type": FORM_TYPE,
                "content-length": str(len(body)),
                "dpop": proof,
            }
            requests.append((_Scope(headers), body))

        def direct(batch: list[tuple[_Scope, bytes]]) -> int:
            failed = 0
            for scope, body in batch:
                status, _, payload = served._call(scope, body)
                if status != 200:
                    failed += 1
                    if failed == 1:
                        print(f"refused: {status} {payload[:300]!r}", file=sys.stderr)
            return failed

        run = _served_runner(served, args.in_flight) if args.in_flight else direct
        # As a worker of ``sts serve`` does once the application is built (sts.serving.WorkerApp).
        gc.collect()
        gc.freeze()
        run(requests[: args.warmup])
        measured = requests[args.warmup :]
        if args.go:
            # The other processes of the run are set up and warmed up too: all start at once.
            Path(f"{args.go}.ready{args.process}").touch()
            while not Path(args.go).exists():
                time.sleep(0.005)
        if stage_times is not None:
            stage_times.reset()
        profiler = None
        if args.profile_out:
            import cProfile

            profiler = cProfile.Profile()
            profiler.enable()
        switches, collections = _switches(), sum(g["collections"] for g in gc.get_stats())
        wall, cpu = time.perf_counter(), time.process_time()
        if args.threads > 1 and not args.in_flight:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(args.threads) as pool:
                failed = sum(pool.map(run, [measured[i :: args.threads] for i in range(args.threads)]))
        else:
            failed = run(measured)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        switches = _switches() - switches
        collections = sum(g["collections"] for g in gc.get_stats()) - collections
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(args.profile_out)
    result = {
        "cpu_us": cpu / len(measured) * 1e6,
        "wall_us": wall / len(measured) * 1e6,
        "failed": failed,
        "switches": switches / len(measured),
        "collections": collections / len(measured),
        "package": str(Path(str(sts.__file__)).parent),
        "stages": stage_times.per_request(len(measured)) if stage_times is not None else None,
    }
    print(json.dumps(result))


def _switches() -> int:
    """Context switches of this process so far, voluntary and not (every thread's)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_nvcsw + usage.ru_nivcsw


def _served_runner(served: Any, in_flight: int) -> Callable[[list[tuple[_Scope, bytes]]], int]:
    """Send a batch as ``sts serve``'s worker does, from a uvloop event loop through the request
    threads of the copy measured (``WSGIOverRSGI.__rsgi_init__``), ``in_flight`` requests at once."""
    import asyncio

    import uvloop

    async def drive(batch: list[tuple[_Scope, bytes]]) -> int:
        loop = asyncio.get_running_loop()
        served.__rsgi_init__(loop)
        slots = asyncio.Semaphore(in_flight)

        async def one(scope: _Scope, body: bytes) -> int:
            async with slots:
                # The whole of the adapter's request: the body read, the thread, the answer.
                proto = _Proto(body)
                await served.__rsgi__(scope, proto)
                status, _, payload = proto.answer
            if status != 200:
                print(f"refused: {status} {payload[:300]!r}", file=sys.stderr)
                return 1
            return 0

        try:
            return sum(await asyncio.gather(*(one(scope, body) for scope, body in batch)))
        finally:
            served.__rsgi_del__(loop)

    def run(batch: list[tuple[_Scope, bytes]]) -> int:
        return uvloop.run(drive(batch))

    return run


# -- the runner -----------------------------------------------------------------------------------


def source_option(value: str) -> tuple[str, Path]:
    label, sep, directory = value.partition("=")
    if not sep or not label or not (Path(directory) / "sts").is_dir():
        raise argparse.ArgumentTypeError(f"{value!r}: expected LABEL=DIR with DIR/sts a package")
    return label, Path(directory).resolve()


@contextlib.contextmanager
def private_store(args: argparse.Namespace, work: Path) -> Iterator[dict[str, str]]:
    """The exchange's store settings for one run, on a store no other run has written to."""
    if args.store == "embedded":
        yield {}
        return
    if args.store == "redis":
        import bench

        port, home = bench.free_port(), Path(tempfile.mkdtemp(prefix="redis-", dir=work))
        proc = subprocess.Popen(
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(home), "--save", "",
             "--appendonly", "yes", "--appendfsync", "always", "--maxmemory-policy", "noeviction"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            for _ in range(100):
                with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                    break
                time.sleep(0.05)
            yield {"store": "redis", "redis_url": f"redis://127.0.0.1:{port}/0"}
        finally:
            proc.terminate()
            proc.wait(10)
        return
    import psycopg

    name = f"sts_cpu_{os.getpid()}_{secrets.token_hex(3)}"
    with psycopg.connect(f"{args.postgres}/postgres", autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        url = args.postgres.replace("postgresql://", "postgresql+psycopg://", 1) + "/" + name
        yield {"store": "embedded", "database_url": url}
    finally:
        with psycopg.connect(f"{args.postgres}/postgres", autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def run_system(
    work: Path,
    source: Path | None,
    args: argparse.Namespace,
    profile_out: Path | None = None,
    *,
    time_stages: bool = False,
) -> dict[str, Any]:
    if source is None:
        return _run_system(work, source, args, profile_out, {}, time_stages)
    with private_store(args, work) as store:
        return _run_system(work, source, args, profile_out, store, time_stages)


def _run_system(
    work: Path,
    source: Path | None,
    args: argparse.Namespace,
    profile_out: Path | None,
    store: dict[str, str],
    time_stages: bool,
) -> dict[str, Any]:
    if args.processes > 1 and not time_stages:
        return _run_processes(work, source, args, store)
    command = _worker_command(work, args, store)
    if source is None:
        command.append("--floor")
    if profile_out is not None:
        command += ["--profile-out", str(profile_out)]
    if time_stages:
        command.append("--time-stages")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STS_", "BARE_"))}
    # The floor runs on this checkout's sts.serving; each source on its own copy of the package.
    env["PYTHONPATH"] = os.pathsep.join([str(source or REPO), str(HERE)])
    out = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"worker failed ({source or 'floor'}):\n{out.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    if source is not None and Path(result["package"]) != source / "sts":
        raise SystemExit(f"{source}: the worker imported the sts package of {result['package']}")
    if result["failed"]:
        raise SystemExit(f"{source or 'floor'}: {result['failed']} requests refused\n{out.stderr[-2000:]}")
    return result


def _worker_command(work: Path, args: argparse.Namespace, store: dict[str, str]) -> list[str]:
    return [
        sys.executable, str(Path(__file__).resolve()), "--worker", "--work", str(work),
        "--requests", str(args.requests), "--warmup", str(args.warmup), "--threads", str(args.threads),
        "--in-flight", str(args.in_flight), "--store-settings", json.dumps(store),
    ]  # fmt: skip


def _run_processes(
    work: Path, source: Path | None, args: argparse.Namespace, store: dict[str, str]
) -> dict[str, Any]:
    """``--processes N``: N processes of one system at once, as the workers of one server, on one
    database (each its own share of the tokens); they start measuring together.  The result is the
    mean of their CPU per request, and the wall time per request of all of them together."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STS_", "BARE_"))}
    env["PYTHONPATH"] = os.pathsep.join([str(source or REPO), str(HERE)])
    with (
        tempfile.TemporaryDirectory(prefix="sts-cpu-home-", dir=work) as home,
        contextlib.ExitStack() as stack,
    ):
        go = Path(home) / "go"
        base = [*_worker_command(work, args, store), "--home", home, "--go", str(go)]
        if source is None:
            base.append("--floor")
        procs: list[subprocess.Popen[str]] = []
        errors: list[Any] = []

        def waiting_for(ready: int) -> bool:
            """Whether processes up to ``ready`` are still setting up (False once one has exited)."""
            done = all((Path(home) / f"go.ready{n}").exists() for n in range(ready + 1))
            return not done and all(proc.poll() is None for proc in procs)

        for n in range(args.processes):
            err = stack.enter_context((Path(home) / f"stderr{n}").open("w+"))
            command = [*base, "--process", str(n)]
            procs.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=err, text=True))
            errors.append(err)
            if n == 0:
                # The first one creates the keys and the schema before the others start.
                while waiting_for(0):
                    time.sleep(0.01)
        while waiting_for(args.processes - 1):
            time.sleep(0.01)
        go.touch()
        results = []
        for proc, err_file in zip(procs, errors, strict=True):
            out, _ = proc.communicate()
            err_file.seek(0)
            err = err_file.read()
            if proc.returncode != 0:
                raise SystemExit(f"worker failed ({source or 'floor'}):\n{err[-3000:]}")
            result = json.loads(out.strip().splitlines()[-1])
            if result["failed"]:
                raise SystemExit(f"{source or 'floor'}: {result['failed']} requests refused\n{err[-2000:]}")
            results.append(result)
    return {
        "cpu_us": statistics.mean(r["cpu_us"] for r in results),
        "wall_us": max(r["wall_us"] for r in results) / args.processes,
        "switches": statistics.mean(r["switches"] for r in results),
        "collections": statistics.mean(r["collections"] for r in results),
        "failed": 0,
        "package": results[0]["package"],
    }


def print_profile(path: Path, top: int) -> None:
    stats = pstats.Stats(str(path))
    total = max(stats.total_tt, 1e-9)  # type: ignore[attr-defined]
    entries = stats.stats  # type: ignore[attr-defined]

    def name(func: tuple[str, int, str]) -> str:
        filename, line, function = func
        for marker in ("site-packages/", "/sts/", "/benchmarks/", "/lib/python3"):
            if marker in filename:
                filename = filename.split(marker, 1)[1]
                break
        return f"{filename}:{line} {function}"

    for title, column in (("own time", 2), ("inclusive time", 3)):
        print(f"\ntop {top} by {title} (share of the profiled wall time, waits included):")
        ranked = sorted(entries.items(), key=lambda item: item[1][column], reverse=True)[:top]
        for func, row in ranked:
            print(f"  {row[column] / total * 100:5.1f}%  {row[1]:7d} calls  {name(func)}")


def print_table(runs: dict[str, list[float]], systems: list[tuple[str, Path | None]], first: str) -> None:
    print(f"\n{'system':12} {'CPU µs/request':>15} {'x ' + first:>10} {'floor / system':>15}")
    for label, _ in systems:
        cpu = statistics.median(runs[label])
        versus_first = statistics.median(a / b for a, b in zip(runs[label], runs[first], strict=True))
        floor = (
            f"{statistics.median(f / a for f, a in zip(runs['floor'], runs[label], strict=True)):15.2f}"
            if "floor" in runs
            else f"{'-':>15}"
        )
        print(f"{label:12} {cpu:15.0f} {versus_first:10.2f} {floor}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--source", type=source_option, action="append", default=[], metavar="LABEL=DIR")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=1500)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--no-floor", action="store_true")
    parser.add_argument("--profile", action="append", default=[], metavar="LABEL")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--keep-profile", default=None, metavar="FILE", help="write the cProfile stats here")
    parser.add_argument("--threads", type=int, default=1, help="request threads sending the requests")
    parser.add_argument(
        "--in-flight",
        type=int,
        default=0,
        help="send the requests from an event loop through the measured copy's request threads "
        "(sts.serving, as a worker of sts serve does), this many at once (0: call the app directly)",
    )
    parser.add_argument("--store", choices=("embedded", "redis", "pg"), default="embedded")
    parser.add_argument("--postgres", default="postgresql://postgres@127.0.0.1:5432")
    parser.add_argument(
        "--processes",
        type=int,
        default=1,
        help="run each system as this many processes at once on one database, as a server's "
        "workers (what their sharing of the SQLite file costs); CPU is the mean per process",
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--home", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--go", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--process", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--store-settings", default="{}", help=argparse.SUPPRESS)
    parser.add_argument("--floor", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--profile-out", help=argparse.SUPPRESS)
    parser.add_argument("--stages", action="append", default=[], metavar="LABEL")
    parser.add_argument("--time-stages", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    sys.path.insert(0, str(REPO))
    from joserfc.jwk import ECKey

    from sts.dev.issuer import DevIssuer

    sys.path.insert(0, str(HERE))
    import bench

    sources: list[tuple[str, Path]] = args.source or [("this", REPO)]
    systems: list[tuple[str, Path | None]] = ([] if args.no_floor else [("floor", None)]) + list(sources)
    with tempfile.TemporaryDirectory(prefix="sts-cpu-bench-") as tmp:
        work = Path(tmp)
        issuer = DevIssuer.ephemeral(bench.GITHUB_ISS, alg="RS256")
        (work / "jwks.json").write_text(json.dumps(issuer.jwks()))
        count = (args.warmup + args.requests) * args.processes
        print(f"signing {count} RS256 subject tokens ...", flush=True)
        tokens = [
            issuer.github_actions_token(audience=bench.SUBJECT_AUDIENCE, lifetime=bench.TOKEN_LIFETIME)
            for _ in range(count)
        ]
        (work / "tokens.txt").write_text("\n".join(tokens))
        (work / "dpop-key.json").write_text(json.dumps(ECKey.generate_key("P-256").as_dict(private=True)))
        runs: dict[str, list[float]] = {label: [] for label, _ in systems}
        for round_number in range(1, args.rounds + 1):
            for label, source in systems:
                result = run_system(work, source, args)
                runs[label].append(result["cpu_us"])
                print(
                    f"round {round_number} {label:12} {result['cpu_us']:7.0f} µs CPU per request "
                    f"({result['wall_us']:.0f} µs wall, {result['switches']:.1f} context switches, "
                    f"{result['collections']:.2f} collections)",
                    flush=True,
                )
        if args.rounds:
            print_table(runs, systems, sources[0][0])
        for label in args.profile:
            source = dict(systems).get(label)
            out = Path(args.keep_profile) if args.keep_profile else work / f"{label}.prof"
            run_system(work, source, args, profile_out=out)
            print(f"\ncProfile of {label} ({args.requests} requests):")
            print_profile(out, args.top)
        from stage_times import print_stages

        for label in args.stages:
            result = run_system(work, dict(systems).get(label), args, time_stages=True)
            print_stages(label, result["stages"])


if __name__ == "__main__":
    main()
