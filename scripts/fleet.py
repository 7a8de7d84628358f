"""The production topology of docker/compose.yaml, from local processes (see ``scripts/fleet``).

    scripts/fleet up [--dir var/fleet] [--workers 1] [--threads 8]   start; wait until ready
    scripts/fleet status [--dir var/fleet]                           processes and health
    scripts/fleet down [--dir var/fleet]                             stop it; drop its database
    scripts/fleet run [...]                                          up, then down on Ctrl-C
    scripts/fleet sts [--dir var/fleet] -- ARGS                      `sts ARGS` with the fleet's config
    scripts/fleet certs DIR [--name HOST ...]                        a CA, server and client certificates

``up`` starts, each in its own process group, with its log in ``DIR/logs/``:

* a private ``redis-server`` with the append-only file on (as in the compose file);
* a private database on the machine's PostgreSQL (``--postgres``, trust auth);
* ``sts dev issuer``, the DEVELOPMENT ONLY upstream issuer (key in ``DIR/dev-issuer``);
* three ``sts serve`` instances on free loopback ports, sharing ``DIR/keys``; the first
  one creates the key ring and the schema, the other two start once it is healthy;
* nginx (Debian package, installed when missing and run as root) on a free port with
  TLS, running ``deploy/nginx.conf`` with only its upstream addresses, listen port,
  certificate directory and access log rewritten.

The configuration is ``deploy/sts.yaml`` with local addresses, the development issuer
and a resource-server client added (``DIR/sts.yaml``); the policies are
``deploy/policies/`` plus ``DIR/policies/fleet-dev.yaml``. Certificates (a CA, the
server's for 127.0.0.1 and localhost, one client certificate) are made at each start in
``DIR/tls``. Everything a client needs is in ``DIR/fleet.json`` (mode 0600: it holds the
resource server's secret).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import ipaddress
import json
import os
import re
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import psycopg
import redis
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from sts.core.client_secrets import hash_secret

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
STS = str(Path(sys.executable).with_name("sts"))
INSTANCES = ("sts1", "sts2", "sts3")
#: The endpoint the compose healthchecks and this script probe: readiness (the audit store
#: commits, the replay store takes a write, the signing key is loaded).
HEALTH_PATH = "/readyz"
#: The resource server registered by the fleet, for introspection and revocation.
RS_CLIENT_ID = "fleet-rs"
RS_AUDIENCE = "https://deploy.example.com"
STATE = "fleet.json"
MARKER = ".fleet-dir"

DEV_POLICY = """\
# DEVELOPMENT ONLY: rules for the development issuer that scripts/fleet starts.
version: 1
rules:
  - name: fleet-deploy-once
    description: A production deploy token is exchanged once, at whichever instance.
    issuer: dev
    subject: "repo:acme/app:environment:production"
    claims: {repository_id: "123456"}
    require_client_authentication: false
    single_use: true
    grant:
      audiences: [https://deploy.example.com]
      scopes: [deploy:write, deploy:read]
      default_scopes: [deploy:read]
      max_lifetime: 300

  - name: fleet-ci-read
    description: Jobs on main may read deploy status, as often as they like.
    issuer: dev
    subject: "repo:acme/app:ref:refs/heads/main"
    claims: {repository_id: "123456"}
    require_client_authentication: false
    grant:
      audiences: [https://deploy.example.com]
      scopes: [deploy:read]
      default_scopes: [deploy:read]
      max_lifetime: 300

  - name: fleet-re-exchange
    description: Our own tokens for acme/app, again (certificate-bound ones over the same certificate).
    issuer: self
    subject_pattern: 'repo:acme/app:(ref:refs/heads/main|environment:production)'
    require_client_authentication: false
    grant:
      audiences: [https://deploy.example.com]
      scopes: [deploy:read]
      default_scopes: [deploy:read]
      max_lifetime: 300
"""


class FleetError(Exception):
    """A step failed; the message says which and where to look."""


# -- certificates --------------------------------------------------------------------------------


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def issue_certificate(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    common_name: str,
    *,
    client: bool,
    names: tuple[str, ...] = (),
    days: int = 30,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """An end-entity certificate: a TLS server's (``names`` as subjectAltName) or a TLS client's."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH]
            ),
            critical=False,
        )
    )
    if names:
        alt: list[x509.GeneralName] = []
        for name in names:
            try:
                alt.append(x509.IPAddress(ipaddress.ip_address(name)))
            except ValueError:
                alt.append(x509.DNSName(name))
        builder = builder.add_extension(x509.SubjectAlternativeName(alt), critical=False)
    return key, builder.sign(ca_key, hashes.SHA256())


