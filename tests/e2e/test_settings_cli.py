"""Settings (file, STS_* environment, validation) and the ``sts`` command.

CLI commands run through click's ``CliRunner`` against a configuration file in
a temporary directory, with a real development issuer over HTTP for
``policy explain --token`` and a real exchange before ``audit tail``.
"""

from __future__ import annotations

import base64
import json
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from click.testing import CliRunner, Result
from joserfc.jwk import ECKey

from sts.adapters.keyring import KeyRing
from sts.app import create_app
from sts.cli import main
from sts.core.client_secrets import check_hash_format, verify_secret
from sts.dev.issuer import DevIssuer, RunningServer
from sts.errors import ConfigurationError
from sts.settings import Settings
from sts.settings.load import load_settings
from tests.conftest import DEFAULT_CLIENTS, DEFAULT_POLICY, STS_ISSUER, exchange_form

REPO_ROOT = Path(__file__).resolve().parents[2]
MAIN = "repo:acme/app:ref:refs/heads/main"
DEPLOY = "https://deploy.example.com"


def _write_config(directory: Path, values: dict[str, Any]) -> Path:
    path = directory / "sts-test.yaml"
    path.write_text(yaml.safe_dump(values, sort_keys=False))
    return path


def _base_config(tmp_path: Path, upstream_url: str = "http://127.0.0.1:9") -> dict[str, Any]:
    return {
        "issuer": STS_ISSUER,
        "database_url": f"sqlite:///{tmp_path / 'sts.sqlite'}",
        "keys_dir": "keys",
        "policies_dir": "policies",
        "issuers": [
            {
                "name": "upstream",
                "issuer": upstream_url,
                "jwks_uri": f"{upstream_url}/.well-known/jwks",
                "algorithms": ["RS256"],
                "audiences": [STS_ISSUER],
                "max_token_age": 3600,
            }
        ],
        "clients": [dict(c) for c in DEFAULT_CLIENTS],
    }


# -- settings ------------------------------------------------------------------------------------


def test_file_then_environment_then_overrides(tmp_path: Path) -> None:
    config = _write_config(
        tmp_path, {**_base_config(tmp_path), "port": 9000, "leeway": 10, "log_level": "DEBUG"}
    )
    from_file = load_settings(config, environ={})
    assert (from_file.port, from_file.leeway, from_file.log_level) == (9000, 10, "DEBUG")
    # Defaults fill what the file does not say.
    assert from_file.max_lifetime == Settings.max_lifetime
    # Relative paths are relative to the file, not to the working directory.
    assert from_file.keys_dir == tmp_path / "keys"
    assert from_file.policies_dir == tmp_path / "policies"
    assert from_file.config_file == config

    env = {"STS_PORT": "9100", "STS_LOG_LEVEL": "WARNING", "STS_KEY_PASSPHRASE": "hunter2-hunter2"}
    from_env = load_settings(config, environ=env)
    assert (from_env.port, from_env.leeway, from_env.log_level) == (9100, 10, "WARNING")
    assert from_env.key_passphrase == b"hunter2-hunter2"
    assert "hunter2" not in repr(from_env)

    overridden = load_settings(config, environ=env, overrides={"port": 9200})
    assert overridden.port == 9200


def test_a_bad_value_from_the_environment_is_blamed_on_its_variable(tmp_path: Path) -> None:
    """An outside audit: ``STS_WORKERS=-1`` was reported as the config file's ``workers``."""
    config = _write_config(tmp_path, {**_base_config(tmp_path), "workers": 2})
    with pytest.raises(ConfigurationError) as caught:
        load_settings(config, environ={"STS_WORKERS": "-1"})
    assert str(caught.value).startswith("STS_WORKERS: setting workers:"), caught.value
    bad_file = _write_config(tmp_path, {**_base_config(tmp_path), "workers": -1})
    with pytest.raises(ConfigurationError, match=r"^config file .*: setting workers:"):
        load_settings(bad_file, environ={})


#: ``STS_*`` variables that set no setting: what the message says.
NO_SUCH_SETTING = {
    "misspelt": (
        {"STS_DPOP_NONCES": "true"},
        "STS_DPOP_NONCES: no such setting (did you mean STS_DPOP_NONCE?)",
    ),
    "a-list": (
        {"STS_TRUSTED_PROXIES": "10.0.0.0/8"},
        "STS_TRUSTED_PROXIES: trusted_proxies is a list or mapping and is set in the configuration file only",
    ),
    "under-a-mapping": (
        {"STS_RATE_LIMITS_ENABLED": "false"},
        "STS_RATE_LIMITS_ENABLED: rate_limits is a list or mapping and is set in the configuration file only",
    ),
    "not-upper-case": ({"STS_Port": "9000"}, "STS_Port: no such setting (did you mean STS_PORT?)"),
    "empty-keys-dir": ({"STS_KEYS_DIR": ""}, "STS_KEYS_DIR: empty; name a directory"),
    "blank-policies-dir": ({"STS_POLICIES_DIR": " "}, "STS_POLICIES_DIR: empty; name a directory"),
}


@pytest.mark.parametrize(("environ", "message"), NO_SUCH_SETTING.values(), ids=NO_SUCH_SETTING.keys())
def test_an_sts_variable_that_sets_nothing_stops_the_start(
    tmp_path: Path, environ: dict[str, str], message: str
) -> None:
    """An outside audit: ``STS_DPOP_NONCES=true`` and ``STS_TRUSTED_PROXIES=10.0.0.0/8`` were ignored
    (``sts config check`` said ok; the same misspelling in the file is refused), and an empty
    ``STS_KEYS_DIR`` was the config file's directory.  The variables read elsewhere (the client
    library's, the browser test's) and Kubernetes' links to the namespace's Services still pass."""
    config = _write_config(tmp_path, _base_config(tmp_path))
    elsewhere = {
        "STS_CONFIG": str(config),
        "STS_KEY_PASSPHRASE": "hunter2-hunter2",
        "STS_ID_TOKEN": "a.b.c",
        "STS_TOKEN": "d.e.f",
        "STS_URL": "https://sts.example.com",
        "STS_REVIEW_SCREENSHOTS": "docs/screenshots",
        # A Service "sts-redis" in the namespace (enableServiceLinks):
        "STS_REDIS_SERVICE_HOST": "10.0.0.7",
        "STS_REDIS_SERVICE_PORT": "6379",
        "STS_REDIS_SERVICE_PORT_CLIENT": "6379",
        "STS_REDIS_PORT": "tcp://10.0.0.7:6379",
        "STS_REDIS_PORT_6379_TCP": "tcp://10.0.0.7:6379",
        "STS_REDIS_PORT_6379_TCP_PROTO": "tcp",
        "STS_REDIS_PORT_6379_TCP_PORT": "6379",
        "STS_REDIS_PORT_6379_TCP_ADDR": "10.0.0.7",
    }
    assert load_settings(config, environ=elsewhere).keys_dir == tmp_path / "keys"
    with pytest.raises(ConfigurationError) as caught:
        load_settings(config, environ={**elsewhere, **environ})
    assert str(caught.value).startswith(message), caught.value
    result = CliRunner().invoke(main, ["--config", str(config), "config", "check"], env=environ)
    assert _failed_cleanly(result) and message in result.output, result.output


