"""The ``sts`` command meets odd inputs with a message and exit 1 or 2, never a traceback.

Found from outside (every subcommand given non-UTF-8 files, integers of thousands of digits,
nesting deeper than Python's stack, devices, empty values): each of these ended in a traceback.
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from click.testing import CliRunner

from sts.cli import main

NOT_UTF8 = b"issuer: \xff\xfe\n"
HUGE_INT = ("9" * 5000).encode()
DEEP = b"[" * 100_000


#: (name, arguments, files written first, stdin, what the message says); ``@NAME`` is the path of file NAME.
CASES: list[tuple[str, list[str], dict[str, bytes], bytes | None, str]] = [
    ("config not UTF-8", ["--config", "@c.yaml", "config", "check"], {"c.yaml": NOT_UTF8}, None, "not UTF-8"),
    ("config with a huge integer", ["--config", "@c.yaml", "config", "check"],
     {"c.yaml": b"port: " + HUGE_INT}, None, "not usable YAML (ValueError)"),
    # libyaml caps the nesting itself ("not valid YAML: ... exceeded maximum nesting depth"); the
    # pure-Python parser would recurse ("not usable YAML (RecursionError)"): a message either way.
    ("config nested too deep", ["--config", "@c.yaml", "config", "check"], {"c.yaml": DEEP}, None,
     "YAML"),
    ("config that is a device", ["--config", "/dev/zero", "config", "check"], {}, None, "not a regular file"),
    ("config over a megabyte", ["--config", "@c.yaml", "config", "check"], {"c.yaml": b"a" * 2_000_000}, None,
     "over 1048576 bytes"),
    ("policy not UTF-8", ["policy", "check", "@p.yaml"], {"p.yaml": b"version: 1\nrules: \xff\n"}, None,
     "not UTF-8"),
    ("policy with a huge integer", ["policy", "check", "@p.yaml"],
     {"p.yaml": b"version: 1\nrules:\n- name: x\n  max_lifetime: " + HUGE_INT}, None,
     "not usable YAML (ValueError)"),
    ("explain a token not UTF-8", ["policy", "explain", "--token", "@tok"], {"tok": b"\xff\xfe"}, None,
     "--token: not UTF-8"),
    ("explain claims nested too deep", ["policy", "explain", "--claims", "@c.json", "--issuer", "upstream"],
     {"c.json": DEEP}, None, "not a usable JSON object"),
    ("explain claims with a huge int", ["policy", "explain", "--claims", "@c.json", "--issuer", "upstream"],
     {"c.json": b'{"a": ' + HUGE_INT + b"}"}, None, "not a usable JSON object"),
    ("a chosen secret not UTF-8", ["clients", "secret", "--stdin"], {}, b"\xff" * 20 + b"\n", "not UTF-8"),
    ("an empty chosen secret", ["clients", "secret", "--stdin"], {}, b"\n", "at least 15 characters"),
    ("an empty revision", ["db", "upgrade", ""], {}, None, "unknown revision ''"),
    ("a relative revision", ["db", "upgrade", "head+99999999"], {}, None, "unknown revision"),
    ("a host that does not resolve", ["serve", "--host", "\u00e9.invalid", "--port", "1"], {}, None,
     "option --host: setting host: '\u00e9.invalid' is not an IP address"),
    # A name that cannot be IDNA-encoded: a UnicodeError traceback (a review); a name at all is
    # refused with the settings, before anything is created (granian binds addresses only).
    ("a host name IDNA refuses", ["serve", "--host", "a..b", "--port", "19999"], {}, None,
     "option --host: setting host: 'a..b' is not an IP address"),
    ("a host name", ["serve", "--host", "localhost", "--port", "19999"], {}, None,
     "option --host: setting host: 'localhost' is not an IP address"),
    # An address not on this machine was "already in use" (a re-check), and --host was not named.
    ("a host not on this machine", ["serve", "--host", "203.0.113.7", "--port", "19999"], {}, None,
     "option --host and --port: settings host and port: cannot listen on '203.0.113.7' port 19999 "
     "(Cannot assign requested address)"),
    ("a dev issuer port out of range", ["dev", "issuer", "--port", "-1"], {}, None, "not in the range"),
    ("an empty dev issuer URL", ["dev", "token", "kubernetes", "--issuer-url", "", "--key-dir", "@keys"],
     {}, None, "issuer_url must not be empty"),
    # Bytes a shell passes through that are not UTF-8 (Python holds them as surrogates): a
    # traceback from the database driver before.
    ("an audit tail subject not UTF-8", ["audit", "tail", "--subject", "x\udcff\udcfey"], {}, None,
     "--subject is not valid UTF-8"),
    ("an audit query error not UTF-8", ["audit", "query", "--error", "\udcff"], {}, None,
     "--error is not valid UTF-8"),
    # `sts audit verify --jwks`: a RecursionError traceback, and a JSON error naming no file, before.
    ("verify --jwks nested too deep", ["audit", "verify", "--checkpoint", "@cp.jws", "--jwks", "@j.json"],
     {"cp.jws": b"x.y.z\n", "j.json": DEEP}, None, "j.json: not a usable JWK Set (JSON nested too deep)"),
    ("verify --jwks not JSON", ["audit", "verify", "--checkpoint", "@cp.jws", "--jwks", "@j.json"],
     {"cp.jws": b"x.y.z\n", "j.json": b"not json\n"}, None, "j.json: not JSON (Expecting value"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("args", "files", "stdin", "message"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_odd_input_is_a_message_not_a_traceback(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    args: list[str],
    files: dict[str, bytes],
    stdin: bytes | None,
    message: str,
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("STS_CONFIG", raising=False)
    (tmp_path / "policies").mkdir()
    (tmp_path / "sts.yaml").write_text(f"database_url: sqlite:///{tmp_path / 'db.sqlite'}\n")
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    argv = [str(tmp_path / a[1:]) if a.startswith("@") else a for a in args]
    result = CliRunner().invoke(main, argv, input=io.BytesIO(stdin) if stdin is not None else None)
    assert result.exit_code in (1, 2), (result.exit_code, result.output, result.exception)
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert message in result.output, result.output


@pytest.mark.parametrize("args", [["config", "check"], ["keys", "list"]], ids=["config-check", "keys-list"])
def test_a_key_ring_file_that_cannot_be_read_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, args: list[str]
) -> None:
    """``keyring.json`` a directory: a traceback ending in IsADirectoryError before."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("STS_CONFIG", raising=False)
    (tmp_path / "policies").mkdir()
    (tmp_path / "sts.yaml").write_text(
        f"database_url: sqlite:///{tmp_path / 'db.sqlite'}\nkeys_dir: {tmp_path / 'keys'}\n"
    )
    (tmp_path / "keys" / "keyring.json").mkdir(parents=True)
    result = CliRunner().invoke(main, args)
    assert result.exit_code in (1, 2), (result.exit_code, result.output, result.exception)
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "keyring.json" in result.output and "Traceback" not in result.output, result.output
