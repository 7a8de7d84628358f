"""The service's key ring: files on disk, RFC 7638 kids, publish-before-use rotation, reloads."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import re
import stat
from collections.abc import Callable
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier
from pathlib import Path
from typing import Any, cast

import pytest
from joserfc import jwt
from joserfc.errors import BadSignatureError, SecurityWarning, UnsupportedAlgorithmError
from joserfc.jwk import ECKey, KeySet, KeySetSerialization, thumbprint

from sts.adapters.keyring import KeyRing
from sts.adapters.keyring_files import check_creatable
from sts.adapters.signing_keys import SUPPORTED_ALGORITHMS
from sts.core.key_rotation import ROTATION_SKEW_SECONDS, KeyEntry, KeyRotationRefused
from sts.core.ports import Signer
from sts.errors import ConfigurationError

NOW = 1_700_000_000.0
PASSPHRASE = b"correct horse battery staple"
# RFC 7517 §9.2 / RFC 7518 §6: members that only a private JWK may carry.
PRIVATE_JWK_MEMBERS = {"d", "p", "q", "dp", "dq", "qi", "oth", "k"}


@pytest.fixture
def key_dir(tmp_path: Path) -> Path:
    return tmp_path / "keys"


def _by_state(ring: KeyRing) -> dict[str, list[KeyEntry]]:
    grouped: dict[str, list[KeyEntry]] = {"active": [], "next": [], "retired": []}
    for entry in ring.entries():
        grouped[entry.state].append(entry)
    return grouped


def _sign(ring: KeyRing, sub: str = "workload") -> str:
    signer: Signer = ring.signer()  # mypy checks that KeySigner satisfies the port
    return signer.sign({"typ": "at+jwt"}, {"sub": sub, "iat": int(NOW)})


def _verify(token: str, jwks: dict[str, Any], alg: str = "ES256") -> jwt.Token:
    return jwt.decode(token, KeySet.import_key_set(cast(KeySetSerialization, jwks)), algorithms=[alg])


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_first_open_creates_active_and_next_with_private_file_modes(key_dir: Path) -> None:
    ring = KeyRing.open(key_dir, now=NOW)

    states = _by_state(ring)
    assert len(states["active"]) == 1
    assert len(states["next"]) == 1
    assert states["retired"] == []
    active, upcoming = states["active"][0], states["next"][0]
    assert active.kid != upcoming.kid
    assert active.alg == upcoming.alg == "ES256"
    assert active.created_at == active.activated_at == NOW
    assert upcoming.activated_at is None

    assert _mode(key_dir) == 0o700
    pems = sorted(key_dir.glob("*.pem"))
    assert [p.stem for p in pems] == sorted([active.kid, upcoming.kid])
    for path in [*pems, key_dir / "keyring.json"]:
        assert _mode(path) == 0o600, path
    assert not list(key_dir.glob("*.tmp")), "temporary files must not be left behind"
    assert ring.signer().kid == active.kid


def test_existing_directory_is_restricted_to_owner(tmp_path: Path) -> None:
    loose = tmp_path / "loose"
    loose.mkdir()
    loose.chmod(0o755)
    KeyRing.open(loose, now=NOW)
    assert _mode(loose) == 0o700


#: Another local user (``nobody``): the tests run as root and give it files with os.chown.
OTHER_UID = 65534


def test_a_key_directory_of_another_user_is_refused_and_left_alone(key_dir: Path) -> None:
    """An outside audit: another user made ``keys_dir`` before the first start; the service only
    restricted its mode, wrote its keys there, and the owner then swapped in a ring of its own."""
    key_dir.mkdir(mode=0o777)
    key_dir.chmod(0o777)
    os.chown(key_dir, OTHER_UID, OTHER_UID)
    refused = rf"key directory {key_dir} belongs to uid {OTHER_UID}, neither this service's user"
    with pytest.raises(ConfigurationError, match=refused):
        KeyRing.open(key_dir, now=NOW)
    assert _mode(key_dir) == 0o777 and list(key_dir.iterdir()) == []
    with pytest.raises(ConfigurationError, match=refused):
        check_creatable(key_dir)  # sts config check says what a start would
    with pytest.raises(ConfigurationError, match=refused):
        KeyRing.open(key_dir, create=False, now=NOW)


def test_a_ring_swapped_in_by_another_user_is_refused(key_dir: Path) -> None:
    server = KeyRing.open(key_dir, now=NOW, check_interval=5)
    kid = server.signer().kid
    metadata = key_dir / "keyring.json"
    swapped = key_dir / "swapped.json"
    swapped.write_bytes(metadata.read_bytes())
    os.chown(swapped, OTHER_UID, OTHER_UID)
    swapped.replace(metadata)
    refused = rf"key ring file {metadata} belongs to uid {OTHER_UID}"
    with pytest.raises(ConfigurationError, match=refused):
        KeyRing.open(key_dir, create=False, now=NOW)
    assert server.reload_if_changed(NOW + 5) is False  # the running service keeps its keys
    assert server.signer().kid == kid and re.search(refused, str(server.reload_problem))


def test_key_files_must_be_the_services_or_roots_as_in_a_kubernetes_secret(
    key_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Secret volume: root's files, 0644, behind links into ``..data``; the service runs as
    another user (here uid 10001, as in the image).  Root's files load; another user's do not."""
    KeyRing.open(key_dir, now=NOW)
    secret = tmp_path / "secret"
    data = secret / "..2024_01_01_00_00_00.000000001"
    data.mkdir(parents=True)
    names = [path.name for path in key_dir.iterdir() if not path.name.startswith(".")]
    for name in names:
        (data / name).write_bytes((key_dir / name).read_bytes())
        (data / name).chmod(0o644)
        (secret / name).symlink_to(Path("..data") / name)
    (secret / "..data").symlink_to(data.name)
    monkeypatch.setattr(os, "geteuid", lambda: 10001)
    ring = KeyRing.open(secret, create=False, now=NOW)
    assert {e.kid for e in ring.entries()} == {
        name.removesuffix(".pem") for name in names if name != "keyring.json"
    }
    pem = next(data.glob("*.pem"))
    os.chown(pem, OTHER_UID, OTHER_UID)
    with pytest.raises(ConfigurationError, match=rf"key file {secret / pem.name} belongs to uid {OTHER_UID}"):
        KeyRing.open(secret, create=False, now=NOW)