def make_certificates(directory: Path, names: tuple[str, ...], *, days: int = 30) -> None:
    """``ca.crt``/``ca.key``, ``server.crt``/``.key`` for ``names``, ``client-ca.crt`` (the same CA)
    and ``client.crt``/``.key``: what deploy/nginx.conf reads from its tls directory."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "workload-sts test CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    _write_private(directory / "ca.key", _key_pem(ca_key))
    (directory / "ca.crt").write_bytes(_cert_pem(ca_cert))
    (directory / "client-ca.crt").write_bytes(_cert_pem(ca_cert))
    server_key, server_cert = issue_certificate(
        ca_key, ca_cert, names[0], client=False, names=names, days=days
    )
    _write_private(directory / "server.key", _key_pem(server_key))
    (directory / "server.crt").write_bytes(_cert_pem(server_cert))
    client_key, client_cert = issue_certificate(ca_key, ca_cert, "fleet-workload", client=True, days=days)
    _write_private(directory / "client.key", _key_pem(client_key))
    (directory / "client.crt").write_bytes(_cert_pem(client_cert))


# -- processes -----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _stat(pid: int) -> tuple[str, int] | None:
    """The process's state letter and start time (clock ticks since boot), or None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    return fields[0], int(fields[19])


def _start_time(pid: int) -> int | None:
    """The start time of a running (not exited) process: with the pid, its identity."""
    stat = _stat(pid)
    return None if stat is None or stat[0] == "Z" else stat[1]


def alive(proc: dict[str, Any]) -> bool:
    """The process recorded in ``proc`` still runs (the same process, not a reused pid)."""
    return proc["start_time"] is not None and _start_time(proc["pid"]) == proc["start_time"]


def spawn(run: Path, name: str, argv: list[str], env: dict[str, str]) -> dict[str, Any]:
    """Start ``argv`` in its own process group (so a stop reaches its workers too)."""
    log_path = run / "logs" / f"{name}.log"
    with log_path.open("ab") as log:
        proc = subprocess.Popen(  # noqa: S603
            argv, cwd=run, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    start = None
    for _ in range(100):
        start = _start_time(proc.pid)
        if start is not None:
            break
        time.sleep(0.01)
    return {"name": name, "pid": proc.pid, "start_time": start, "log": str(log_path), "argv": argv}


def _signal_group(proc: dict[str, Any], signum: int) -> None:
    """Signal the process group ``proc`` leads, unless its pid now names another process.

    Linux does not hand out a pid while a process group of that id exists, so when the
    leader is gone (or a zombie) any remaining member is still one of ours."""
    stat = _stat(proc["pid"])
    if stat is not None and stat[1] != proc["start_time"]:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc["pid"], signum)


def stop(procs: list[dict[str, Any]], *, grace: float = 10.0) -> None:
    """SIGTERM to each process group, together; SIGKILL to what is left after ``grace`` seconds."""
    for proc in procs:
        if alive(proc):
            _signal_group(proc, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while any(alive(p) for p in procs) and time.monotonic() < deadline:
        for proc in procs:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(proc["pid"], os.WNOHANG)  # our own children (scripts/fleet run)
        time.sleep(0.05)
    for proc in procs:
        # Also workers that outlived their leader: they belong to its group.
        _signal_group(proc, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(proc["pid"], os.WNOHANG)


def log_tail(proc: dict[str, Any], lines: int = 15) -> str:
    try:
        text = Path(proc["log"]).read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join("    " + line for line in text[-lines:])


# -- health --------------------------------------------------------------------------------------


def _tls_context(state: dict[str, Any]) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=state["tls"]["ca"])
    return context


def http_status(url: str, context: ssl.SSLContext | None = None, timeout: float = 2.0) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=context) as response:  # noqa: S310
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except (OSError, ValueError):
        return None


