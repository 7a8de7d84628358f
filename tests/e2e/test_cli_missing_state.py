"""Commands that read or repair state create none: no database, no directories, no signing keys.

An outside audit pointed the commands at a SQLite path that does not exist (a typo, the wrong
``--config``): ``sts audit tail`` and ``sts audit verify`` exited 0 ("ok: 0 record(s)") after
creating the directories and a new, migrated database there, and ``sts revoke subject``
"revoked" into it, creating a fresh signing key ring too.  ``sts baseline show`` and ``reset``
took an ISSUER_NAME no issuer has, which ``sts revoke subject`` refuses.  Only ``sts serve`` and
``sts db upgrade`` create the database (README, Command line).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner, Result

from sts.adapters.keyring import KeyRing
from sts.cli import main

ISSUER = "https://sts.example.com"


def write_config(tmp_path: Path, database: Path) -> Path:
    (tmp_path / "policies").mkdir(exist_ok=True)
    settings: dict[str, Any] = {
        "issuer": ISSUER,
        "database_url": f"sqlite:///{database}",
        "keys_dir": str(tmp_path / "keys"),
        "policies_dir": str(tmp_path / "policies"),
        "issuers": [
            {
                "name": "github-actions",
                "issuer": "https://token.actions.githubusercontent.com",
                "jwks_uri": "https://token.actions.githubusercontent.com/.well-known/jwks",
                "audiences": [ISSUER],
            }
        ],
    }
    path = tmp_path / "sts.yaml"
    path.write_text(yaml.safe_dump(settings))
    return path


def sts(config: Path, *args: str) -> Result:
    return CliRunner().invoke(main, ["--config", str(config), *args], env={"STS_DATABASE_URL": None})


READING_COMMANDS = {
    "audit tail": ["audit", "tail"],
    "audit query": ["audit", "query"],
    "audit export": ["audit", "export"],
    "audit verify": ["audit", "verify"],
    "audit checkpoint": ["audit", "checkpoint"],
    "audit summarize": ["audit", "summarize"],
    "audit prune": ["audit", "prune", "--older-than", "1", "--delete"],
    "db current": ["db", "current"],
    "revoke subject": ["revoke", "subject", "github-actions", "repo:acme/app"],
    "baseline show": ["baseline", "show", "github-actions|repo:acme/app"],
    "baseline reset": ["baseline", "reset", "github-actions|repo:acme/app"],
}


@pytest.mark.parametrize("args", READING_COMMANDS.values(), ids=READING_COMMANDS.keys())
def test_a_database_that_does_not_exist_is_one_line_and_nothing_is_created(
    tmp_path: Path, args: list[str]
) -> None:
    KeyRing.open(tmp_path / "keys", now=time.time())  # `audit checkpoint` signs before it reads
    keys_before = sorted(p.name for p in (tmp_path / "keys").iterdir())
    database = tmp_path / "no" / "such" / "dir" / "sts.sqlite"
    result = sts(write_config(tmp_path, database), *args)
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.output == (
        f"Error: setting database_url: no database at {database} "
        "(`sts db upgrade` or `sts serve` creates it)\n"
    )
    assert not (tmp_path / "no").exists()
    assert sorted(p.name for p in (tmp_path / "keys").iterdir()) == keys_before


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (
            ["revoke", "subject", "github-actions", "repo:acme/app"],
            "revoked tokens issued to github-actions|",
        ),
        (["baseline", "show", "github-actions|repo:acme/app"], '"identity": "github-actions|repo:acme/app"'),
        (["baseline", "reset", "self|repo:acme/app"], "reset the baseline of self|repo:acme/app"),
        # A re-exchange's baseline: our tokens first issued for that issuer's workload.
        (
            ["baseline", "show", "self:github-actions|repo:acme/app"],
            '"identity": "self:github-actions|repo:acme/app"',
        ),
    ],
    ids=["revoke", "baseline-show", "baseline-reset", "baseline-show-re-exchange"],
)
def test_revoke_and_baseline_work_on_the_database_db_upgrade_made_and_create_no_signing_keys(
    tmp_path: Path, args: list[str], said: str
) -> None:
    """They change the shared state only: the key ring is the service's to create."""
    database = tmp_path / "new" / "sts.sqlite"
    config = write_config(tmp_path, database)
    created = sts(config, "db", "upgrade")  # creates the database, directories included
    assert created.exit_code == 0 and database.is_file(), created.output
    result = sts(config, *args)
    assert result.exit_code == 0, result.output
    assert said in result.output
    assert not (tmp_path / "keys").exists()