def test_kid_is_the_rfc7638_thumbprint(key_dir: Path) -> None:
    ring = KeyRing.open(key_dir, now=NOW)
    for entry in ring.entries():
        private = ECKey.import_key((key_dir / f"{entry.kid}.pem").read_bytes())
        assert entry.kid == private.thumbprint()
    for jwk in ring.public_jwks()["keys"]:
        assert jwk["kid"] == ECKey.import_key(jwk).thumbprint()
        # RFC 7638 §3.2: only the required members of an EC key are hashed.
        assert jwk["kid"] == thumbprint({m: jwk[m] for m in ("crv", "kty", "x", "y")})


def test_public_jwks_has_no_private_members_and_publishes_next(key_dir: Path) -> None:
    ring = KeyRing.open(key_dir, now=NOW)
    jwks = ring.public_jwks()

    assert {k["kid"] for k in jwks["keys"]} == {e.kid for e in ring.entries()}
    assert _by_state(ring)["next"][0].kid in {k["kid"] for k in jwks["keys"]}
    for jwk in jwks["keys"]:
        assert PRIVATE_JWK_MEMBERS.isdisjoint(jwk), jwk.keys()
        assert jwk["use"] == "sig"
        assert jwk["alg"] == "ES256"
        assert jwk["kty"] == "EC"
    # Callers get a copy: changing it does not change what is served.
    jwks["keys"].clear()
    assert len(ring.public_jwks()["keys"]) == 2


