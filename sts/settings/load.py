"""Loading the settings: one YAML file plus ``STS_*`` variables, validated, frozen.

Order of precedence: built-in defaults < configuration file < environment.
The file is named by ``--config`` or ``STS_CONFIG``; without either,
``./sts.yaml`` is used when it exists.  Every scalar setting ``name`` can be
overridden by the variable ``STS_NAME`` (``STS_ISSUER``, ``STS_PORT``...); any
other ``STS_*`` variable is refused, but for the few that are no setting
(:data:`NOT_SETTINGS`) and Kubernetes' links to other Services.
Secrets come only from the environment (``STS_KEY_PASSPHRASE``).

A bad setting raises :class:`~sts.errors.ConfigurationError` naming it, and
the service does not start.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import stat
from collections.abc import Mapping
from dataclasses import fields
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from ..errors import ConfigurationError
from . import (
    DEFAULT_RATE_LIMITS,
    RATE_LIMIT_SCOPES,
    ClientSettings,
    IssuerSettings,
    LimitSettings,
    RateLimitSettings,
    ReviewSettings,
    ReviewUser,
    Settings,
    TracingSettings,
    TransmitterSettings,
)
from .checks import check_settings
from .yaml_reader import AliasesTooLarge, DuplicateKey, read_yaml

#: The largest configuration file read (a real one is a few kilobytes).
MAX_CONFIG_BYTES = 1024 * 1024

#: Settings that are lists or mappings: the configuration file only.
FILE_ONLY = (
    "issuers",
    "clients",
    "transmitters",
    "review",
    "trusted_proxies",
    "dpop_algorithms",
    "rate_limits",
    "tracing",
)
_SCALARS = {
    f.name: f.type for f in fields(Settings) if f.name not in {*FILE_ONLY, "key_passphrase", "config_file"}
}
_INT_SETTINGS = {
    "port",
    "workers",
    "threads",
    "active_threads",
    "database_pool_size",
    "database_max_overflow",
    "database_pool_timeout",
    "database_deadline",
    "database_startup_timeout",
    "header_read_timeout",
    "body_read_timeout",
    "request_queue_timeout",
    "max_connections",
    "key_rotation_min_published",
    "default_lifetime",
    "max_lifetime",
    "leeway",
    "max_body_bytes",
    "max_client_assertion_lifetime",
    "dpop_max_age",
}
_BOOL_SETTINGS = {"dpop_nonce", "database_migrate_on_start"}
_PATH_SETTINGS = {"keys_dir", "policies_dir"}


def _schema() -> dict[str, Any]:
    text = resources.files("sts.schemas").joinpath("config.schema.json").read_text("utf-8")
    loaded: dict[str, Any] = json.loads(text)
    return loaded


#: ``STS_*`` variables that name no setting but are read elsewhere: the file and the passphrase
#: (here), the client library's CI command (``sts-client``: its id token and the token it writes,
#: which a job running the STS beside it has set), the client examples' STS address, and the
#: review page's browser test (where its screenshots go).
NOT_SETTINGS = frozenset(
    {"STS_CONFIG", "STS_KEY_PASSPHRASE", "STS_ID_TOKEN", "STS_TOKEN", "STS_URL", "STS_REVIEW_SCREENSHOTS"}
)
#: What Kubernetes sets for every Service of the namespace (``enableServiceLinks``, on by default):
#: ``<SERVICE>_SERVICE_HOST``, ``<SERVICE>_SERVICE_PORT[_<NAME>]`` and ``<SERVICE>_PORT_<n>_<PROTO>[_...]``,
#: a Service ``sts-redis`` giving ``STS_REDIS_SERVICE_HOST``; its ``<SERVICE>_PORT`` is told by its
#: value (``tcp://10.0.0.7:6379``).
_SERVICE_LINK = re.compile(
    r"STS_\w+?_(SERVICE_HOST|SERVICE_PORT(_\w+)?|PORT_\d+_(TCP|UDP|SCTP)(_(PROTO|PORT|ADDR))?)"
)
_SERVICE_LINK_PORT = re.compile(r"(tcp|udp|sctp)://[^/]*")


def _env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    """The settings the ``STS_*`` variables set; every other ``STS_*`` variable is refused.

    A variable naming no setting was ignored, and so was one naming a list (an outside audit:
    ``STS_DPOP_NONCES=true`` left nonces off and ``STS_TRUSTED_PROXIES=10.0.0.0/8`` trusted no
    proxy, while ``sts config check`` said ok; the same misspelling in the file is refused).
    """
    _check_variable_names(environ)
    raw: dict[str, Any] = {}
    for name in _SCALARS:
        var = "STS_" + name.upper()
        if var in environ:
            value: Any = environ[var]
            if name in _PATH_SETTINGS and not value.strip():
                # Empty became Path(""), the config file's own directory (an outside audit).
                raise ConfigurationError(
                    f"{var}: empty; name a directory, or unset it to use the file's {name}"
                )
            if name in _BOOL_SETTINGS:
                if value.lower() not in {"true", "false", "1", "0", "yes", "no"}:
                    raise ConfigurationError(f"{var}: {value!r} is not a boolean")
                value = value.lower() in {"true", "1", "yes"}
            elif name in _INT_SETTINGS:
                try:
                    value = int(value)
                except ValueError:
                    raise ConfigurationError(f"{var}: {value!r} is not an integer") from None
            raw[name] = value
    return raw


def _check_variable_names(environ: Mapping[str, str]) -> None:
    """Refuse an ``STS_*`` variable that sets nothing: a misspelling, or a list or mapping."""
    for var in sorted(environ):
        is_setting = var == var.upper() and var[4:].lower() in _SCALARS
        if not var.startswith("STS_") or var in NOT_SETTINGS or is_setting:
            continue
        if _SERVICE_LINK.fullmatch(var) or (
            var.endswith("_PORT") and _SERVICE_LINK_PORT.fullmatch(environ[var])
        ):
            continue  # Kubernetes' link to another Service, not meant for us
        name = var[4:].lower()
        within = next((s for s in FILE_ONLY if name == s or name.startswith(s + "_")), None)
        if within is not None:
            raise ConfigurationError(
                f"{var}: {within} is a list or mapping and is set in the configuration file only"
            )
        close = difflib.get_close_matches(name, [*_SCALARS, *FILE_ONLY], n=1)
        hint = f" (did you mean STS_{close[0].upper()}?)" if close else ""
        raise ConfigurationError(f"{var}: no such setting{hint}; unset it, or see docs/configuration.md")


def _sqlite_resolved(base: Path, url: str) -> str:
    """A SQLite URL's relative path made relative to ``base`` (the config file's directory), as
    every other path of the file is (an outside check: ``sqlite:///var/sts.sqlite`` in a file was
    read from the working directory, where ``sts --config`` found no database); ``:memory:``,
    absolute paths (``sqlite:////abs``) and other databases are left as they are."""
    if not url.startswith("sqlite:///") or url.startswith("sqlite:////"):
        return url
    path, separator, query = url[len("sqlite:///") :].partition("?")
    if not path or path == ":memory:" or path.startswith("file:"):
        return url
    return "sqlite:///" + str(_resolve(base, path)) + separator + query


def _resolve(base: Path, value: str) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else base / path


def load_settings(
    config_file: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Read, validate and freeze the settings.

    ``overrides`` (used by tests and the CLI) win over the environment, which
    wins over the file.
    """
    env = os.environ if environ is None else environ
    path: Path | None = None
    if config_file is not None:
        path = Path(config_file)
    elif env.get("STS_CONFIG"):
        path = Path(env["STS_CONFIG"])
    elif Path("sts.yaml").is_file():
        path = Path("sts.yaml")

    raw: dict[str, Any] = {}
    base = Path.cwd()
    if path is not None:
        try:
            with path.open("rb") as stream:
                if not stat.S_ISREG(os.fstat(stream.fileno()).st_mode):
                    # /dev/zero, a FIFO: reading would never end, or wait for a writer.
                    raise ConfigurationError(f"config file {path}: not a regular file")
                data = stream.read(MAX_CONFIG_BYTES + 1)
            if len(data) > MAX_CONFIG_BYTES:
                raise ConfigurationError(f"config file {path}: over {MAX_CONFIG_BYTES} bytes")
            text = data.decode("utf-8")
        except OSError as exc:
            raise ConfigurationError(f"config file {path}: cannot be read ({exc.strerror})") from None
        except UnicodeDecodeError as exc:
            raise ConfigurationError(f"config file {path}: not UTF-8 (byte {exc.start})") from None
        try:
            # Duplicate keys refused and aliases capped, as in policy files (an outside audit: a
            # second ``require_jti`` or ``trusted_proxies`` silently replaced the first).
            loaded = read_yaml(text).value
        except DuplicateKey as exc:
            raise ConfigurationError(
                f"config file {path}:{exc.line}: duplicate key {exc.key!r} "
                "(YAML would silently keep the last value)"
            ) from None
        except AliasesTooLarge as exc:
            raise ConfigurationError(f"config file {path}: {exc}") from None
        except yaml.YAMLError as exc:
            raise ConfigurationError(f"config file {path}: not valid YAML: {exc}") from None
        except (ValueError, RecursionError) as exc:
            # An integer of thousands of digits (int() refuses it), or nesting deeper than Python's stack.
            raise ConfigurationError(f"config file {path}: not usable YAML ({type(exc).__name__})") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigurationError(f"config file {path}: must be a mapping of settings")
        raw.update(loaded or {})
        base = path.resolve().parent
    from_env = _env_overrides(env)
    raw.update(from_env)
    if overrides:
        raw.update(overrides)

    errors = sorted(jsonschema.Draft202012Validator(_schema()).iter_errors(raw), key=lambda e: list(e.path))
    if errors:
        err = errors[0]
        where = ".".join(str(p) for p in err.absolute_path) or "(top level)"
        top = str(err.absolute_path[0]) if err.absolute_path else None
        if top in from_env and not (overrides and top in overrides):
            # The value came from the environment, not from the file: name the variable.
            raise ConfigurationError(f"STS_{top.upper()}: setting {where}: {err.message}")
        source = f"config file {path}" if path else "settings"
        raise ConfigurationError(f"{source}: setting {where}: {err.message}")

    kwargs: dict[str, Any] = {k: v for k, v in raw.items() if k in _SCALARS}
    for name in _PATH_SETTINGS & kwargs.keys():
        kwargs[name] = _resolve(base, kwargs[name])
    for name in _PATH_SETTINGS - kwargs.keys():
        kwargs[name] = _resolve(base, str(getattr(Settings, name)))
    kwargs["database_url"] = _sqlite_resolved(base, kwargs.get("database_url", "sqlite:///var/sts.sqlite"))
    for name in ("trusted_proxies", "dpop_algorithms"):
        if name in raw:
            kwargs[name] = tuple(raw[name])
    kwargs["issuers"] = tuple(_issuer(base, i) for i in raw.get("issuers", ()))
    kwargs["clients"] = tuple(_client(base, c) for c in raw.get("clients", ()))
    kwargs["transmitters"] = tuple(_transmitter(base, t) for t in raw.get("transmitters", ()))
    kwargs["review"] = _review(raw.get("review") or {})
    kwargs["rate_limits"] = _rate_limits(raw.get("rate_limits") or {})
    kwargs["tracing"] = TracingSettings(**(raw.get("tracing") or {}))
    passphrase = env.get("STS_KEY_PASSPHRASE")
    kwargs["key_passphrase"] = passphrase.encode("utf-8") if passphrase else None
    kwargs["config_file"] = path
    settings = Settings(**kwargs)
    check_settings(settings)
    return settings


def _issuer(base: Path, raw: Mapping[str, Any]) -> IssuerSettings:
    values = dict(raw)
    for key in ("algorithms", "audiences", "token_types", "typ"):
        if key in values:
            values[key] = tuple(values[key])
    if "jwks_file" in values:
        values["jwks_file"] = _resolve(base, values["jwks_file"])
    for key in ("token_review_token_file", "token_review_ca_file"):
        if key in values:
            values[key] = _resolve(base, values[key])
    profile = values.get("profile", "generic")
    if profile == "kubernetes":
        # Clusters may silently extend a projected token's expiry: bound its age ourselves.
        values.setdefault("max_token_age", 3600)
    if profile == "spiffe":
        # JWT-SVID: typ absent, JWT or JOSE.
        values.setdefault("typ", (None, "JWT", "JOSE"))
    return IssuerSettings(**values)


def _client(base: Path, raw: Mapping[str, Any]) -> ClientSettings:
    values = dict(raw)
    for key in ("algorithms", "audiences"):
        if key in values:
            values[key] = tuple(values[key])
    if "jwks_file" in values:
        values["jwks_file"] = _resolve(base, values["jwks_file"])
    return ClientSettings(**values)


def _rate_limits(raw: Mapping[str, Any]) -> RateLimitSettings:
    """The defaults, with each limit the file names replaced (``null`` removes one)."""
    limits = {endpoint: dict(scopes) for endpoint, scopes in DEFAULT_RATE_LIMITS.items()}
    for endpoint in RATE_LIMIT_SCOPES:
        for scope, spec in (raw.get(endpoint) or {}).items():
            if spec is None:
                limits[endpoint].pop(scope, None)
            else:
                requests = int(spec["requests"])
                limits[endpoint][scope] = LimitSettings(
                    requests, float(spec["period"]), int(spec.get("burst", requests))
                )
    return RateLimitSettings(
        enabled=bool(raw.get("enabled", True)),
        ipv4_prefix=int(raw.get("ipv4_prefix", 24)),
        ipv6_prefix=int(raw.get("ipv6_prefix", 56)),
        limits=limits,
        coalesce_refusals=float(raw.get("coalesce_refusals", 10)),
    )


def _transmitter(base: Path, raw: Mapping[str, Any]) -> TransmitterSettings:
    values = dict(raw)
    for key in ("algorithms", "subject_issuers"):
        if key in values:
            values[key] = tuple(values[key])
    if "jwks_file" in values:
        values["jwks_file"] = _resolve(base, values["jwks_file"])
    return TransmitterSettings(**values)


def _review(raw: Mapping[str, Any]) -> ReviewSettings:
    values = dict(raw)
    values["users"] = tuple(ReviewUser(**u) for u in values.get("users", ()))
    return ReviewSettings(**values)
