"""``clients/python`` installs on its own: a workload needs neither Flask nor SQLAlchemy nor the server."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

CLIENT = Path(__file__).resolve().parents[2] / "clients" / "python"

#: Run in a fresh interpreter: these modules cannot be imported at all there.
_BLOCKED_IMPORTS = textwrap.dedent(
    """
    import importlib.abc, sys
    BLOCKED = {"flask", "werkzeug", "sqlalchemy", "redis", "sts", "authlib", "yaml"}

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"blocked: {name}")
            return None

    sys.meta_path.insert(0, Block())
    """
)


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", _BLOCKED_IMPORTS + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_metadata_declares_only_the_workload_dependencies() -> None:
    project = tomllib.loads((CLIENT / "pyproject.toml").read_text())["project"]
    assert project["name"] == "workload-sts-client"
    assert project["license"] == "Apache-2.0"
    names = sorted(dep.split(">")[0].split("<")[0].split("=")[0].strip() for dep in project["dependencies"])
    # urllib3 is requests' own transport, named for the minimum version whose read1 bounds a body read.
    assert names == ["cryptography", "joserfc", "requests", "urllib3"]
    assert [dep.split(">")[0] for dep in project["optional-dependencies"]["flask"]] == ["flask"]
    assert project["scripts"] == {"sts-ci": "sts_client.ci:main"}
    assert (CLIENT / "sts_client" / "py.typed").exists()
    assert (CLIENT / "LICENSE").read_text().strip().startswith("Apache License")


def test_the_library_imports_without_flask_sqlalchemy_or_the_server() -> None:
    result = _run(
        """
        import sts_client, sts_client.verifier, sts_client.workload, sts_client.ci, sts_client.wsgi
        from sts_client import StsAuth, TokenVerifier, CallableAttestation
        auth = StsAuth("https://sts.example.com", "https://api.example.com",
                       attestation=CallableAttestation(lambda: "t"), dpop=True)
        TokenVerifier("https://sts.example.com", "https://api.example.com")
        print("ok", auth.dpop_key.alg)
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok ES256"


def test_the_flask_module_says_which_extra_it_needs() -> None:
    result = _run("import sts_client.flask")
    assert result.returncode != 0
    assert "workload-sts-client[flask]" in result.stderr


@pytest.mark.parametrize(
    "module",
    [
        "verifier",
        "access_token",
        "authorization",
        "workload",
        "workload_tokens",
        "ci",
        "wsgi",
        "dpop",
        "jwks",
        "exchange",
    ],
)
def test_nothing_but_the_flask_module_mentions_flask(module: str) -> None:
    source = (CLIENT / "sts_client" / f"{module}.py").read_text()
    assert "import flask" not in source and "from flask" not in source