def test_signed_token_verifies_with_the_published_jwks(key_dir: Path) -> None:
    ring = KeyRing.open(key_dir, now=NOW)
    signer = ring.signer()
    token = signer.sign({"typ": "at+jwt", "alg": "none", "kid": "forged"}, {"sub": "workload"})

    decoded = _verify(token, ring.public_jwks())
    assert decoded.claims == {"sub": "workload"}
    # The signer sets alg and kid itself, whatever the caller put in the header.
    assert decoded.header == {"typ": "at+jwt", "alg": "ES256", "kid": signer.kid}
    assert signer.kid == _by_state(ring)["active"][0].kid
    assert "kid=" in repr(signer) and "BEGIN" not in repr(signer)

    tampered = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
    with pytest.raises(BadSignatureError):
        _verify(tampered, ring.public_jwks())
    # verification_keys() is the same published set, ready for joserfc.
    assert jwt.decode(token, ring.verification_keys(), algorithms=["ES256"]).claims["sub"] == "workload"


def test_rotate_promotes_the_already_published_next_key(key_dir: Path) -> None:
    ring = KeyRing.open(key_dir, now=NOW)
    jwks_before = ring.public_jwks()
    old_active = _by_state(ring)["active"][0]
    old_next = _by_state(ring)["next"][0]
    token_before = _sign(ring, "before")

    rotated_at = NOW + 3600
    new_active = ring.rotate(rotated_at, max_token_lifetime=600, min_published=1800)

    assert new_active.kid == old_next.kid
    assert new_active.activated_at == rotated_at
    states = _by_state(ring)
    assert [e.kid for e in states["active"]] == [old_next.kid]
    assert [e.kid for e in states["retired"]] == [old_active.kid]
    retired = states["retired"][0]
    assert retired.retired_at == rotated_at
    assert retired.publish_until == rotated_at + 600 + ROTATION_SKEW_SECONDS
    fresh_next = states["next"][0]
    assert fresh_next.kid not in {old_active.kid, old_next.kid}
    assert fresh_next.created_at == rotated_at

    jwks_after = ring.public_jwks()
    assert {k["kid"] for k in jwks_after["keys"]} == {old_active.kid, old_next.kid, fresh_next.kid}
    # Overlap: a token signed before the rotation still verifies.
    assert _verify(token_before, jwks_after).header["kid"] == old_active.kid
    # Publish-before-use: a token signed after the rotation verifies with a JWKS
    # a relying party fetched *before* the rotation.
    token_after = _sign(ring, "after")
    assert _verify(token_after, jwks_before).header["kid"] == old_next.kid


def test_rotate_refuses_a_next_key_published_too_briefly_unless_forced(key_dir: Path) -> None:
    ring = KeyRing.open(key_dir, now=NOW)
    active_kid = ring.signer().kid
    metadata_before = (key_dir / "keyring.json").read_bytes()

    with pytest.raises(KeyRotationRefused, match="published for 60 s"):
        ring.rotate(NOW + 60, max_token_lifetime=600, min_published=300)
    assert ring.signer().kid == active_kid
    assert (key_dir / "keyring.json").read_bytes() == metadata_before
    assert len(list(key_dir.glob("*.pem"))) == 2

    forced = ring.rotate(NOW + 60, max_token_lifetime=600, min_published=300, force=True)
    assert forced.kid != active_kid
    assert ring.signer().kid == forced.kid


def test_rotate_refuses_negative_lifetimes(key_dir: Path) -> None:
    ring = KeyRing.open(key_dir, now=NOW)
    with pytest.raises(ValueError, match="negative"):
        ring.rotate(NOW + 10, max_token_lifetime=-1)


