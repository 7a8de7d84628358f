"""Key rotation seen from a relying party: publish-before-use and overlap, over the app's JWKS."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable
from typing import Any

from joserfc import jwt
from joserfc.jwk import KeySet

from sts.adapters.keyring import KeyRing
from sts.app import create_app
from sts.dev.issuer import RunningServer
from sts.settings import Settings
from tests.conftest import STS_ISSUER, exchange_form
from tests.support.clock import Clock


def _header_kid(token: str) -> str:
    segment = token.split(".")[0]
    header: dict[str, Any] = json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
    return str(header["kid"])


def test_rotation_overlap_seen_by_a_relying_party(
    make_settings: Callable[..., Settings], upstream: RunningServer
) -> None:
    settings = make_settings()
    clock = Clock(time.time())
    client = create_app(settings, clock=clock).test_client()

    def exchange() -> str:
        subject = upstream.issuer.github_actions_token(audience=STS_ISSUER, now=clock.now)
        resp = client.post("/token", data=exchange_form(subject, audience="https://deploy.example.com"))
        assert resp.status_code == 200, resp.get_json()
        return str(resp.get_json()["access_token"])

    answer_before = client.get("/.well-known/jwks.json")
    jwks_before = answer_before.get_json()
    tag_before = answer_before.headers["ETag"]
    before = exchange()
    kid_before = _header_kid(before)

    # The operator rotates with the CLI's key ring, in another "process".
    ring = KeyRing.open(settings.keys_dir, create=False)
    next_kid = next(e.kid for e in ring.entries() if e.state == "next")
    assert next_kid in {k["kid"] for k in jwks_before["keys"]}, "next key published before use"
    ring.rotate(clock.now, max_token_lifetime=settings.max_lifetime, force=True)

    clock.now += 6  # past the running app's reload interval (5 s)
    after = exchange()
    assert _header_kid(after) == next_kid != kid_before

    # A relying party that cached the JWKS from before the rotation verifies the new token...
    jwt.decode(after, KeySet.import_key_set(jwks_before), algorithms=["ES256"])
    # ...and one that fetches now still verifies the old one (the retired key stays published).
    # A cache revalidating its copy from before the rotation is sent the new set (a new ETag).
    answer_after = client.get("/.well-known/jwks.json", headers={"If-None-Match": tag_before})
    assert answer_after.status_code == 200 and answer_after.headers["ETag"] != tag_before
    jwks_after = answer_after.get_json()
    jwt.decode(before, KeySet.import_key_set(jwks_after), algorithms=["ES256"])
    assert kid_before in {k["kid"] for k in jwks_after["keys"]}
    # A new next key is already published for the following rotation.
    states = {e.kid: e.state for e in KeyRing.open(settings.keys_dir, create=False).entries()}
    assert sorted(states.values()) == ["active", "next", "retired"]
    assert set(states) == {k["kid"] for k in jwks_after["keys"]}


def test_a_ring_on_disk_this_process_cannot_load_makes_it_unready_until_it_can(
    make_settings: Callable[..., Settings], upstream: RunningServer
) -> None:
    """Another instance rotated with a passphrase this one lacks (or the file is damaged): this one
    kept serving the keys it had, ready, while its key set and the one on disk parted (an outside
    audit had it sign with a key pruned from disk).  Readiness says ``keys`` until it loads again."""
    settings = make_settings()
    clock = Clock(time.time())
    client = create_app(settings, clock=clock).test_client()
    assert client.get("/readyz").status_code == 200
    metadata = settings.keys_dir / "keyring.json"
    good = metadata.read_bytes()
    metadata.write_text("{not json")
    clock.now += 6  # past the reload interval (5 s)
    time.sleep(1.1)  # past readiness's memory of a good result (one second, on the real clock)
    answer = client.get("/readyz")
    assert answer.status_code == 503 and "keys" in answer.get_json()["problems"], answer.get_json()
    # The previous keys still sign meanwhile (a grant is not refused for it).
    subject = upstream.issuer.github_actions_token(audience=STS_ISSUER, now=clock.now)
    granted = client.post("/token", data=exchange_form(subject, audience="https://deploy.example.com"))
    assert granted.status_code == 200, granted.get_json()
    metadata.unlink()
    metadata.write_bytes(good)  # restored: a new file, loaded at the next check
    clock.now += 6
    answer = client.get("/readyz")
    assert answer.status_code == 200, answer.get_json()
