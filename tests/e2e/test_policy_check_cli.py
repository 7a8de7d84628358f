"""``sts policy check FILES``: against the configuration, or ``--standalone`` (issue 13).

The example policies name issuers and clients (``corp-oidc``, ``gitlab``, ``payments-gateway``...)
that the quickstart configuration does not define: checked against it, they are refused with a
hint; ``--standalone`` checks them on their own, with no configuration at all, and still finds
every other kind of mistake.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner, Result

from sts.cli import main

REPO = Path(__file__).resolve().parents[2]
GRANT = {"audiences": ["https://a.example"]}
EXAMPLES = sorted((REPO / "policies" / "examples").glob("*.yaml"))


@pytest.fixture
def elsewhere(tmp_path: Path) -> Iterator[Path]:
    """An empty working directory (no ./sts.yaml), and no STS_* variables."""
    cwd = Path.cwd()
    os.chdir(tmp_path)
    try:
        yield tmp_path
    finally:
        os.chdir(cwd)


def sts(*args: str) -> Result:
    clean = {name: None for name in os.environ if name.startswith("STS_")}
    return CliRunner().invoke(main, list(args), env=clean)


def test_the_readme_names_the_command() -> None:
    assert "sts policy check --standalone policies/examples/*.yaml" in (REPO / "README.md").read_text()


def test_the_examples_checked_on_their_own(elsewhere: Path) -> None:
    result = sts("policy", "check", "--standalone", *map(str, EXAMPLES))
    assert result.exit_code == 0, result.output
    rules = [rule["name"] for path in EXAMPLES for rule in yaml.safe_load(path.read_text())["rules"]]
    assert len(EXAMPLES) == 5 and len(rules) == 9
    assert [line.split(": ")[-1] for line in result.output.splitlines() if line.startswith("ok  ")] == rules
    assert f"{len(rules)} rule(s) in {len(EXAMPLES)} file(s): no problems" in result.output
    assert (
        "standalone: issuers corp-oidc, github-actions, gitlab, kubernetes, spiffe and clients "
        "payments-gateway taken as defined; a start needs them configured"
    ) in result.output


def test_against_the_quickstart_configuration_the_examples_are_refused_with_a_hint() -> None:
    result = sts("--config", str(REPO / "sts.yaml"), "policy", "check", *map(str, EXAMPLES))
    assert result.exit_code == 1
    assert "generic-oidc.yaml:23: rule 'corp-reports-export': unknown issuer 'corp-oidc'" in result.output
    assert "name it with --config, or check them on their own with --standalone" in result.output


@pytest.mark.parametrize(
    ("rule", "reason"),
    [
        ({"condition": "claims.ref ==", "grant": {"audiences": ["https://a.example"]}}, "condition"),
        (
            {"subject": "x", "grant": {"audiences": ["https://a.example"], "max_lifetime": 86400}},
            "max_lifetime",
        ),
        ({"subject": "x", "grant": {"audiences": ["https://a.example"]}, "colour": "red"}, "colour"),
        (
            {"subject": "x", "grant": {"audiences": ["https://a.example"]}, "clients": ["c"]},
            "clients requires",
        ),
    ],
)
def test_standalone_still_finds_everything_else(
    elsewhere: Path, rule: dict[str, object], reason: str
) -> None:
    bad = elsewhere / "bad.yaml"
    rule = {"name": "bad-rule", "issuer": "anywhere", "require_client_authentication": False, **rule}
    bad.write_text(yaml.safe_dump({"version": 1, "rules": [rule]}))
    result = sts("policy", "check", "--standalone", str(bad))
    assert result.exit_code == 1, result.output
    assert result.output.startswith(f"Error: {bad}") and reason in result.output


def test_standalone_needs_files(elsewhere: Path) -> None:
    result = sts("policy", "check", "--standalone")
    assert result.exit_code == 2 and "--standalone checks the FILES given" in result.output