def test_prune_removes_retired_keys_only_after_publish_until(key_dir: Path) -> None:
    ring = KeyRing.open(key_dir, now=NOW)
    old_active = ring.signer().kid
    ring.rotate(NOW + 100, max_token_lifetime=300)
    publish_until = NOW + 100 + 300 + ROTATION_SKEW_SECONDS

    assert ring.prune(publish_until - 1) == []
    assert (key_dir / f"{old_active}.pem").exists()
    assert old_active in {k["kid"] for k in ring.public_jwks(publish_until - 1)["keys"]}
    # Past its publication, and not yet pruned: the ring holds it, it is no longer published.
    assert old_active not in {k["kid"] for k in ring.public_jwks(publish_until)["keys"]}
    assert old_active not in {k.kid for k in ring.verification_keys(publish_until).keys}
    assert old_active in {k["kid"] for k in ring.public_jwks()["keys"]}  # (checkpoints: every key)
    assert old_active in {e.kid for e in ring.entries()}

    pruned = ring.prune(publish_until)
    assert [e.kid for e in pruned] == [old_active]
    assert not (key_dir / f"{old_active}.pem").exists()
    assert old_active not in {k["kid"] for k in ring.public_jwks()["keys"]}
    remaining = _by_state(ring)
    assert len(remaining["active"]) == 1 and len(remaining["next"]) == 1 and remaining["retired"] == []
    assert len(list(key_dir.glob("*.pem"))) == 2


def test_encrypted_at_rest_round_trip(key_dir: Path) -> None:
    ring = KeyRing.open(key_dir, passphrase=PASSPHRASE, now=NOW)
    for path in key_dir.glob("*.pem"):
        content = path.read_bytes()
        assert b"ENCRYPTED" in content
        assert PASSPHRASE not in content

    reopened = KeyRing.open(key_dir, passphrase=PASSPHRASE, create=False, now=NOW)
    assert [e.kid for e in reopened.entries()] == [e.kid for e in ring.entries()]
    assert _verify(_sign(reopened), ring.public_jwks()).claims["sub"] == "workload"
    # Keys created by a rotation are encrypted too.
    reopened.rotate(NOW + 10, max_token_lifetime=60)
    assert all(b"ENCRYPTED" in p.read_bytes() for p in key_dir.glob("*.pem"))


def test_wrong_or_missing_passphrase_is_a_configuration_error(key_dir: Path) -> None:
    KeyRing.open(key_dir, passphrase=PASSPHRASE, now=NOW)

    with pytest.raises(ConfigurationError, match="wrong passphrase") as wrong:
        KeyRing.open(key_dir, passphrase=b"not the passphrase", create=False, now=NOW)
    with pytest.raises(ConfigurationError, match="encrypted but no passphrase") as missing:
        KeyRing.open(key_dir, create=False, now=NOW)
    # create=True must not paper over it by making new keys either.
    with pytest.raises(ConfigurationError, match="encrypted but no passphrase"):
        KeyRing.open(key_dir, now=NOW)
    for message in (str(wrong.value), str(missing.value)):
        assert "BEGIN" not in message and "not the passphrase" not in message
    assert len(list(key_dir.glob("*.pem"))) == 2


