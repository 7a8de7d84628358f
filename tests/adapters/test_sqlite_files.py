"""The SQLite database's files: nothing but the database's own files is changed, and files another
user may have planted are refused (sts.adapters.sql.sqlite_files).

An outside audit had another user who may write in the database's directory plant
``sts.sqlite-shm`` as a symbolic link to a file of root's: a read-only ``sts db current`` run by
root made that file ``0600``.  A ``database_url`` naming a file that is no database had its mode
changed before SQLite refused it.  The tests run as root: another user's files are made with
``os.chown`` (uid 65534, ``nobody``).
"""

from __future__ import annotations

import json
import os
import sqlite3
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner

from sts.adapters.sql.engines import make_engine
from sts.adapters.sql.sqlite_files import SQLITE_HEADER
from sts.cli import main
from sts.errors import ConfigurationError

OTHER_UID = 65534


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


@pytest.fixture
def shared_directory(tmp_path: Path) -> Path:
    """A directory every user may write in (the database's directory in the audit's finding)."""
    directory = tmp_path / "db"
    directory.mkdir()
    directory.chmod(0o777)
    return directory


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    """A file of this process's user (root) that has nothing to do with the database."""
    path = tmp_path / "victim"
    path.write_text("secret-but-public\n")
    path.chmod(0o644)
    return path


def _wal_database(path: Path) -> None:
    """A SQLite database in WAL mode, 0644 (an older version's, or one made by hand)."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("CREATE TABLE t (x)")
    conn.close()
    path.chmod(0o644)


@pytest.mark.parametrize("suffix", ["-shm", "-wal", ""])
def test_a_link_in_place_of_a_database_file_is_refused_and_its_target_left_alone(
    shared_directory: Path, victim: Path, suffix: str
) -> None:
    database = shared_directory / "sts.sqlite"
    if suffix:
        _wal_database(database)
    Path(f"{database}{suffix}").symlink_to(victim)  # planted by another user
    with pytest.raises(ConfigurationError, match=rf"{database}{suffix} is a symbolic link: refused"):
        make_engine(f"sqlite:///{database}")
    assert _mode(victim) == 0o644
    assert victim.read_text() == "secret-but-public\n"


def test_a_planted_link_refuses_a_fresh_database_before_creating_it(
    shared_directory: Path, victim: Path
) -> None:
    database = shared_directory / "sts.sqlite"
    Path(f"{database}-shm").symlink_to(victim)
    with pytest.raises(ConfigurationError, match="symbolic link"):
        make_engine(f"sqlite:///{database}")
    assert not database.exists() and _mode(victim) == 0o644


@pytest.mark.parametrize("suffix", ["-shm", "-wal", ""])
def test_another_users_file_in_a_shared_directory_is_refused_and_left_alone(
    shared_directory: Path, suffix: str
) -> None:
    database = shared_directory / "sts.sqlite"
    _wal_database(database)
    planted = Path(f"{database}{suffix}")
    if suffix:
        planted.write_bytes(b"")
    planted.chmod(0o666)
    os.chown(planted, OTHER_UID, OTHER_UID)
    with pytest.raises(ConfigurationError, match=rf"{planted} belongs to uid {OTHER_UID}"):
        make_engine(f"sqlite:///{database}")
    assert _mode(planted) == 0o666
    assert planted.stat().st_uid == OTHER_UID


def test_a_hard_link_in_a_shared_directory_is_refused(shared_directory: Path, victim: Path) -> None:
    database = shared_directory / "sts.sqlite"
    _wal_database(database)
    os.link(victim, f"{database}-shm")
    with pytest.raises(ConfigurationError, match="hard links"):
        make_engine(f"sqlite:///{database}")
    assert _mode(victim) == 0o644


def test_a_file_that_is_no_database_is_refused_and_its_mode_kept(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("hello\n")
    path.chmod(0o644)
    with pytest.raises(ConfigurationError, match=rf"{path} is not a SQLite database"):
        make_engine(f"sqlite:///{path}")
    assert _mode(path) == 0o644
    assert path.read_text() == "hello\n"


@pytest.mark.usefixtures("permissive_umask")
def test_another_users_database_in_its_own_directory_is_opened_but_not_changed(tmp_path: Path) -> None:
    """Root running a command on the service account's database, in that account's directory."""
    directory = tmp_path / "service"
    directory.mkdir(mode=0o755)
    database = directory / "sts.sqlite"
    _wal_database(database)
    os.chown(directory, OTHER_UID, OTHER_UID)
    os.chown(database, OTHER_UID, OTHER_UID)
    engine = make_engine(f"sqlite:///{database}")
    try:
        with engine.connect() as conn:
            assert conn.exec_driver_sql("SELECT count(*) FROM t").scalar() == 0
    finally:
        engine.dispose()
    assert _mode(database) == 0o644  # the owner's to restrict, not root's
    assert database.stat().st_uid == OTHER_UID
    assert database.read_bytes().startswith(SQLITE_HEADER)


def test_sts_db_current_names_a_planted_link_and_changes_nothing(
    shared_directory: Path, victim: Path
) -> None:
    database = shared_directory / "sts.sqlite"
    _wal_database(database)
    Path(f"{database}-shm").symlink_to(victim)
    config = shared_directory.parent / "sts.yaml"
    config.write_text(json.dumps({"database_url": f"sqlite:///{database}"}))
    result = CliRunner().invoke(
        main, ["--config", str(config), "db", "current"], env={"STS_DATABASE_URL": None}
    )
    assert result.exit_code == 1
    assert result.output == (
        f"Error: setting database_url: database file {database}-shm is a symbolic link: refused "
        "(another user who may write in its directory could have made it); name the file itself "
        "in database_url, or remove the link\n"
    )
    assert _mode(victim) == 0o644 and _mode(database) == 0o644


@pytest.mark.parametrize("suffix", [".ledger-mark", ".state-generation"])
def test_the_files_beside_the_database_are_never_opened_through_a_link(
    shared_directory: Path, victim: Path, tmp_path: Path, suffix: str
) -> None:
    """The ledger mark and the subject states' change counter were opened as they came: a link a
    member of the directory's group planted made ``sts audit tail`` run by root overwrite a file of
    root's with zeros, and ``sts revoke`` with random bytes; a link to no file made one (an outside
    re-check).  They are refused as the database's own files are, and their target left alone."""
    from sts.adapters.sql.ledger_mark import LedgerMark
    from sts.adapters.sql.subject_state import ChangeCounter

    opener = LedgerMark if suffix == ".ledger-mark" else ChangeCounter
    database = shared_directory / "sts.sqlite"
    (shared_directory / f"sts.sqlite{suffix}").symlink_to(victim)
    with pytest.raises(ConfigurationError, match="symbolic link"):
        opener(Path(f"{database}{suffix}"))
    assert victim.read_text() == "secret-but-public\n"
    missing = tmp_path / "made-through-the-link"
    (shared_directory / f"sts.sqlite{suffix}").unlink()
    (shared_directory / f"sts.sqlite{suffix}").symlink_to(missing)
    with pytest.raises(ConfigurationError, match="symbolic link"):
        opener(Path(f"{database}{suffix}"))
    assert not missing.exists()
    # Another user's file there is refused too; this process's own is used.
    (shared_directory / f"sts.sqlite{suffix}").unlink()
    planted = shared_directory / f"sts.sqlite{suffix}"
    planted.write_bytes(b"\0" * 16)
    os.chown(planted, OTHER_UID, OTHER_UID)
    with pytest.raises(ConfigurationError, match="belongs to uid"):
        opener(planted)
    planted.unlink()
    opener(planted)
    assert _mode(planted) == 0o600 and planted.stat().st_uid == os.geteuid()