def wait_healthy(
    url: str, proc: dict[str, Any], timeout: float, context: ssl.SSLContext | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if http_status(url, context) == 200:
            return
        if not alive(proc):
            raise FleetError(
                f"{proc['name']} exited during start; its log ({proc['log']}):\n{log_tail(proc)}"
            )
        time.sleep(0.2)
    raise FleetError(f"{proc['name']}: {url} not healthy after {timeout:.0f} s; log:\n{log_tail(proc)}")


# -- prerequisites -------------------------------------------------------------------------------


def find_nginx(install: bool) -> str:
    found = shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None
    )
    if found:
        return found
    if install and os.geteuid() == 0 and shutil.which("apt-get"):
        print("fleet: nginx is not installed; installing the Debian package", file=sys.stderr)
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], check=False, env=env)  # noqa: S607
        subprocess.run(["apt-get", "install", "-y", "-qq", "nginx"], check=False, env=env)  # noqa: S607
        return find_nginx(install=False)
    raise FleetError("nginx is not installed: apt-get install -y nginx (the Debian package)")


def _admin_url(postgres: str) -> str:
    return re.sub(r"^postgresql\+psycopg://", "postgresql://", postgres.rstrip("/")) + "/postgres"


def create_database(postgres: str) -> str:
    name = f"sts_fleet_{secrets.token_hex(6)}"
    try:
        with psycopg.connect(_admin_url(postgres), autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
    except psycopg.Error as exc:
        raise FleetError(f"PostgreSQL at {postgres}: cannot create a database ({exc})") from None
    return name


def drop_database(postgres: str, name: str) -> None:
    if not re.fullmatch(r"sts_fleet_[0-9a-f]{12}", name):
        raise FleetError(f"refusing to drop {name!r}: not a fleet database")
    with psycopg.connect(_admin_url(postgres), autocommit=True, connect_timeout=5) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# -- state ---------------------------------------------------------------------------------------


def load_state(run: Path) -> dict[str, Any] | None:
    path = run / STATE
    if not path.exists():
        return None
    loaded: dict[str, Any] = json.loads(path.read_text())
    return loaded


def save_state(run: Path, state: dict[str, Any]) -> None:
    tmp = run / (STATE + ".tmp")
    _write_private(tmp, json.dumps(state, indent=2).encode())
    os.replace(tmp, run / STATE)


def processes(state: dict[str, Any]) -> list[dict[str, Any]]:
    """Every process of the fleet, the proxy first (the order to stop them in)."""
    found = [state.get("nginx"), *state.get("instances", []), state.get("dev_issuer"), state.get("redis")]
    return [p for p in found if p]


# -- configuration -------------------------------------------------------------------------------


def nginx_site(ports: dict[str, int], listen: int, tls: Path, access_log: Path) -> str:
    """deploy/nginx.conf with local addresses: each rewrite must match, so the file cannot drift."""
    text = (DEPLOY / "nginx.conf").read_text()
    rewrites = [
        *((rf"server {name}:8080\b", f"server 127.0.0.1:{port}") for name, port in ports.items()),
        (r"listen 8443 ssl;", f"listen 127.0.0.1:{listen} ssl;"),
        (r"/etc/nginx/tls/", f"{tls}/"),
        (r"access_log /dev/stdout sts;", f"access_log {access_log} sts;"),
    ]
    for pattern, replacement in rewrites:
        text, count = re.subn(pattern, replacement, text)
        if count == 0:
            raise FleetError(f"deploy/nginx.conf: expected {pattern!r}; update scripts/fleet.py with it")
    return text


def nginx_main(run: Path) -> str:
    tmp = run / "nginx" / "tmp"
    return f"""\
# Written by scripts/fleet: the main context the nginx image provides in docker/compose.yaml.
worker_processes 2;
pid {run}/nginx/nginx.pid;
error_log {run}/logs/nginx-error.log warn;
daemon off;
events {{ worker_connections 1024; }}
http {{
    default_type application/octet-stream;
    server_tokens off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    access_log off;
    # Bodies (at most 64 KiB, held in memory) and responses never go to temporary files, which the
    # workers (nobody, when started as root) might not be allowed to write in the run directory.
    proxy_max_temp_file_size 0;
    include {run}/nginx/sts.conf;
}}
"""


def sts_config(
    run: Path, *, issuer: str, database_url: str, redis_url: str, dev_issuer: str, secret: str
) -> str:
    config: dict[str, Any] = yaml.safe_load((DEPLOY / "sts.yaml").read_text())
    config.update(
        issuer=issuer,
        host="127.0.0.1",
        database_url=database_url,
        redis_url=redis_url,
        keys_dir=str(run / "keys"),
        policies_dir=str(run / "policies"),
        trusted_proxies=["127.0.0.1/32"],
    )
    config["issuers"] = [
        *config.get("issuers", []),
        {
            "name": "dev",
            "issuer": dev_issuer,
            "jwks_uri": f"{dev_issuer}/.well-known/jwks",
            "algorithms": ["RS256"],
            "audiences": [issuer],
            "max_token_age": 3600,
        },
    ]
    config["clients"] = [
        *config.get("clients", []),
        {
            "client_id": RS_CLIENT_ID,
            "auth_method": "client_secret_basic",
            "secret_hash": hash_secret(secret),
            "audiences": [RS_AUDIENCE],
        },
    ]
    header = "# Written by scripts/fleet from deploy/sts.yaml: local addresses, the dev issuer, a client.\n"
    return header + yaml.safe_dump(config, sort_keys=False)


def child_env() -> dict[str, str]:
    """The caller's environment without STS_* settings: the fleet's file says everything."""
    return {k: v for k, v in os.environ.items() if not k.startswith("STS_")}


# -- commands ------------------------------------------------------------------------------------


def prepare_directory(run: Path) -> None:
    state = load_state(run) if run.exists() else None
    if state is not None:
        running = [p["name"] for p in processes(state) if alive(p)]
        if running:
            raise FleetError(f"a fleet is up in {run} ({', '.join(running)}): scripts/fleet down first")
        down(run)
    if run.exists() and any(run.iterdir()):
        if not (run / MARKER).exists():
            raise FleetError(f"{run} is not empty and not a fleet directory; choose another --dir")
        shutil.rmtree(run)
    for sub in ("logs", "nginx/tmp", "policies", "redis"):
        (run / sub).mkdir(parents=True, exist_ok=True)
    (run / MARKER).write_text("scripts/fleet run directory: removed by the next `scripts/fleet up`\n")


def up(run: Path, args: argparse.Namespace) -> dict[str, Any]:
    nginx = find_nginx(install=True)
    if shutil.which("redis-server") is None:
        raise FleetError("redis-server is not installed: apt-get install -y redis-server")
    prepare_directory(run)
    env = child_env()
    state: dict[str, Any] = {"dir": str(run), "health_path": HEALTH_PATH, "postgres": args.postgres}
    save_state(run, state)
    try:
        _up(run, args, nginx, env, state)
    except BaseException:
        down(run)
        raise
    return state


def _up(run: Path, args: argparse.Namespace, nginx: str, env: dict[str, str], state: dict[str, Any]) -> None:
    tls = run / "tls"
    make_certificates(tls, ("127.0.0.1", "localhost"), days=2)
    state["tls"] = {
        "ca": str(tls / "ca.crt"), "ca_key": str(tls / "ca.key"),
        "client_cert": str(tls / "client.crt"), "client_key": str(tls / "client.key"),
    }  # fmt: skip
    proxy_port = free_port()
    issuer = f"https://127.0.0.1:{proxy_port}"
    state["issuer"] = issuer

    redis_port = free_port()
    state["redis"] = spawn(run, "redis", [
        "redis-server", "--bind", "127.0.0.1", "--port", str(redis_port), "--dir", str(run / "redis"),
        "--appendonly", "yes", "--appendfsync", "always", "--maxmemory-policy", "noeviction",
        "--save", "", "--daemonize", "no",
    ], env)  # fmt: skip
    state["redis"]["url"] = f"redis://127.0.0.1:{redis_port}/0"
    save_state(run, state)
    _wait_redis(state["redis"], args.timeout)

    database = create_database(args.postgres)
    database_url = f"{args.postgres.rstrip('/')}/{database}"
    state["database"] = {"name": database, "url": database_url}
    save_state(run, state)

    dev_port = free_port()
    dev_url = f"http://127.0.0.1:{dev_port}"
    state["dev_issuer"] = spawn(
        run, "dev-issuer",
        [STS, "dev", "issuer", "--port", str(dev_port), "--key-dir", str(run / "dev-issuer")], env,
    )  # fmt: skip
    state["dev_issuer"]["url"] = dev_url
    save_state(run, state)

    secret = secrets.token_urlsafe(32)
    state["client"] = {"client_id": RS_CLIENT_ID, "client_secret": secret, "audience": RS_AUDIENCE}
    for policy in sorted(DEPLOY.glob("policies/*.yaml")):
        shutil.copy(policy, run / "policies" / policy.name)
    (run / "policies" / "fleet-dev.yaml").write_text(DEV_POLICY)
    config = run / "sts.yaml"
    config.write_text(
        sts_config(run, issuer=issuer, database_url=database_url, redis_url=state["redis"]["url"],
                   dev_issuer=dev_url, secret=secret)
    )  # fmt: skip
    state["config"] = str(config)
    wait_healthy(f"{dev_url}/.well-known/jwks", state["dev_issuer"], args.timeout)

    ports = {name: free_port() for name in INSTANCES}
    state["instances"] = []

    def start_instance(name: str) -> dict[str, Any]:
        argv = [STS, "--config", str(config), "serve", "--host", "127.0.0.1", "--port", str(ports[name]),
                "--workers", str(args.workers), "--threads", str(args.threads)]  # fmt: skip
        proc = spawn(run, name, argv, env)
        proc["url"] = f"http://127.0.0.1:{ports[name]}"
        state["instances"].append(proc)
        save_state(run, state)
        return proc

    # The first instance creates the key ring and the schema; then the others start together.
    first = start_instance(INSTANCES[0])
    wait_healthy(first["url"] + HEALTH_PATH, first, args.timeout)
    for proc in [start_instance(name) for name in INSTANCES[1:]]:
        wait_healthy(proc["url"] + HEALTH_PATH, proc, args.timeout)

    (run / "nginx" / "sts.conf").write_text(
        nginx_site(ports, proxy_port, tls, run / "logs" / "nginx-access.log")
    )
    (run / "nginx" / "nginx.conf").write_text(nginx_main(run))
    nginx_argv = [nginx, "-p", str(run / "nginx"), "-c", str(run / "nginx" / "nginx.conf"), "-e", "stderr"]
    check = subprocess.run([*nginx_argv, "-t", "-q"], capture_output=True, text=True, check=False)  # noqa: S603
    if check.returncode != 0:
        raise FleetError(f"nginx refused the configuration:\n{check.stderr}")
    state["nginx"] = spawn(run, "nginx", nginx_argv, env)
    state["nginx"].update(url=issuer, port=proxy_port, access_log=str(run / "logs" / "nginx-access.log"))
    save_state(run, state)
    wait_healthy(issuer + HEALTH_PATH, state["nginx"], args.timeout, _tls_context(state))
    state["ready"] = True
    save_state(run, state)


def _wait_redis(proc: dict[str, Any], timeout: float) -> None:
    client = redis.Redis.from_url(proc["url"], socket_timeout=1)
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                client.ping()
                return
            except redis.RedisError:
                if not alive(proc) or time.monotonic() > deadline:
                    raise FleetError(f"redis-server did not start; log:\n{log_tail(proc)}") from None
                time.sleep(0.05)
    finally:
        client.close()


def down(run: Path) -> bool:
    """Stop every process of the fleet in ``run`` and drop its database; True if there was one."""
    state = load_state(run)
    if state is None:
        return False
    # The proxy first (no new requests), then the instances and the issuer, then Redis.
    stop([state["nginx"]] if state.get("nginx") else [])
    stop([*state.get("instances", []), *([state["dev_issuer"]] if state.get("dev_issuer") else [])])
    stop([state["redis"]] if state.get("redis") else [])
    if state.get("database"):
        with contextlib.suppress(psycopg.Error):
            drop_database(state["postgres"], state["database"]["name"])
    (run / STATE).unlink(missing_ok=True)
    return True


def status(run: Path) -> bool:
    state = load_state(run)
    if state is None:
        print(f"no fleet in {run}")
        return False
    ok = True
    context = _tls_context(state) if "tls" in state else None
    for proc in processes(state):
        running = alive(proc)
        health = ""
        if running and proc["name"] in INSTANCES:
            health = f"{HEALTH_PATH} {http_status(proc['url'] + HEALTH_PATH)}"
        elif running and proc["name"] == "nginx":
            health = f"{HEALTH_PATH} {http_status(proc['url'] + HEALTH_PATH, context)}"
        ok = ok and running and (not health or health.endswith(" 200"))
        print(f"{proc['name']:<11} pid {proc['pid']:<8} {'running' if running else 'STOPPED':<8} {health}")
    print(f"issuer      {state.get('issuer', '-')}   ({'ready' if state.get('ready') else 'not ready'})")
    return ok and bool(state.get("ready"))


def summary(state: dict[str, Any]) -> str:
    tls, dev = state["tls"], state["dev_issuer"]["url"]
    instances = ", ".join(f"{p['name']} {p['url']}" for p in state["instances"])
    return f"""\
fleet up in {state["dir"]} (state: {state["dir"]}/{STATE})
  issuer (nginx, TLS)  {state["issuer"]}
  instances            {instances}
  redis (AOF)          {state["redis"]["url"]}
  postgresql           {state["database"]["url"]}
  dev issuer           {dev}   DEVELOPMENT ONLY
  CA / client cert     {tls["ca"]} / {tls["client_cert"]}
try:
  token=$(.venv/bin/sts dev token github-actions --key-dir {state["dir"]}/dev-issuer \\
            --issuer-url {dev} --audience {state["issuer"]})
  curl --cacert {tls["ca"]} --cert {tls["client_cert"]} --key {tls["client_key"]} \\
    {state["issuer"]}/token -d subject_token=$token \\
    -d grant_type=urn:ietf:params:oauth:grant-type:token-exchange \\
    -d subject_token_type=urn:ietf:params:oauth:token-type:jwt -d audience={RS_AUDIENCE}
  scripts/fleet sts -- keys rotate --force      # through the shared key directory
  scripts/fleet down
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/fleet", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name in ("up", "run", "down", "status", "sts"):
        command = commands.add_parser(name)
        command.add_argument("--dir", type=Path, default=REPO / "var" / "fleet", help="run directory")
        if name in ("up", "run"):
            command.add_argument("--workers", type=int, default=1, help="per instance (sts serve --workers)")
            command.add_argument("--threads", type=int, default=8, help="per worker (sts serve --threads)")
            command.add_argument(
                "--postgres", default="postgresql+psycopg://postgres@127.0.0.1:5432",
                help="PostgreSQL server (a database sts_fleet_<random> is created there and dropped by down)",
            )  # fmt: skip
            command.add_argument("--timeout", type=float, default=60.0, help="seconds for each start")
        if name == "sts":
            command.add_argument("args", nargs=argparse.REMAINDER, help="arguments of the sts command")
    certs = commands.add_parser("certs", help="a CA, a server certificate and a client certificate")
    certs.add_argument("directory", type=Path)
    certs.add_argument("--name", action="append", help="server host name or IP (repeatable)")
    certs.add_argument("--days", type=int, default=90)
    args = parser.parse_args(argv)

    try:
        if args.command == "certs":
            make_certificates(args.directory, tuple(args.name or ["localhost", "127.0.0.1"]), days=args.days)
            print(f"certificates in {args.directory}: ca, server, client-ca and client")
            return 0
        run = args.dir.resolve()
        if args.command == "up":
            print(summary(up(run, args)))
            return 0
        if args.command == "run":
            state = up(run, args)
            print(summary(state) + "running in the foreground; Ctrl-C stops it")
            try:
                while all(alive(p) for p in processes(state)):
                    time.sleep(1)
                print("fleet: a process stopped; stopping the fleet", file=sys.stderr)
                return 1
            except KeyboardInterrupt:
                return 0
            finally:
                down(run)
        if args.command == "down":
            print("fleet stopped" if down(run) else f"no fleet in {run}")
            return 0
        if args.command == "status":
            return 0 if status(run) else 1
        current = load_state(run)
        if current is None or "config" not in current:
            raise FleetError(f"no fleet in {run}")
        sts_args = args.args[1:] if args.args[:1] == ["--"] else args.args
        return subprocess.run(  # noqa: S603
            [STS, "--config", current["config"], *sts_args], cwd=run, check=False
        ).returncode
    except FleetError as exc:
        print(f"fleet: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    # `kill` stops a foreground fleet as Ctrl-C does: everything it started is stopped.
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)  # also when started in the background, where it is ignored
    sys.exit(main())