def test_unencrypted_key_with_a_passphrase_configured_loads_with_a_warning(
    key_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    KeyRing.open(key_dir, now=NOW)
    with caplog.at_level(logging.WARNING, logger="sts.adapters.keyring"):
        ring = KeyRing.open(key_dir, passphrase=PASSPHRASE, create=False, now=NOW)
    assert any("not encrypted at rest" in r.getMessage() for r in caplog.records)
    assert _verify(_sign(ring), ring.public_jwks()).claims["sub"] == "workload"


def test_empty_passphrase_is_refused(key_dir: Path) -> None:
    with pytest.raises(ConfigurationError, match="must not be empty"):
        KeyRing.open(key_dir, passphrase=b"", now=NOW)


def test_open_without_create_on_an_empty_directory_fails(key_dir: Path) -> None:
    key_dir.mkdir()
    with pytest.raises(ConfigurationError, match="no key ring"):
        KeyRing.open(key_dir, create=False, now=NOW)
    assert not (key_dir / "keyring.json").exists()


def test_key_files_without_their_ring_are_never_replaced_by_a_new_one(key_dir: Path) -> None:
    """A lost or moved keyring.json beside its keys: a new ring would sign with keys no resource
    server knows, cut off every token, and ``keys prune`` delete the old keys (an outside audit
    had ``sts keys list`` create one).  Creating refuses; the key files stay."""
    KeyRing.open(key_dir, now=NOW)
    kept = sorted(p.name for p in key_dir.glob("*.pem"))
    (key_dir / "keyring.json").rename(key_dir.parent / "keyring.json.moved")
    for create in (True, False):
        with pytest.raises(ConfigurationError, match=r"holds key files .* but no keyring.json: restore it"):
            KeyRing.open(key_dir, create=create, now=NOW)
    assert sorted(p.name for p in key_dir.glob("*.pem")) == kept
    assert not (key_dir / "keyring.json").exists()
    (key_dir.parent / "keyring.json.moved").rename(key_dir / "keyring.json")
    assert KeyRing.open(key_dir, create=False, now=NOW).signer().kid in [n.removesuffix(".pem") for n in kept]


def test_a_first_start_cut_short_or_other_pem_files_do_not_block_the_next_start(key_dir: Path) -> None:
    """Keys of a first start killed before keyring.json was written never signed anything: the next
    start replaces them (an outside re-check found every later start refused).  A ``.pem`` that is
    no key of the ring (a TLS certificate kept there) is not an orphan either."""
    leftover = KeyRing.open(key_dir, now=NOW)
    kids = [e.kid for e in leftover.entries()]
    (key_dir / "keyring.json").unlink()
    (key_dir / ".keyring.creating").write_bytes(b"")  # the mark the cut-short start left
    ring = KeyRing.open(key_dir, now=NOW)
    assert not set(kids) & {e.kid for e in ring.entries()}
    assert sorted(p.stem for p in key_dir.glob("*.pem")) == sorted(e.kid for e in ring.entries())
    assert not (key_dir / ".keyring.creating").exists()

    other = key_dir.parent / "other-keys"
    other.mkdir()
    (other / "tls.pem").write_text("-----BEGIN CERTIFICATE-----\n")
    assert KeyRing.open(other, now=NOW).signer().alg == "ES256"
    assert (other / "tls.pem").exists()


def test_a_swapped_key_file_is_detected_by_its_thumbprint(key_dir: Path) -> None:
    ring = KeyRing.open(key_dir, now=NOW)
    active, upcoming = _by_state(ring)["active"][0], _by_state(ring)["next"][0]
    (key_dir / f"{active.kid}.pem").write_bytes((key_dir / f"{upcoming.kid}.pem").read_bytes())
    with pytest.raises(ConfigurationError, match="thumbprint mismatch"):
        KeyRing.open(key_dir, create=False, now=NOW)


def test_unsupported_algorithm_is_refused(key_dir: Path) -> None:
    with pytest.raises(ConfigurationError, match="unsupported signing algorithm"):
        KeyRing.open(key_dir, create_alg="HS256", now=NOW)
    assert not key_dir.exists()


def test_reload_if_changed_picks_up_a_rotation_by_another_instance(
    key_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = KeyRing.open(key_dir, now=NOW, check_interval=5)
    cli = KeyRing.open(key_dir, create=False, now=NOW)
    old_kid = server.signer().kid
    new_active = cli.rotate(NOW + 1, max_token_lifetime=600)

    metadata = str(key_dir / "keyring.json")
    stats: list[str] = []
    real_stat: Callable[..., os.stat_result] = os.stat

    def counting_stat(path: Any, *args: Any, **kwargs: Any) -> os.stat_result:
        if os.fspath(path) == metadata:
            stats.append(metadata)
        return real_stat(path, *args, **kwargs)

    monkeypatch.setattr(os, "stat", counting_stat)

    # Within check_interval of the last check (the open at NOW): no stat at all.
    assert server.reload_if_changed(NOW + 4.9) is False
    assert stats == []
    assert server.signer().kid == old_kid

    assert server.reload_if_changed(NOW + 5) is True
    assert len(stats) == 1
    assert server.signer().kid == new_active.kid
    assert [e.kid for e in server.entries()] == [e.kid for e in cli.entries()]

    assert server.reload_if_changed(NOW + 6) is False  # within the interval again
    assert len(stats) == 1
    assert server.reload_if_changed(NOW + 10) is False  # one stat, nothing changed
    assert len(stats) == 2


def test_a_broken_reload_keeps_the_previous_keys(key_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    server = KeyRing.open(key_dir, now=NOW, check_interval=5)
    kid = server.signer().kid
    good = (key_dir / "keyring.json").read_bytes()
    assert server.reload_problem is None
    (key_dir / "keyring.json").write_text("{not json")
    with caplog.at_level(logging.ERROR, logger="sts.adapters.keyring"):
        assert server.reload_if_changed(NOW + 5) is False
    assert server.signer().kid == kid
    assert any("reload failed" in r.getMessage() for r in caplog.records)
    assert server.reload_problem is not None  # readiness says "keys" meanwhile
    (key_dir / "keyring.json").unlink()
    assert server.reload_if_changed(NOW + 10) is False and "cannot stat" in str(server.reload_problem)
    (key_dir / "keyring.json").write_bytes(good)
    assert server.reload_if_changed(NOW + 15) is True and server.reload_problem is None


def test_the_mode_checked_is_the_key_files_own_not_a_links(
    key_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ring = KeyRing.open(key_dir, now=NOW)
    kid = ring.signer().kid
    key = key_dir / f"{kid}.pem"
    elsewhere = key_dir.parent / "copy.pem"
    elsewhere.write_bytes(key.read_bytes())
    elsewhere.chmod(0o644)
    key.unlink()
    key.symlink_to(elsewhere)
    with caplog.at_level(logging.WARNING, logger="sts.adapters.keyring"):
        assert KeyRing.open(key_dir, create=False, now=NOW).signer().kid == kid
    assert any("readable by group or others (mode 644)" in r.getMessage() for r in caplog.records)


def _open_concurrently(directory: str, barrier: Barrier, results: Queue[list[tuple[str, str]]]) -> None:
    barrier.wait(timeout=60)
    ring = KeyRing.open(Path(directory), now=NOW)
    results.put([(e.kid, e.state) for e in ring.entries()])


def test_concurrent_initialisation_creates_exactly_one_active_and_one_next(key_dir: Path) -> None:
    context = multiprocessing.get_context("spawn")
    workers = 4
    barrier = context.Barrier(workers)
    results: Queue[list[tuple[str, str]]] = context.Queue()
    processes = [
        context.Process(target=_open_concurrently, args=(str(key_dir), barrier, results))
        for _ in range(workers)
    ]
    for process in processes:
        process.start()
    seen = [results.get(timeout=60) for _ in range(workers)]
    for process in processes:
        process.join(timeout=60)
        assert process.exitcode == 0

    assert all(view == seen[0] for view in seen), "every process must load the same keys"
    document = json.loads((key_dir / "keyring.json").read_text())
    states = sorted(entry["state"] for entry in document["keys"])
    assert states == ["active", "next"]
    assert sorted(p.stem for p in key_dir.glob("*.pem")) == sorted(kid for kid, _ in seen[0])


@pytest.mark.parametrize("alg", sorted(SUPPORTED_ALGORITHMS))
def test_each_supported_algorithm_signs_and_verifies(tmp_path: Path, alg: str) -> None:
    ring = KeyRing.open(tmp_path / alg, create_alg=alg, now=NOW)
    jwks = ring.public_jwks()
    signer = ring.signer()
    assert signer.alg == alg

    if alg == "EdDSA":
        # RFC 9864 deprecates "EdDSA" for "Ed25519"; joserfc says so on every use.
        with pytest.warns(SecurityWarning):
            token = _sign(ring)
        with pytest.warns(SecurityWarning):
            decoded = _verify(token, jwks, alg)
    else:
        token = _sign(ring)
        decoded = _verify(token, jwks, alg)
    assert decoded.header["alg"] == alg
    assert decoded.header["kid"] == signer.kid
    assert decoded.claims["sub"] == "workload"

    published = {k["kid"]: k for k in jwks["keys"]}[signer.kid]
    assert PRIVATE_JWK_MEMBERS.isdisjoint(published)
    assert published["alg"] == alg
    if alg.startswith(("RS", "PS")):
        assert published["kty"] == "RSA"
        assert ring.verification_keys().get_by_kid(signer.kid).public_key.key_size == 3072  # type: ignore[union-attr]
    elif alg.startswith("ES"):
        assert published["crv"] == {"ES256": "P-256", "ES384": "P-384"}[alg]
    else:
        assert published["crv"] == "Ed25519"
    # A relying party that allows only another algorithm refuses the token.
    other = "ES384" if alg != "ES384" else "ES256"
    with pytest.raises(UnsupportedAlgorithmError):
        _verify(token, jwks, other)


# -- the signer's lean ECDSA path (sts.adapters.key_signer) ------------------------------------------


@pytest.mark.parametrize(("alg", "curve"), [("ES256", "P-256"), ("ES384", "P-384")])
def test_lean_ecdsa_signer_writes_what_joserfc_writes(alg: str, curve: str) -> None:
    """The header and payload segments are byte for byte those of ``joserfc.jwt.encode``, and
    joserfc verifies every signature (ECDSA is randomised, so the signatures themselves differ)."""
    from joserfc.jwk import ECKey as JoseECKey

    from sts.adapters.key_signer import KeySigner

    key = JoseECKey.generate_key(cast(Any, curve))
    signer = KeySigner(key, "kid-1", alg)
    claims = {"sub": "repo:acme/app", "name": "é\u2028", "n": 0, "aud": ["a", "b"], "cnf": {"jkt": "x"}}
    for n in range(50):
        claims["n"] = n
        token = signer.sign({"typ": "at+jwt"}, claims)
        header = {"typ": "at+jwt", "alg": alg, "kid": "kid-1"}
        expected = jwt.encode(header, dict(claims), key, algorithms=[alg], default_type=None)
        assert token.split(".")[:2] == expected.split(".")[:2]
        assert jwt.decode(token, key, algorithms=[alg]).claims == claims
    # The header given by the caller cannot override alg or kid; a second header is encoded anew.
    other = signer.sign({"typ": "JWT", "alg": "none", "kid": "evil"}, {"sub": "x"})
    assert jwt.decode(other, key, algorithms=[alg]).header == {"typ": "JWT", "alg": alg, "kid": "kid-1"}


def test_ecdsa_signature_keeps_leading_zero_octets() -> None:
    """RFC 7518 §3.4: R and S are written at the curve's full width, however small they are."""
    from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

    from sts.adapters.key_signer import ecdsa_signature

    small = ecdsa_signature(encode_dss_signature(1, 2), 256)
    assert small == (1).to_bytes(32, "big") + (2).to_bytes(32, "big")
    assert len(ecdsa_signature(encode_dss_signature(3, 2**383), 384)) == 96
    assert len(ecdsa_signature(encode_dss_signature(3, 2**520), 521)) == 132


def test_signer_with_a_header_joserfc_refuses_still_refuses() -> None:
    """The protected header goes through joserfc's registry check, as ``jwt.encode`` does."""
    from joserfc.errors import JoseError

    from sts.adapters.key_signer import KeySigner

    signer = KeySigner(ECKey.generate_key("P-256"), "kid-1", "ES256")
    with pytest.raises(JoseError):
        signer.sign({"typ": "at+jwt", "jku": 5}, {"sub": "x"})


def test_lean_signer_converts_datetimes_as_joserfc_does() -> None:
    """Claims that are not plain JSON take joserfc's path, which writes a datetime ``exp`` as seconds."""
    import datetime as dt

    from sts.adapters.key_signer import KeySigner

    key = ECKey.generate_key("P-256")
    when = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
    token = KeySigner(key, "kid-1", "ES256").sign({}, {"sub": "x", "exp": when})
    assert jwt.decode(token, key, algorithms=["ES256"]).claims == {"sub": "x", "exp": int(when.timestamp())}


def _read_only(directory: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every open of ``directory``'s files for writing fail as on a read-only mount (EROFS):
    root ignores permissions, and a test cannot mount a file system."""
    import errno

    real_open = os.open

    def read_only_file_system(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if str(path).startswith(str(directory)) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only_file_system)


def test_a_ring_in_a_read_only_directory_loads_for_serving(
    key_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Kubernetes Secret mounted as keys_dir is read-only and holds no lock file: `sts config
    check` and `sts keys list` loaded it, but `sts serve` (``KeyRing.open``, which creates a ring
    when there is none) stopped at the exclusive lock it took first: "cannot open key ring lock
    ...: Read-only file system" (an outside re-check).  A ring there is read under the shared
    lock, which a read-only directory without a lock file skips."""
    from sts.adapters import keyring_files

    made = KeyRing.open(key_dir, now=1_800_000_000.0)
    (key_dir / keyring_files.LOCK_FILE).unlink()
    _read_only(key_dir, monkeypatch)
    loaded = KeyRing.open(key_dir, now=1_800_000_100.0)
    assert [(e.kid, e.state) for e in loaded.entries()] == [(e.kid, e.state) for e in made.entries()]
    assert loaded.public_jwks(1_800_000_100.0) == made.public_jwks(1_800_000_100.0)


def test_a_read_only_keys_dir_refuses_prune_and_a_missing_secret_in_one_line(
    key_dir: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """On a read-only keys_dir (a Kubernetes Secret), `sts keys prune` ended in a traceback, and a
    DPoP nonce secret missing from it stopped `sts serve` with one (an outside re-check): one line
    each, naming what to do."""
    from click.testing import CliRunner

    from sts.adapters import keyring_files
    from sts.cli import main
    from sts.wiring.secret_files import dpop_nonce_secret

    KeyRing.open(key_dir, now=1_800_000_000.0)
    (key_dir / keyring_files.LOCK_FILE).unlink()
    _read_only(key_dir, monkeypatch)
    with pytest.raises(ConfigurationError, match=r"DPoP nonce secret cannot be created \(Read-only"):
        dpop_nonce_secret(key_dir)
    config = tmp_path / "sts.yaml"
    config.write_text(f"keys_dir: {key_dir}\ndatabase_url: sqlite:///{tmp_path / 'db.sqlite'}\n")
    (tmp_path / "policies").mkdir()
    result = CliRunner().invoke(main, ["--config", str(config), "keys", "prune"])
    assert result.exit_code == 1 and "Read-only file system" in result.output, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)


def test_a_secret_beside_the_keys_must_be_the_services_or_roots(key_dir: Path) -> None:
    """The DPoP nonce secret and the review page's session secret were read whoever owned them:
    another user's file could hold a secret they know, to forge nonces or review sessions (an
    outside audit).  As for the key files: the file read counts, not a link to it, and root's is
    accepted (a Kubernetes Secret); a directory in its place is one line, not a traceback."""
    from sts.cli.config import _check_dpop_nonce_secret
    from sts.settings import Settings
    from sts.wiring.secret_files import dpop_nonce_secret, secret_file

    KeyRing.open(key_dir, now=NOW)
    made = dpop_nonce_secret(key_dir)
    assert len(made) == 32 and dpop_nonce_secret(key_dir) == made
    nonce = key_dir / "dpop-nonce.secret"
    os.chown(nonce, OTHER_UID, OTHER_UID)
    refused = rf"DPoP nonce secret {nonce} belongs to uid {OTHER_UID}.*could know the DPoP nonce secret"
    with pytest.raises(ConfigurationError, match=refused):
        dpop_nonce_secret(key_dir)
    settings = Settings(keys_dir=key_dir, dpop_nonce=True)
    with pytest.raises(ConfigurationError, match=refused):
        _check_dpop_nonce_secret(settings)  # sts config check says what a start would
    os.chown(nonce, 0, 0)
    assert dpop_nonce_secret(key_dir) == made
    # A link to another user's file: the file read is the one checked.
    session = key_dir / "review-session.secret"
    planted = key_dir.parent / "planted.secret"
    planted.write_bytes(b"k" * 32)
    os.chown(planted, OTHER_UID, OTHER_UID)
    session.symlink_to(planted)
    with pytest.raises(ConfigurationError, match=rf"secret {session} belongs to uid {OTHER_UID}"):
        secret_file(session)
    session.unlink()
    session.mkdir()
    with pytest.raises(ConfigurationError, match=rf"{session}: secret cannot be read \(Is a directory\)"):
        secret_file(session)
