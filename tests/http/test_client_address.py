"""Client address behind trusted proxies (the unusual-network signal relies on it)."""

from __future__ import annotations

import ipaddress

import pytest

from sts.http.client_address import client_address

PROXIES = [ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("::1/128")]


@pytest.mark.parametrize(
    ("remote", "xff", "trusted", "expected"),
    [
        ("203.0.113.7", [], PROXIES, "203.0.113.7"),
        # Not from a trusted proxy: the header is the client's own claim and is ignored.
        ("203.0.113.7", ["198.51.100.1"], PROXIES, "203.0.113.7"),
        ("10.0.0.5", ["198.51.100.1"], PROXIES, "198.51.100.1"),
        # A forged left-most entry is skipped: the proxy appended what it saw on the right.
        ("10.0.0.5", ["1.2.3.4, 198.51.100.1"], PROXIES, "198.51.100.1"),
        # Chains of trusted proxies are walked.
        ("10.0.0.5", ["198.51.100.1, 10.0.0.9"], PROXIES, "198.51.100.1"),
        ("10.0.0.5", ["198.51.100.1", "10.0.0.9"], PROXIES, "198.51.100.1"),
        # Every hop trusted: the left-most one.
        ("10.0.0.5", ["10.1.1.1, 10.2.2.2"], PROXIES, "10.1.1.1"),
        # Garbage stops the walk at the last hop we can vouch for.
        ("10.0.0.5", ["198.51.100.1, garbage"], PROXIES, "10.0.0.5"),
        ("::1", ["[2001:db8::1]"], PROXIES, "2001:db8::1"),
        ("10.0.0.5", [], PROXIES, "10.0.0.5"),
        # IPv4-mapped addresses (a dual-stack listener's peers, or a proxy's) are the IPv4 ones.
        ("::ffff:10.0.0.5", ["::ffff:198.51.100.1"], PROXIES, "198.51.100.1"),
        ("::ffff:203.0.113.7", ["198.51.100.1"], PROXIES, "203.0.113.7"),
        ("10.0.0.5", ["198.51.100.1"], [], "10.0.0.5"),
        # A zone is no part of the address: none of its text is kept (an outside red team forged
        # log lines and 8 KB addresses through it), from a forwarded hop or the connection.
        ("10.0.0.5", ['fe80::1%eth0" 200 1 request_id=forged'], PROXIES, "fe80::1"),
        ("10.0.0.5", ["fe80::1%" + "x" * 8000], PROXIES, "fe80::1"),
        ("fe80::2%eth0", [], PROXIES, "fe80::2"),
        # Only an IPv6 address has a zone: an IPv4 one with a ``%`` is no address.
        ("10.0.0.5", ["198.51.100.1, 192.0.2.1%evil"], PROXIES, "10.0.0.5"),
    ],
)
def test_client_address(remote: str, xff: list[str], trusted: list, expected: str) -> None:  # type: ignore[type-arg]
    assert client_address(remote, xff, trusted) == expected


def test_the_audit_record_holds_the_address_behind_a_trusted_proxy(make_settings, upstream) -> None:  # type: ignore[no-untyped-def]
    from sts.app import create_app
    from tests.conftest import STS_ISSUER, exchange_form

    app = create_app(make_settings(trusted_proxies=["10.0.0.0/8"]))
    web = app.test_client()
    form = exchange_form(
        upstream.issuer.github_actions_token(audience=STS_ISSUER), audience="https://deploy.example.com"
    )
    web.post("/token", data=form, headers={"X-Forwarded-For": "1.2.3.4, 198.51.100.7"},
             environ_base={"REMOTE_ADDR": "10.0.0.2"})  # fmt: skip
    web.post("/token", data=form, headers={"X-Forwarded-For": "198.51.100.7"},
             environ_base={"REMOTE_ADDR": "203.0.113.9"})  # fmt: skip
    records = app.extensions["sts"].audit.recent(2)
    assert [r["source_ip"] for r in records] == ["203.0.113.9", "198.51.100.7"]