def test_sts_audit_tail_refuses_a_planted_ledger_mark_in_one_line(
    shared_directory: Path, victim: Path, tmp_path: Path
) -> None:
    database = shared_directory / "sts.sqlite"
    config = tmp_path / "sts.yaml"
    config.write_text(f"database_url: sqlite:///{database}\nkeys_dir: {tmp_path / 'keys'}\n")
    (tmp_path / "policies").mkdir()
    assert CliRunner().invoke(main, ["--config", str(config), "db", "upgrade"]).exit_code == 0
    (shared_directory / "sts.sqlite.ledger-mark").unlink(missing_ok=True)
    (shared_directory / "sts.sqlite.ledger-mark").symlink_to(victim)
    result = CliRunner().invoke(main, ["--config", str(config), "audit", "tail"])
    assert result.exit_code != 0 and "symbolic link" in result.output, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert victim.read_text() == "secret-but-public\n"


def test_files_made_beside_the_database_by_root_go_to_the_databases_owner(tmp_path: Path) -> None:
    """Root running `sts audit tail` or `sts revoke` first made ``.ledger-mark`` and
    ``.state-generation`` root's: the service, as its own user, could not open them and ran with
    its ledger mark off, while ready (an outside re-check).  As SQLite does for ``-wal`` and
    ``-shm``, a file root makes there goes to the database file's owner."""
    from sts.adapters.sql.ledger_mark import LedgerMark
    from sts.adapters.sql.subject_state import ChangeCounter

    directory = tmp_path / "service"
    directory.mkdir(mode=0o700)
    database = directory / "sts.sqlite"
    sqlite3.connect(database).close()
    os.chown(directory, OTHER_UID, OTHER_UID)
    os.chown(database, OTHER_UID, OTHER_UID)
    LedgerMark(Path(f"{database}.ledger-mark"))
    ChangeCounter(Path(f"{database}.state-generation"))
    for suffix in (".ledger-mark", ".state-generation"):
        made = directory / f"sts.sqlite{suffix}"
        assert (made.stat().st_uid, made.stat().st_gid) == (OTHER_UID, OTHER_UID), suffix
        assert _mode(made) == 0o600
    # The database's owner's own files are reused as they are.
    LedgerMark(Path(f"{database}.ledger-mark"))