def test_active_threads_can_be_set_within_threads(tmp_path: Path) -> None:
    """Documented as a setting, it was refused by the schema from the file and the environment
    alike (an outside check)."""
    config = _write_config(tmp_path, {**_base_config(tmp_path), "active_threads": 2})
    assert load_settings(config, environ={}).active_threads == 2
    assert load_settings(config, environ={"STS_ACTIVE_THREADS": "3"}).active_threads == 3
    with pytest.raises(ConfigurationError, match="active_threads: must not exceed threads"):
        load_settings(config, environ={"STS_ACTIVE_THREADS": "9", "STS_THREADS": "8"})


def test_a_relative_sqlite_path_in_the_file_is_relative_to_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As every other path of the file (an outside check: ``sts --config`` from another directory
    made a new empty database there)."""
    config = _write_config(tmp_path, {**_base_config(tmp_path), "database_url": "sqlite:///var/x.sqlite"})
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert load_settings(config, environ={}).database_url == f"sqlite:///{tmp_path}/var/x.sqlite"
    for kept in ("sqlite:////abs/x.sqlite", "postgresql://u@h/db"):
        raw = {**_base_config(tmp_path), "database_url": kept}
        assert load_settings(_write_config(tmp_path, raw), environ={}).database_url == kept
    # The driver takes no query string, and the path would be read with it (the re-check: a new
    # database file named "sts.sqlite?mode=ro").
    raw = {**_base_config(tmp_path), "database_url": "sqlite:///var/x.sqlite?mode=ro"}
    with pytest.raises(ConfigurationError, match="sqlite URL takes no query string"):
        load_settings(_write_config(tmp_path, raw), environ={})


def test_config_file_from_sts_config_then_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    config = _write_config(elsewhere, {**_base_config(tmp_path), "port": 9300})
    monkeypatch.chdir(tmp_path)
    assert load_settings(environ={"STS_CONFIG": str(config)}).port == 9300
    # No file named anywhere and none in the working directory: built-in defaults.
    defaults = load_settings(environ={})
    assert (defaults.port, defaults.issuers, defaults.config_file) == (8080, (), None)
    (tmp_path / "sts.yaml").write_text("port: 9400\n")
    assert load_settings(environ={}).port == 9400


def _without_client_keys(config: dict[str, Any]) -> None:
    config["clients"] = [{"client_id": "signer", "auth_method": "private_key_jwt"}]


def _with_two_client_keys(config: dict[str, Any]) -> None:
    key = ECKey.generate_key("P-256").as_dict(private=False)
    config["clients"] = [
        {
            "client_id": "signer",
            "auth_method": "private_key_jwt",
            "jwks": {"keys": [key]},
            "jwks_uri": "https://signer.example/jwks",
        }
    ]


def _duplicate_issuer_name(config: dict[str, Any]) -> None:
    config["issuers"].append({**config["issuers"][0], "issuer": "https://other.example"})


def _duplicate_issuer_value(config: dict[str, Any]) -> None:
    config["issuers"].append({**config["issuers"][0], "name": "second"})


def _own_issuer_upstream(config: dict[str, Any]) -> None:
    config["issuers"][0]["issuer"] = STS_ISSUER + "/"


def _http_jwks_uri(config: dict[str, Any]) -> None:
    config["issuers"][0]["jwks_uri"] = "http://issuer.example.com/jwks"


def _issuer_without_keys(config: dict[str, Any]) -> None:
    del config["issuers"][0]["jwks_uri"]


def _client_secret_without_hash(config: dict[str, Any]) -> None:
    config["clients"] = [{"client_id": "gateway", "auth_method": "client_secret_basic"}]


def _duplicate_client(config: dict[str, Any]) -> None:
    config["clients"].append(dict(config["clients"][0]))


def _set(**values: Any) -> Callable[[dict[str, Any]], None]:
    return lambda config: config.update(values)


# Each case: id, how to spoil a good configuration, the environment, fragments of the message.
INVALID_SETTINGS: list[tuple[str, Callable[[dict[str, Any]], None], dict[str, str], tuple[str, ...]]] = [
    ("port-too-large", _set(port=70000), {}, ("setting port", "70000")),
    ("port-zero", _set(port=0), {}, ("setting port",)),
    ("port-not-a-number", _set(port="http"), {}, ("setting port", "'http'")),
    ("sts-port-not-an-integer", _set(), {"STS_PORT": "80a"}, ("STS_PORT", "'80a' is not an integer")),
    ("sts-port-out-of-range", _set(), {"STS_PORT": "65536"}, ("setting port",)),
    ("unknown-key", _set(listen_port=8080), {}, ("listen_port",)),
    ("unknown-issuer-key", lambda c: c["issuers"][0].update(audience="x"), {}, ("issuers.0", "'audience'")),
    ("http-issuer-not-loopback", _set(issuer="http://sts.example.com"), {}, ("setting issuer", "https")),
    (
        "http-issuer-from-environment",
        _set(),
        {"STS_ISSUER": "http://10.0.0.1:8080"},
        ("setting issuer", "https"),
    ),
    ("issuer-with-query", _set(issuer="https://sts.example.com/?x=1"), {}, ("setting issuer", "no query")),
    ("http-upstream-jwks-not-loopback", _http_jwks_uri, {}, ("issuers.upstream.jwks_uri", "https")),
    ("upstream-without-keys", _issuer_without_keys, {}, ("setting issuers.0",)),
    (
        "default-over-max-lifetime",
        _set(default_lifetime=600, max_lifetime=300),
        {},
        ("setting default_lifetime",),
    ),
    ("duplicate-issuer-name", _duplicate_issuer_name, {}, ("issuers.upstream", "duplicate issuer name")),
    ("duplicate-issuer-value", _duplicate_issuer_value, {}, ("issuers.second.issuer", "issuers.upstream")),
    ("upstream-is-our-issuer", _own_issuer_upstream, {}, ("issuers.upstream.issuer", "own issuer")),
    ("private-key-jwt-without-keys", _without_client_keys, {}, ("clients.signer", "exactly one of")),
    ("private-key-jwt-with-two-key-sources", _with_two_client_keys, {}, ("clients.signer", "exactly one of")),
    ("client-secret-without-hash", _client_secret_without_hash, {}, ("clients.gateway.secret_hash",)),
    ("duplicate-client", _duplicate_client, {}, ("clients.gateway", "duplicate client_id")),
    ("unknown-store", _set(store="memcached"), {}, ("setting store",)),
    (
        "redis-url-not-redis",
        _set(store="redis", redis_url="http://127.0.0.1:6379"),
        {},
        ("setting redis_url",),
    ),
    # The message names the scheme, never the URL: it may hold a password.
    (
        "redis-url-not-redis-with-a-password",
        _set(store="redis", redis_url="http://:hunter2secret@127.0.0.1:6379"),
        {},
        ("setting redis_url: the scheme 'http' is not redis://",),
    ),
    ("database-not-supported", _set(database_url="mysql://db/sts"), {}, ("setting database_url",)),
    # SQLite in memory: sts serve died with a TypeError (no path), or was never ready (one
    # database per connection and process, none with a schema): an outside audit.
    (
        "sqlite-without-path",
        _set(database_url="sqlite://"),
        {},
        ("setting database_url", "names no database file"),
    ),
    ("sqlite-in-memory", _set(database_url="sqlite:///:memory:"), {}, ("setting database_url", "in memory")),
    (
        "sqlite-in-memory-from-environment",
        _set(),
        {"STS_DATABASE_URL": "sqlite:///:memory:"},
        ("setting database_url", "in memory"),
    ),
    (
        "sqlite-uri-in-memory",
        _set(database_url="sqlite:///file::memory:"),
        {},
        ("setting database_url", "file:"),
    ),
]


@pytest.mark.parametrize(
    ("spoil", "environ", "fragments"),
    [pytest.param(*case[1:], id=case[0]) for case in INVALID_SETTINGS],
)
def test_invalid_setting_names_the_setting(
    tmp_path: Path,
    spoil: Callable[[dict[str, Any]], None],
    environ: dict[str, str],
    fragments: tuple[str, ...],
) -> None:
    config = _base_config(tmp_path)
    load_settings(_write_config(tmp_path, config), environ={})  # the base is valid
    spoil(config)
    with pytest.raises(ConfigurationError) as caught:
        load_settings(_write_config(tmp_path, config), environ=environ)
    for fragment in fragments:
        assert fragment in str(caught.value)
    assert "hunter2secret" not in str(caught.value)


#: URLs whose port is no port (or whose text is no URL), the line the start stops with, and the
#: URL mended (a port, or none: the default), which is accepted.
BAD_URL_PORTS = {
    "database-port-not-a-number": (
        "database_url",
        "postgresql://sts:s3cret-pw@127.0.0.1:notaport/sts",
        "setting database_url: the port is not a number from 1 to 65535",
        "postgresql://sts:s3cret-pw@127.0.0.1:5432/sts",
    ),
    "database-port-out-of-range": (
        "database_url",
        "postgresql+psycopg://sts:s3cret-pw@127.0.0.1:99999/sts",
        "setting database_url: the port is not a number from 1 to 65535",
        "postgresql+psycopg://sts:s3cret-pw@[::1]:65535/sts?connect_timeout=2",
    ),
    "database-port-zero": (
        "database_url",
        "postgresql://sts:s3cret-pw@db:0/sts",
        "setting database_url: the port is not a number from 1 to 65535",
        "postgresql://sts:s3cret-pw@db/sts",
    ),
    "database-url-not-a-url": (
        "database_url",
        "postgresql:s3cret-pw@db",
        "setting database_url: not a URL (postgresql+psycopg://USER:PASSWORD@HOST:PORT/NAME)",
        "postgresql://s3cret-pw@db/sts",
    ),
    "redis-port-out-of-range": (
        "redis_url",
        "redis://:s3cret-pw@127.0.0.1:99999/0",
        "setting redis_url: the port is not a number from 1 to 65535",
        "redis://:s3cret-pw@127.0.0.1/0",
    ),
    "redis-port-not-a-number": (
        "redis_url",
        "rediss://user:s3cret-pw@127.0.0.1:port/0",
        "setting redis_url: the port is not a number from 1 to 65535",
        "unix:///run/redis.sock?db=0",
    ),
}


@pytest.mark.parametrize(
    ("setting", "url", "message", "mended"), BAD_URL_PORTS.values(), ids=BAD_URL_PORTS.keys()
)
def test_a_url_port_that_is_no_port_stops_the_start_without_showing_the_password(
    tmp_path: Path, setting: str, url: str, message: str, mended: str
) -> None:
    """The URLs were parsed only when a connection was made: ``sts config check`` said "settings
    ok", then every command that opened the database or Redis ended in a ``ValueError``
    traceback (an outside audit).  The message names the setting, never the URL."""
    (tmp_path / "policies").mkdir()
    config = {**_base_config(tmp_path), setting: url}
    if setting == "redis_url":
        config["store"] = "redis"
    path = _write_config(tmp_path, config)
    with pytest.raises(ConfigurationError) as caught:
        load_settings(path, environ={})
    assert str(caught.value) == message
    for command in (("config", "check"), ("db", "current"), ("revoke", "subject", "upstream", "x")):
        result = _sts(path, *command)
        assert _failed_cleanly(result), (command, result.output, result.exception)
        assert result.output == f"Error: {message}\n", command
    fixed = load_settings(_write_config(tmp_path, {**config, setting: mended}), environ={})
    assert getattr(fixed, setting) == mended


#: A configuration file with a key named twice: where, and the key (the second one's line).
DUPLICATE_KEYS = {
    "top-level": (
        'trusted_proxies: ["10.0.0.5/32"]\nport: 9000\ntrusted_proxies: ["0.0.0.0/0"]\n',
        3,
        "trusted_proxies",
    ),
    "in-an-issuer": (
        "issuers:\n  - name: dev\n    issuer: https://ci.example.com\n"
        "    jwks_uri: https://ci.example.com/jwks\n    audiences: [https://sts.example.com]\n"
        "    require_jti: true\n    require_jti: false\n",
        7,
        "require_jti",
    ),
    "in-rate-limits": (
        "rate_limits:\n  token:\n    network: {requests: 1, period: 60}\n"
        "    network: {requests: 100000, period: 1}\n",
        4,
        "network",
    ),
}


@pytest.mark.parametrize(("text", "line", "key"), DUPLICATE_KEYS.values(), ids=DUPLICATE_KEYS.keys())
def test_a_key_named_twice_in_the_config_file_stops_the_start(
    tmp_path: Path, text: str, line: int, key: str
) -> None:
    """YAML 1.2.2 §3.2.1.1: the keys of a mapping are unique.  PyYAML kept the last one without a
    word (an outside audit: a second ``require_jti`` turned single use off, a second
    ``trusted_proxies`` pasted further down trusted every address); policy files refused it."""
    path = tmp_path / "sts.yaml"
    path.write_text(text)
    with pytest.raises(ConfigurationError) as caught:
        load_settings(path, environ={})
    assert str(caught.value) == (
        f"config file {path}:{line}: duplicate key {key!r} (YAML would silently keep the last value)"
    )
    result = CliRunner().invoke(main, ["--config", str(path), "config", "check"])
    assert _failed_cleanly(result) and f"duplicate key {key!r}" in result.output


def test_merge_keys_share_fields_and_a_key_of_the_mapping_overrides_a_merged_one(tmp_path: Path) -> None:
    """``<<: *base`` (YAML's merge key type, which ``safe_load`` reads) loaded before duplicate keys
    were refused, and stopped the start after (an outside re-check): merged keys are no duplicates,
    a key the mapping names itself wins, and one it names twice is still refused."""
    path = tmp_path / "sts.yaml"
    path.write_text(
        "issuers:\n"
        "  - &gitlab\n"
        "    name: gitlab\n"
        "    issuer: https://gitlab.example.com\n"
        "    jwks_uri: https://gitlab.example.com/oauth/discovery/keys\n"
        "    audiences: [https://sts.example.com]\n"
        "    require_jti: true\n"
        "  - <<: *gitlab\n"
        "    name: gitlab-eu\n"
        "    issuer: https://gitlab.eu.example.com\n"
        "    jwks_uri: https://gitlab.eu.example.com/oauth/discovery/keys\n"
    )
    (tmp_path / "policies").mkdir()
    first, second = load_settings(path, environ={}).issuers
    assert (second.name, second.issuer, second.require_jti) == (
        "gitlab-eu",
        "https://gitlab.eu.example.com",
        True,
    )
    assert second.audiences == first.audiences == ("https://sts.example.com",)
    result = CliRunner().invoke(main, ["--config", str(path), "config", "check"])
    assert result.exit_code == 0, result.output
    path.write_text(path.read_text() + "    name: twice\n")
    with pytest.raises(ConfigurationError, match="duplicate key 'name'"):
        load_settings(path, environ={})


def test_aliases_that_stand_for_too_much_stop_the_start(tmp_path: Path) -> None:
    """A few hundred bytes of nested aliases stand for billions of values, which the schema check
    would walk (as in policy files, an outside audit); aliases within reason still load."""
    levels = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    levels += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
    path = tmp_path / "sts.yaml"
    path.write_text("\n".join(levels) + "\n")
    with pytest.raises(ConfigurationError, match=r"aliases expand to more than 2,000,000 values"):
        load_settings(path, environ={})
    issuer = (
        "{name: %s, issuer: https://%s.example.com, jwks_uri: https://%s.example.com/jwks, audiences: %s}"
    )
    path.write_text(
        "issuers:\n"
        f"  - {issuer % ('a', 'a', 'a', '&audiences [https://sts.example.com, https://sts2.example.com]')}\n"
        f"  - {issuer % ('b', 'b', 'b', '*audiences')}\n"
    )
    assert load_settings(path, environ={}).issuers[1].audiences == (
        "https://sts.example.com",
        "https://sts2.example.com",
    )


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        pytest.param("port: [\n", "not valid YAML", id="not-yaml"),
        pytest.param("- port\n", "must be a mapping", id="not-a-mapping"),
    ],
)
def test_unreadable_config_file_names_the_file(tmp_path: Path, text: str, fragment: str) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text(text)
    with pytest.raises(ConfigurationError, match=fragment) as caught:
        load_settings(path, environ={})
    assert str(path) in str(caught.value)
    with pytest.raises(ConfigurationError, match="cannot be read"):
        load_settings(tmp_path / "missing.yaml", environ={})


def test_ed25519_is_accepted_wherever_algorithms_are_named(tmp_path: Path) -> None:
    """RFC 9864's fully specified ``Ed25519``, beside its deprecated name ``EdDSA`` (the key ring
    tells operators to prefer it): for new signing keys, upstream issuers, client assertions and
    transmitters alike."""
    config = _base_config(tmp_path)
    config["signing_alg"] = "Ed25519"
    config["issuers"][0]["algorithms"] = ["Ed25519", "EdDSA"]
    config["clients"].append({"client_id": "ed", "auth_method": "private_key_jwt", "jwks": {"keys": []}})
    config["clients"][-1]["algorithms"] = ["Ed25519"]
    transmitter = {"name": "idp", "issuer": "https://idp.test", "jwks_uri": "https://idp.test/jwks"}
    config["transmitters"] = [{**transmitter, "algorithms": ["Ed25519"]}]
    settings = load_settings(_write_config(tmp_path, config), environ={})
    assert settings.signing_alg == "Ed25519"
    assert settings.issuers[0].algorithms == ("Ed25519", "EdDSA")
    assert settings.clients[-1].algorithms == ("Ed25519",)
    assert settings.transmitters[0].algorithms == ("Ed25519",)


def test_http_issuer_on_loopback_is_allowed_for_development(tmp_path: Path) -> None:
    config = {**_base_config(tmp_path), "issuer": "http://127.0.0.1:8080"}
    assert load_settings(_write_config(tmp_path, config), environ={}).issuer == "http://127.0.0.1:8080"


def test_settings_are_frozen(tmp_path: Path) -> None:
    settings = load_settings(_write_config(tmp_path, _base_config(tmp_path)), environ={})
    with pytest.raises(AttributeError):
        settings.port = 1  # type: ignore[misc]
    with pytest.raises(AttributeError):
        settings.issuers[0].issuer = "https://evil.example"  # type: ignore[misc]


@pytest.mark.parametrize(
    "secret_hash",
    ["plaintext-secret", "sha256$short$short", "pbkdf2-sha256$10$AAAAAAAAAAAAAAAAAAAAAA$" + "A" * 43],
)
def test_malformed_secret_hash_stops_create_app(
    make_settings: Callable[..., Settings], secret_hash: str
) -> None:
    clients = [
        {**c, "secret_hash": secret_hash} if c["client_id"] == "gateway" else c for c in DEFAULT_CLIENTS
    ]
    settings = make_settings(clients=clients)  # loading checks only that a hash is there
    with pytest.raises(ConfigurationError, match=r"clients\.gateway\.secret_hash"):
        create_app(settings)


# -- the sts command -----------------------------------------------------------------------------


@pytest.fixture
def config_path(tmp_path: Path, upstream: RunningServer) -> Path:
    """A configuration trusting the upstream dev issuer, with the default test policy."""
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "test.yaml").write_text(yaml.safe_dump(DEFAULT_POLICY, sort_keys=False))
    config = _base_config(tmp_path, upstream.issuer.issuer_url)
    config["issuers"][0]["jwks_uri"] = upstream.jwks_uri
    return _write_config(tmp_path, config)


def _sts(config: Path, *args: str, input: str | None = None, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(main, ["--config", str(config), *args], input=input, env=env)


def _failed_cleanly(result: Result) -> bool:
    """Exited non-zero through click (a message), not through an uncaught exception."""
    return result.exit_code != 0 and (result.exception is None or isinstance(result.exception, SystemExit))


def test_config_check(config_path: Path) -> None:
    result = _sts(config_path, "config", "check")
    assert result.exit_code == 0, result.output
    assert f"settings ok: issuer {STS_ISSUER}, 1 issuer(s), 3 client(s), 2 rule(s)" in result.output


def test_config_check_notes_an_openid_configuration_without_rs256(tmp_path: Path, config_path: Path) -> None:
    """OpenID Connect Discovery 1.0 §3 asks for RS256 among id_token_signing_alg_values_supported,
    and Authlib's validator refuses the document without it (an interoperability audit): said,
    not refused, for the default ES256 keys; nothing said once the keys are RS256."""
    result = _sts(config_path, "config", "check")
    assert result.exit_code == 0 and "note: no RS256 key is published" in result.output
    assert "lists only ES256 as id_token_signing_alg_values_supported" in result.output
    config = yaml.safe_load(config_path.read_text())
    config["signing_alg"] = "RS256"
    rs256 = _sts(_write_config(tmp_path, config), "config", "check")
    assert rs256.exit_code == 0 and "note: no RS256 key" not in rs256.output


def test_config_check_refuses_a_bad_setting(tmp_path: Path, config_path: Path) -> None:
    config = yaml.safe_load(config_path.read_text())
    config["issuer"] = "http://sts.example.com"
    result = _sts(_write_config(tmp_path, config), "config", "check")
    assert _failed_cleanly(result)
    assert "setting issuer" in result.output
    assert "Traceback" not in result.output


def test_config_check_refuses_a_review_password_hash_the_start_refuses(
    tmp_path: Path, config_path: Path
) -> None:
    """An outside audit: ``config check`` said "settings ok" for a review user's hash that the
    start then refused (it was checked only when the page was built)."""
    config = yaml.safe_load(config_path.read_text())
    config["review"] = {"enabled": True, "users": [{"username": "alice", "password_hash": "not-a-hash"}]}
    result = _sts(_write_config(tmp_path, config), "config", "check")
    assert _failed_cleanly(result), result.output
    assert "setting review.users.alice.password_hash: not a recognised hash" in result.output
    config["review"]["enabled"] = False  # not checked where the start does not read it either
    assert _sts(_write_config(tmp_path, config), "config", "check").exit_code == 0


def test_a_bad_command_line_option_is_named_not_the_config_file(config_path: Path) -> None:
    """``--port 70000`` was reported as ``config file sts.yaml: setting port: ...`` (an outside audit),
    sending the operator to a file whose port was fine."""
    result = _sts(config_path, "config", "check")
    assert result.exit_code == 0, result.output
    bad = _sts(config_path, "serve", "--port", "70000")
    assert _failed_cleanly(bad), bad.output
    assert "option --port: setting port: 70000 is greater than the maximum of 65535" in bad.output
    assert "config file" not in bad.output
    # The checks across settings too (the re-check: these still named the setting alone).
    port = yaml.safe_load(config_path.read_text()).get("port", 8080)
    for args, said in (
        (
            ("--metrics-listen", f"127.0.0.1:{port}"),
            "option --metrics-listen: setting metrics_listen: must not",
        ),
        (("--metrics-listen", "127.0.0.1:99999"), "option --metrics-listen: setting metrics_listen:"),
        (("--workers", "0"), "option --workers: setting workers:"),
    ):
        refused = _sts(config_path, "serve", *args)
        assert _failed_cleanly(refused) and said in refused.output, refused.output


@pytest.mark.parametrize("where", ["a-file", "under-a-file"])
def test_config_check_refuses_a_keys_dir_a_start_cannot_create(
    tmp_path: Path, config_path: Path, where: str
) -> None:
    """An outside audit: "keys: none yet in /etc/passwd; the first start creates them", then the
    start refused, "cannot create key directory"."""
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("x")
    config = yaml.safe_load(config_path.read_text())
    config["keys_dir"] = str(blocker if where == "a-file" else blocker / "keys")
    result = _sts(_write_config(tmp_path, config), "config", "check")
    assert _failed_cleanly(result), result.output
    assert "cannot create key directory" in result.output
    assert not (blocker.parent / "keys").exists()
    config["keys_dir"] = str(tmp_path / "new" / "keys")
    fine = _sts(_write_config(tmp_path, config), "config", "check")
    assert fine.exit_code == 0 and "the first start creates them" in fine.output, fine.output
    assert not (tmp_path / "new").exists(), "check creates nothing"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        pytest.param('{"keys": [', "not valid JSON", id="not-json"),
        pytest.param(None, "no usable public signature key", id="only-encryption-keys"),
    ],
)
def test_config_check_reads_a_jwks_file_as_a_start_would(
    tmp_path: Path, config_path: Path, content: str | None, message: str
) -> None:
    """It said "settings ok" for a key file ``sts serve`` refused to start with."""
    keys = tmp_path / "issuer-keys.json"
    if content is None:
        public = ECKey.generate_key("P-256").as_dict(private=False)
        content = json.dumps({"keys": [dict(public, kid="k1", use="enc")]})
    keys.write_text(content)
    config = yaml.safe_load(config_path.read_text())
    config["issuers"][0].pop("jwks_uri")
    config["issuers"][0]["jwks_file"] = str(keys)
    config["issuers"][0]["algorithms"] = ["ES256"]
    result = _sts(_write_config(tmp_path, config), "config", "check")
    assert _failed_cleanly(result), result.output
    assert message in result.output and str(keys) in result.output
    assert "Traceback" not in result.output


def test_config_check_refuses_a_bad_policy(config_path: Path) -> None:
    (config_path.parent / "policies" / "z.yaml").write_text(
        "rules:\n  - name: open\n    issuer: upstream\n    grant: {audiences: [x]}\n"
    )
    result = _sts(config_path, "config", "check")
    assert _failed_cleanly(result)
    assert "z.yaml:2: rule 'open': matches every token" in result.output


def _tree(directory: Path) -> dict[str, tuple[int, int, bytes]]:
    """Every file under ``directory`` with its mode, mtime and content: to show nothing changed."""
    return {
        str(p.relative_to(directory)): (p.stat().st_mode, p.stat().st_mtime_ns, p.read_bytes())
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def test_config_check_without_keys_creates_nothing(config_path: Path) -> None:
    before = _tree(config_path.parent)
    result = _sts(config_path, "config", "check")
    assert result.exit_code == 0, result.output
    assert "keys: none yet in" in result.output and "the first start creates them" in result.output
    assert not (config_path.parent / "keys").exists()
    assert _tree(config_path.parent) == before


def test_config_check_loads_the_key_ring_read_only(config_path: Path) -> None:
    ring = KeyRing.open(config_path.parent / "keys", passphrase=b"right passphrase", create_alg="ES256")
    before = _tree(config_path.parent)
    result = _sts(config_path, "config", "check", env={"STS_KEY_PASSPHRASE": "right passphrase"})
    assert result.exit_code == 0, result.output
    assert f"keys ok: 2 key(s) in {config_path.parent / 'keys'}, active {ring.signer().kid}" in result.output
    assert _tree(config_path.parent) == before


@pytest.mark.parametrize(
    ("damage", "passphrase", "fragment"),
    [
        ("truncate", None, "not a valid private key"),
        ("none", None, "is encrypted but no passphrase is configured (set STS_KEY_PASSPHRASE)"),
        ("none", "wrong passphrase", "wrong passphrase or damaged file"),
        ("truncate", "right passphrase", "wrong passphrase or damaged file"),
    ],
)
def test_config_check_refuses_a_key_ring_that_serve_would_refuse(
    config_path: Path, damage: str, passphrase: str | None, fragment: str
) -> None:
    keys = config_path.parent / "keys"
    # The ring is encrypted whenever the case gives a passphrase to check with, or none at all.
    encrypted_with = None if damage == "truncate" and passphrase is None else b"right passphrase"
    ring = KeyRing.open(keys, passphrase=encrypted_with, create_alg="ES256")
    active = keys / f"{ring.signer().kid}.pem"
    if damage == "truncate":
        active.write_bytes(active.read_bytes()[:100])
    env = {"STS_KEY_PASSPHRASE": passphrase} if passphrase else {}
    before = _tree(config_path.parent)
    result = _sts(config_path, "config", "check", env=env)
    assert _failed_cleanly(result), result.output
    assert fragment in result.output and str(active) in result.output
    assert "settings ok" not in result.output and "Traceback" not in result.output
    assert _tree(config_path.parent) == before
    # The start refuses the same ring with the same message.
    settings = load_settings(config_path, environ=env)
    with pytest.raises(ConfigurationError, match=re.escape(fragment)):
        create_app(settings)


def test_config_check_refuses_a_truncated_dpop_nonce_secret(config_path: Path) -> None:
    KeyRing.open(config_path.parent / "keys", passphrase=None, create_alg="ES256")
    (config_path.parent / "keys" / "dpop-nonce.secret").write_bytes(b"short")
    result = _sts(config_path, "config", "check", env={"STS_DPOP_NONCE": "true"})
    assert _failed_cleanly(result)
    assert "DPoP nonce secret is truncated" in result.output


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (("nosuchissuer", "foo"), "'nosuchissuer' is not a configured issuer; choose one of 'upstream',"),
        (("Upstream", "foo"), "'Upstream' is not a configured issuer"),
        (("upstream", ""), "the subject must not be empty"),
        (("upstream", "foo", "--block", "-5"), "-5 is not in the range 1<=x<=604800"),
        (("upstream", "foo", "--block", "0"), "0 is not in the range 1<=x<=604800"),
        (("upstream", "foo", "--block", "604801"), "604801 is not in the range 1<=x<=604800"),
        (("upstream", "foo", "--block", "1e9"), "'1e9' is not a valid integer"),
    ],
)
def test_revoke_subject_refuses_what_would_revoke_nothing(
    config_path: Path, args: tuple[str, ...], fragment: str
) -> None:
    result = _sts(config_path, "revoke", "subject", *args)
    assert result.exit_code == 2, result.output
    assert fragment in result.output
    # Refused before anything was opened: no database, no keys.
    assert not (config_path.parent / "sts.sqlite").exists()
    assert not (config_path.parent / "keys").exists()


@pytest.mark.parametrize("issuer_name", ["upstream", "self", "*"])
def test_revoke_subject_of_a_known_issuer(config_path: Path, issuer_name: str) -> None:
    assert _sts(config_path, "db", "upgrade").exit_code == 0  # revoke creates no database (nor keys)
    result = _sts(config_path, "revoke", "subject", issuer_name, "repo:acme/app", "--block", "60")
    assert result.exit_code == 0, result.output
    assert f"revoked tokens issued to {issuer_name}|repo:acme/app before" in result.output
    assert result.output.rstrip().endswith("; blocked for 60s")
    assert not (config_path.parent / "keys").exists()


def test_policy_check_lists_rules(config_path: Path) -> None:
    result = _sts(config_path, "policy", "check")
    assert result.exit_code == 0, result.output
    test_yaml = config_path.parent / "policies" / "test.yaml"
    assert f"ok  {test_yaml}:3: deploy" in result.output
    assert "ledger-with-client" in result.output
    assert "2 rule(s) in 1 file(s): no problems" in result.output


def test_policy_check_bad_file_names_file_line_and_reason(tmp_path: Path, config_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "version: 1\nrules:\n"
        "  - name: fine\n    issuer: upstream\n    subject: s\n    grant: {audiences: [x]}\n"
        "  - name: typo\n    issuer: upstreem\n    subject: s\n    grant: {audiences: [x]}\n"
    )
    result = _sts(config_path, "policy", "check", str(bad))
    assert _failed_cleanly(result)
    assert f"{bad}:7: rule 'typo': unknown issuer 'upstreem'" in result.output
    assert "no problems" not in result.output


def test_policy_check_without_policies_directory(tmp_path: Path, config_path: Path) -> None:
    config = yaml.safe_load(config_path.read_text())
    config["policies_dir"] = "no-such-directory"
    result = _sts(_write_config(tmp_path, config), "policy", "check")
    assert _failed_cleanly(result)
    assert "no-such-directory does not exist" in result.output


def _claims_file(tmp_path: Path, **claims: Any) -> Path:
    path = tmp_path / "claims.json"
    path.write_text(json.dumps({"sub": MAIN, "exp": time.time() + 300, **claims}))
    return path


def test_policy_explain_claims_grant(tmp_path: Path, config_path: Path) -> None:
    claims = _claims_file(tmp_path, repository_id="123456")
    result = _sts(
        config_path, "policy", "explain", "--claims", str(claims), "--issuer", "upstream",
        "--audience", DEPLOY, "--scope", "deploy:write admin",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert any(line.startswith("APPLIES ") and " deploy " in line for line in lines)
    assert any(line.startswith("no ") and "ledger-with-client" in line for line in lines)
    assert (
        "decision: grant by rule deploy: aud=['https://deploy.example.com'] scope=['deploy:write']"
        in result.output
    )
    assert "(scope narrowed)" in result.output


def test_policy_explain_claims_refusal_exits_1(tmp_path: Path, config_path: Path) -> None:
    claims = _claims_file(tmp_path, repository_id="999999")
    result = _sts(
        config_path,
        "policy",
        "explain",
        "--claims",
        str(claims),
        "--issuer",
        "upstream",
        "--audience",
        DEPLOY,
    )
    assert result.exit_code == 1
    rule_lines = [line for line in result.output.splitlines() if not line.startswith("decision:")]
    assert len(rule_lines) == 2
    assert all(line.startswith("no ") for line in rule_lines)
    assert "claim 'repository_id' does not match" in result.output
    assert "decision: refuse with invalid_request (policy.no_rule_for_identity)" in result.output


def test_policy_explain_as_client(tmp_path: Path, config_path: Path) -> None:
    claims = tmp_path / "k8s.json"
    claims.write_text(json.dumps({"sub": "system:serviceaccount:payments:api"}))
    args = ["policy", "explain", "--claims", str(claims), "--issuer", "upstream", "--resource"]
    anonymous = _sts(config_path, *args, "https://ledger.example.com/api")
    assert anonymous.exit_code == 1
    assert "decision: refuse with invalid_client" in anonymous.output
    as_gateway = _sts(config_path, *args, "https://ledger.example.com/api", "--client-id", "gateway")
    assert as_gateway.exit_code == 0, as_gateway.output
    assert "decision: grant by rule ledger-with-client" in as_gateway.output


def test_policy_explain_verifies_a_real_token(
    tmp_path: Path, config_path: Path, upstream: RunningServer
) -> None:
    token_file = tmp_path / "token.jwt"
    token_file.write_text(upstream.issuer.github_actions_token(audience=STS_ISSUER) + "\n")
    result = _sts(config_path, "policy", "explain", "--token", str(token_file), "--audience", DEPLOY)
    assert result.exit_code == 0, result.output
    assert "decision: grant by rule deploy" in result.output

    # A token signed by someone else under the same iss does not verify: nothing is explained.
    forger = DevIssuer.ephemeral(upstream.issuer.issuer_url)
    token_file.write_text(forger.github_actions_token(audience=STS_ISSUER))
    forged = _sts(config_path, "policy", "explain", "--token", str(token_file), "--audience", DEPLOY)
    assert _failed_cleanly(forged)
    assert "subject_token." in forged.output
    assert "APPLIES" not in forged.output and "decision" not in forged.output


def test_policy_explain_needs_a_token_or_claims(config_path: Path) -> None:
    result = _sts(config_path, "policy", "explain", "--audience", DEPLOY)
    assert result.exit_code == 2
    assert "give --token, or --claims with --issuer" in result.output


def test_policy_schema_is_a_json_schema_that_accepts_the_shipped_policies() -> None:
    result = CliRunner().invoke(main, ["policy", "schema"])
    assert result.exit_code == 0, result.output
    schema = json.loads(result.output)
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    shipped = [
        REPO_ROOT / "policies" / "quickstart.yaml",
        *(REPO_ROOT / "policies" / "examples").glob("*.yaml"),
    ]
    assert len(shipped) >= 3
    for path in shipped:
        errors = list(validator.iter_errors(yaml.safe_load(path.read_text())))
        assert errors == [], f"{path}: {errors[0].message if errors else ''}"
    assert not validator.is_valid({"rules": [{"name": "x", "issuer": "i", "grant": {}, "subjekt": "s"}]})
    assert not validator.is_valid({"rules": [{"name": "x", "issuer": "i", "grant": {}, "condition": ""}]})


def _key_entries(output: str) -> dict[str, list[str]]:
    by_state: dict[str, list[str]] = {}
    for line in output.splitlines():
        entry = json.loads(line)
        by_state.setdefault(entry["state"], []).append(entry["kid"])
    return by_state


def test_keys_list_rotate_jwks_prune(config_path: Path) -> None:
    # Reading creates nothing (an outside audit had `keys list` make a ring over orphaned keys).
    none = _sts(config_path, "keys", "list")
    assert _failed_cleanly(none) and "no key ring" in none.output
    assert not (config_path.parent / "keys" / "keyring.json").exists()
    KeyRing.open(config_path.parent / "keys", passphrase=None, create_alg="ES256")  # the first start
    listed = _sts(config_path, "keys", "list")
    assert listed.exit_code == 0, listed.output
    before = _key_entries(listed.output)
    assert len(before["active"]) == 1 and len(before["next"]) == 1

    jwks = _sts(config_path, "keys", "jwks")
    assert jwks.exit_code == 0, jwks.output
    published = json.loads(jwks.output)["keys"]
    assert {k["kid"] for k in published} == {*before["active"], *before["next"]}
    assert not any("d" in k for k in published), "the JWK Set must hold public keys only"

    # The next key was published a moment ago: rotating now would surprise relying parties.
    refused = _sts(config_path, "keys", "rotate")
    assert _failed_cleanly(refused)
    assert "published for" in refused.output

    rotated = _sts(config_path, "keys", "rotate", "--force")
    assert rotated.exit_code == 0, rotated.output
    after = _key_entries(_sts(config_path, "keys", "list").output)
    assert after["active"] == before["next"]
    assert after["retired"] == before["active"]
    assert after["next"] != before["next"]
    assert f"active   {before['next'][0]}" in rotated.output

    # Nothing has expired yet: prune keeps the retired key.
    kept = _sts(config_path, "keys", "prune")
    assert kept.exit_code == 0 and "removed" not in kept.output
    # Retire a key long ago (time is a parameter of the key ring), then prune removes it.
    ring = KeyRing.open(config_path.parent / "keys", passphrase=None, create_alg="ES256")
    ring.rotate(time.time() - 86400, max_token_lifetime=60, force=True)
    old_active = after["active"][0]
    pruned = _sts(config_path, "keys", "prune")
    assert pruned.exit_code == 0, pruned.output
    assert f"removed {old_active}" in pruned.output
    assert old_active not in _sts(config_path, "keys", "jwks").output


def test_keys_rotate_moves_to_the_configured_signing_alg(config_path: Path) -> None:
    """A changed ``signing_alg`` reaches the key ring through rotation: the next key published is
    of the new algorithm (a whole rotation before it signs), then the one after signs with it."""
    KeyRing.open(config_path.parent / "keys", passphrase=None, create_alg="ES256")  # active and next
    env = {"STS_SIGNING_ALG": "RS256"}
    first = _sts(config_path, "keys", "rotate", "--force", env=env)
    assert first.exit_code == 0, first.output
    lines = dict(line.split(" ", 1) for line in first.output.splitlines() if line.strip())
    assert lines["active"].split()[-1] == "ES256" and lines["next"].split()[-1] == "RS256"
    second = _sts(config_path, "keys", "rotate", "--force", env=env)
    lines = dict(line.split(" ", 1) for line in second.output.splitlines() if line.strip())
    assert lines["active"].split()[-1] == "RS256"


def test_clients_secret_prints_a_secret_and_a_matching_hash() -> None:
    result = CliRunner().invoke(main, ["clients", "secret"])
    assert result.exit_code == 0, result.output
    values = dict(line.split(": ", 1) for line in result.output.splitlines())
    secret, secret_hash = values["client_secret"], values["secret_hash"]
    assert len(secret) >= 43
    assert check_hash_format(secret_hash)
    assert verify_secret(secret, secret_hash)
    assert not verify_secret(secret + "x", secret_hash)
    assert secret not in secret_hash


def test_clients_secret_from_stdin_is_hashed_slowly_and_not_echoed() -> None:
    chosen = "a secret someone chose"
    result = CliRunner().invoke(main, ["clients", "secret", "--stdin"], input=chosen + "\n")
    assert result.exit_code == 0, result.output
    assert chosen not in result.output
    secret_hash = result.output.strip().removeprefix("secret_hash: ")
    assert secret_hash.startswith("pbkdf2-sha256$")
    assert verify_secret(chosen, secret_hash)


def test_audit_tail_after_exchanges(config_path: Path, upstream: RunningServer) -> None:
    client = create_app(load_settings(config_path, environ={})).test_client()
    granted_token = upstream.issuer.github_actions_token(audience=STS_ISSUER)
    granted = client.post("/token", data=exchange_form(granted_token, audience=DEPLOY))
    assert granted.status_code == 200, granted.get_json()
    refused_token = upstream.issuer.github_actions_token(audience=STS_ISSUER, repository_id="999999")
    refused = client.post("/token", data=exchange_form(refused_token, audience=DEPLOY))
    assert refused.status_code == 400

    result = _sts(config_path, "audit", "tail")
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.output.splitlines()]
    assert [r["outcome"] for r in records] == ["refused", "granted"]  # newest first
    assert records[1]["subject"] == MAIN and records[1]["rule"] == "deploy"
    assert records[0]["error"] == "invalid_request"
    # Tokens never reach the audit trail, only their hashes.
    for secret in (granted_token, refused_token, granted.get_json()["access_token"]):
        assert secret not in result.output
        assert secret.split(".")[2] not in result.output

    only_granted = _sts(config_path, "audit", "tail", "--outcome", "granted", "-n", "5")
    assert [json.loads(line)["outcome"] for line in only_granted.output.splitlines()] == ["granted"]


def test_audit_tail_without_a_database_is_a_clean_error(tmp_path: Path, config_path: Path) -> None:
    config = yaml.safe_load(config_path.read_text())
    config["database_url"] = "postgresql://sts@127.0.0.1:1/sts"  # nothing listens on port 1
    result = _sts(_write_config(tmp_path, config), "audit", "tail")
    assert _failed_cleanly(result)
    assert "setting database_url: cannot read the audit trail" in result.output


def test_unknown_config_file_is_a_clean_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["--config", str(tmp_path / "missing.yaml"), "config", "check"])
    assert _failed_cleanly(result)
    assert "cannot be read" in result.output


def test_policy_explain_claims_runs_the_issuers_profile(tmp_path: Path, upstream: RunningServer) -> None:
    """A what-if with --claims sees the same profile facts a real exchange would."""
    policies = tmp_path / "pol"
    policies.mkdir()
    (policies / "p.yaml").write_text(
        yaml.safe_dump(
            {
                "version": 1,
                "rules": [
                    {
                        "name": "by-facts",
                        "issuer": "gh",
                        "facts": {"repository_id": "123456", "owner_id": "7890"},
                        "require_client_authentication": False,
                        "grant": {"audiences": ["https://deploy.example.com"]},
                    }
                ],
            }
        )
    )
    config = tmp_path / "c.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "issuer": STS_ISSUER,
                "database_url": f"sqlite:///{tmp_path / 'db.sqlite'}",
                "keys_dir": str(tmp_path / "keys"),
                "policies_dir": str(policies),
                "issuers": [
                    {
                        "name": "gh",
                        "profile": "github-actions",
                        "issuer": upstream.issuer.issuer_url,
                        "jwks_uri": upstream.jwks_uri,
                        "audiences": [STS_ISSUER],
                    }
                ],
            }
        )
    )
    claims = {
        "sub": "repo:acme/app:ref:refs/heads/main",
        "repository": "acme/app",
        "repository_id": "123456",
        "repository_owner": "acme",
        "repository_owner_id": "7890",
    }
    (tmp_path / "claims.json").write_text(json.dumps(claims))
    args = ["explain", "--claims", str(tmp_path / "claims.json"), "--issuer", "gh",
            "--audience", "https://deploy.example.com"]  # fmt: skip
    result = _sts(config, "policy", *args)
    assert result.exit_code == 0, result.output
    assert "decision: grant by rule by-facts" in result.output
    claims["sub"] = "repo:evil/app:ref:refs/heads/main"
    (tmp_path / "claims.json").write_text(json.dumps(claims))
    result = _sts(config, "policy", *args)
    assert result.exit_code != 0 and "github-actions profile" in result.output


def _dev_token(tmp_path: Path, kind: str, *claims: str) -> Result:
    args = ["dev", "token", kind, "--key-dir", str(tmp_path / "dev-keys")]
    return CliRunner().invoke(main, [*args, *(a for c in claims for a in ("--claim", c))])


def _payload(token: str) -> dict[str, Any]:
    payload = token.strip().split(".")[1]
    decoded: dict[str, Any] = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    return decoded


def test_dev_token_reads_typed_builder_options_as_their_type(tmp_path: Path) -> None:
    """``--claim NAME=VALUE`` naming a builder option that is not a string (a lifetime, a flag) is
    read as that type: ``ref_protected=false`` is false, not the (true) string "false"."""
    gitlab = _dev_token(tmp_path, "gitlab", "ref_protected=false", "lifetime=60", "team=payments")
    assert gitlab.exit_code == 0, gitlab.output
    claims = _payload(gitlab.output)
    assert claims["ref_protected"] == "false" and claims["team"] == "payments"
    assert claims["exp"] - claims["iat"] == 60
    github = _dev_token(tmp_path, "github-actions", "immutable_sub=no", "repository=acme/other")
    assert github.exit_code == 0, github.output
    assert _payload(github.output)["sub"] == "repo:acme/other:ref:refs/heads/main"
    k8s = _dev_token(tmp_path, "kubernetes", "warnafter=1700000000", "now=1699999000.5")
    assert k8s.exit_code == 0, k8s.output
    assert _payload(k8s.output)["kubernetes.io"]["warnafter"] == 1700000000
    assert _payload(k8s.output)["iat"] == 1699999000


@pytest.mark.parametrize("claim", ["lifetime=soon", "immutable_sub=maybe", "now=yesterday"])
def test_dev_token_refuses_a_typed_builder_option_it_cannot_read(tmp_path: Path, claim: str) -> None:
    result = _dev_token(tmp_path, "github-actions", claim)
    assert _failed_cleanly(result)
    assert claim.split("=")[0] in result.output and "--claim" in result.output


@pytest.mark.parametrize(
    "host", ["localhost", "[::1]", "[127.0.0.1]", "::1]", "::1%lo", "fe80::1%eth0", "a..b", ""]
)
def test_host_is_an_ip_address_as_granian_binds_it(config_path: Path, host: str) -> None:
    """granian binds bare addresses only: a name, brackets or an IPv6 zone passed the checks, and
    ``sts serve`` then failed (with a traceback after creating the keys, for a name or a zone: a
    review).  Refused with the settings, before anything is created."""
    with pytest.raises(ConfigurationError, match="setting host:"):
        load_settings(config_path, environ={"STS_HOST": host})
    result = _sts(config_path, "serve", "--host", host, "--port", "19999")
    assert _failed_cleanly(result) and "option --host: setting host:" in result.output, result.output
    assert not (config_path.parent / "keys").exists()


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "0.0.0.0", "::", "::ffff:127.0.0.1"])
def test_host_addresses_granian_binds_are_taken(config_path: Path, host: str) -> None:
    assert load_settings(config_path, environ={"STS_HOST": host}).host == host