@pytest.mark.parametrize("command", ["show", "accept", "reset"])
@pytest.mark.parametrize("issuer_name", ["github", "*", "GitHub-Actions", "self:github", "self:self"])
def test_baseline_refuses_an_issuer_name_that_no_issuer_has(
    tmp_path: Path, command: str, issuer_name: str
) -> None:
    """As ``sts revoke subject`` does: exit 2, and nothing opened."""
    config = write_config(tmp_path, tmp_path / "sts.sqlite")
    result = sts(config, "baseline", command, f"{issuer_name}|repo:acme/app")
    assert result.exit_code == 2, result.output
    assert (
        f"Invalid value for IDENTITY: {issuer_name!r} is not a configured issuer; "
        "choose one of 'github-actions', 'self'"
    ) in result.output
    assert not (tmp_path / "sts.sqlite").exists() and not (tmp_path / "keys").exists()


def test_baseline_takes_the_re_exchange_identity_of_an_issuer_removed_from_the_settings(
    tmp_path: Path,
) -> None:
    """A token of ours outlives its issuer's removal from the settings: its re-exchanges keep their
    baseline under ``self:<that issuer>``, and a drift refusal tells the operator to accept it there
    (an outside re-check had the command refuse the name).  Taken when the store holds something
    under it; a name nothing is held under is still refused."""
    from sts.cli.database import open_shared_state
    from sts.core.baseline import Baseline
    from sts.settings.load import load_settings

    config = write_config(tmp_path, tmp_path / "sts.sqlite")
    assert sts(config, "db", "upgrade").exit_code == 0
    store = open_shared_state(load_settings(config)).baselines
    store.save("self:gone|repo:acme/app", Baseline(count=4), 3600)
    shown = sts(config, "baseline", "show", "self:gone|repo:acme/app")
    assert shown.exit_code == 0 and '"identity": "self:gone|repo:acme/app"' in shown.output, shown.output
    assert sts(config, "baseline", "reset", "self:gone|repo:acme/app").exit_code == 0
    refused = sts(config, "baseline", "show", "self:never|repo:acme/app")
    assert refused.exit_code == 2 and "'self:never' is not a configured issuer" in refused.output


def test_baseline_of_a_removed_issuer_says_when_the_store_cannot_answer(tmp_path: Path) -> None:
    """A ``self:<issuer>`` name not in the settings is looked up in the store: a store that cannot
    answer says so (exit 1), as for a configured name; it was reported as "not a configured issuer"
    (a re-check)."""
    config = write_config(tmp_path, tmp_path / "sts.sqlite")
    settings = yaml.safe_load(config.read_text())
    settings["database_url"] = "postgresql+psycopg://postgres@127.0.0.1:1/nowhere"
    config.write_text(yaml.safe_dump(settings))
    for name in ("self:github-actions", "self:gone"):
        result = sts(config, "baseline", "show", f"{name}|repo:acme/app")
        assert result.exit_code == 1, (name, result.output)
        assert (
            "the database is unavailable" in result.output and "not a configured issuer" not in result.output
        )


@pytest.mark.parametrize("name", ["self:github-actions", "self:gone"])
def test_a_refused_database_file_is_one_line_for_every_name(tmp_path: Path, name: str) -> None:
    """A SQLite file the service refuses (a symbolic link in its place): one line naming the
    setting, for a removed issuer's name too (a review: a traceback there)."""
    real = tmp_path / "real.sqlite"
    config = write_config(tmp_path, real)
    assert sts(config, "db", "upgrade").exit_code == 0
    link = tmp_path / "sts.sqlite"
    link.symlink_to(real)
    config = write_config(tmp_path, link)
    result = sts(config, "baseline", "show", f"{name}|repo:acme/app")
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code == 1 and "setting database_url" in result.output, result.output
