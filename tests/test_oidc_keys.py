"""The JWKS cache: discovery, refresh, expiry, rate-limited refetch for unknown kids, an unreachable IdP.

The network is replaced by a function serving documents (the cache's only boundary) and time by a
clock the test moves, so nothing here waits."""

from __future__ import annotations

import asyncio
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from auditgate.identity.oidc_config import IssuerConfig
from auditgate.identity.oidc_keys import (
    IssuerKeys,
    KeyFetchError,
    fetch_json,
    parse_jwks,
)
from tests.oidc_issuer import make_key

ISSUER = "https://idp.example"
JWKS_URI = "https://idp.example/keys"


class FakeIdP:
    """Serves discovery and a JWKS the test changes; `down` makes every fetch fail."""

    def __init__(self) -> None:
        self.keys = [make_key("EC")]
        self.down = False
        self.calls: list[str] = []
        self.discovery = {"issuer": ISSUER, "jwks_uri": JWKS_URI}

    def __call__(self, url: str, issuer: IssuerConfig):
        self.calls.append(url)
        if self.down:
            raise KeyFetchError(f"{url}: connection refused")
        if url.endswith("/.well-known/openid-configuration"):
            return self.discovery
        return {"keys": [k.as_dict(private=False) for k in self.keys]}

    def jwks_fetches(self) -> int:
        return sum(1 for c in self.calls if c == JWKS_URI)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _keys(idp: FakeIdP, clock: Clock, **settings) -> IssuerKeys:
    config = IssuerConfig(ISSUER, ("gw",), **{"jwks_refresh_seconds": 300, "jwks_expiry_seconds": 3600,
                                               "jwks_refetch_interval_seconds": 30, **settings})
    return IssuerKeys(config, fetch=idp, clock=clock)


def test_discovery_then_jwks_then_cache():
    idp, clock = FakeIdP(), Clock()
    keys = _keys(idp, clock)
    kid = idp.keys[0].kid
    assert asyncio.run(keys.key_for(kid)) is not None
    assert idp.calls == [f"{ISSUER}/.well-known/openid-configuration", JWKS_URI]
    clock.now += 299
    assert asyncio.run(keys.key_for(kid)) is not None
    assert len(idp.calls) == 2, "fresh keys are used without fetching"


def test_explicit_jwks_uri_skips_discovery():
    idp, clock = FakeIdP(), Clock()
    keys = _keys(idp, clock, jwks_uri="https://keys.example/jwks")
    asyncio.run(keys.key_for(idp.keys[0].kid))
    assert idp.calls == ["https://keys.example/jwks"]


def test_discovery_must_name_the_same_issuer():
    idp, clock = FakeIdP(), Clock()
    idp.discovery = {"issuer": "https://evil.example", "jwks_uri": JWKS_URI}
    keys = _keys(idp, clock)
    assert asyncio.run(keys.key_for(idp.keys[0].kid)) is None
    assert JWKS_URI not in idp.calls
    assert "unavailable" in keys.unavailable_reason(idp.keys[0].kid)


def test_plain_http_jwks_uri_from_discovery_is_refused():
    idp, clock = FakeIdP(), Clock()
    idp.discovery = {"issuer": ISSUER, "jwks_uri": "http://idp.example/keys"}
    assert asyncio.run(_keys(idp, clock).key_for(idp.keys[0].kid)) is None


def test_unknown_kid_triggers_one_rate_limited_refetch_and_rotation_works():
    idp, clock = FakeIdP(), Clock()
    keys = _keys(idp, clock)
    asyncio.run(keys.key_for(idp.keys[0].kid))
    assert idp.jwks_fetches() == 1
    clock.now += 31
    assert asyncio.run(keys.key_for("invented")) is None
    assert idp.jwks_fetches() == 2, "an unknown kid is worth one refetch"
    for _ in range(5):
        assert asyncio.run(keys.key_for("invented-again")) is None
    assert idp.jwks_fetches() == 2, "further unknown kids within the interval cost no fetch"
    # Rotation: the IdP publishes a new key; once the interval has passed, its kid is found.
    new = make_key("RSA")
    idp.keys.append(new)
    clock.now += 31
    assert asyncio.run(keys.key_for(new.kid)) is not None
    assert idp.jwks_fetches() == 3


def test_stale_keys_are_refreshed_in_the_background_and_still_served():
    idp, clock = FakeIdP(), Clock()
    keys = _keys(idp, clock)
    kid = idp.keys[0].kid

    async def scenario():
        await keys.key_for(kid)
        clock.now += 301
        idp.keys = [make_key("EC")]  # rotated: the old key is gone after the refresh
        assert await keys.key_for(kid) is not None, "served from the cache while the refresh runs"
        await asyncio.sleep(0.5)
        for _ in range(100):
            if idp.jwks_fetches() == 2 and keys.find(kid) is None:
                break
            await asyncio.sleep(0.02)
        assert idp.jwks_fetches() == 2
        assert keys.find(kid) is None and keys.find(idp.keys[0].kid) is not None

    asyncio.run(scenario())


def test_unreachable_idp_serves_cached_keys_until_they_expire_then_fails_closed():
    idp, clock = FakeIdP(), Clock()
    keys = _keys(idp, clock)
    kid = idp.keys[0].kid
    assert keys.refresh_blocking()
    idp.down = True
    clock.now += 1800  # stale, IdP down: refresh fails, cached keys still serve
    assert keys.key_for_blocking(kid) is not None
    clock.now += 1799
    assert keys.key_for_blocking(kid) is not None
    clock.now += 2  # past jwks_expiry_seconds since the last successful fetch
    assert keys.key_for_blocking(kid) is None
    assert asyncio.run(keys.key_for(kid)) is None
    assert "unavailable" in keys.unavailable_reason(kid)
    # The IdP comes back: the next allowed attempt restores service.
    idp.down = False
    clock.now += 31
    assert asyncio.run(keys.key_for(kid)) is not None


def test_failed_fetches_are_rate_limited_too():
    idp, clock = FakeIdP(), Clock()
    idp.down = True
    keys = _keys(idp, clock)
    for _ in range(10):
        assert asyncio.run(keys.key_for("k")) is None
    assert len(idp.calls) == 1, "a down IdP is asked at most once per refetch interval"


def test_concurrent_requests_share_one_fetch():
    idp, clock = FakeIdP(), Clock()
    started, release = threading.Event(), threading.Event()

    def slow_fetch(url, issuer):
        started.set()
        release.wait(5)
        return idp(url, issuer)

    keys = IssuerKeys(IssuerConfig(ISSUER, ("gw",), jwks_uri=JWKS_URI), fetch=slow_fetch, clock=clock)

    async def scenario():
        lookups = [asyncio.ensure_future(keys.key_for(idp.keys[0].kid)) for _ in range(20)]
        await asyncio.to_thread(started.wait, 5)
        release.set()
        return await asyncio.gather(*lookups)

    assert all(k is not None for k in asyncio.run(scenario()))
    assert idp.jwks_fetches() == 1


def test_parse_jwks_keeps_only_public_signature_keys():
    good, enc, private = make_key("RSA"), make_key("EC"), make_key("OKP")
    document = {"keys": [
        good.as_dict(private=False),
        {**enc.as_dict(private=False), "use": "enc"},
        private.as_dict(private=True),
        {"kty": "oct", "kid": "hmac", "k": "c2VjcmV0"},
        {"kty": "RSA", "kid": "broken", "n": "!!", "e": "AQAB"},
        "not a key",
    ]}  # fmt: skip
    key_set = parse_jwks(document)
    assert list(key_set.by_kid) == [good.kid]
    with pytest.raises(KeyFetchError):
        parse_jwks({"no": "keys"})


def test_a_token_without_kid_needs_a_single_published_key():
    one, two = make_key("EC"), make_key("EC")
    single = parse_jwks({"keys": [{k: v for k, v in one.as_dict(private=False).items() if k != "kid"}]})
    assert single.find(None) is not None
    assert parse_jwks({"keys": [one.as_dict(private=False), two.as_dict(private=False)]}).find(None) is None


@pytest.fixture
def local_server():
    routes: dict[str, tuple[int, dict, bytes]] = {}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            status, headers, body = routes.get(self.path, (404, {}, b""))
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", routes
    server.shutdown()
    server.server_close()


def test_fetch_json_refuses_redirects_and_non_json(local_server):
    base, routes = local_server
    config = IssuerConfig(base, ("gw",), fetch_timeout_seconds=2)
    routes["/ok"] = (200, {"content-type": "application/json"}, json.dumps({"keys": []}).encode())
    routes["/moved"] = (302, {"location": "http://elsewhere.invalid/keys"}, b"")
    routes["/html"] = (200, {}, b"<html>")
    assert fetch_json(f"{base}/ok", config) == {"keys": []}
    with pytest.raises(KeyFetchError, match="302"):
        fetch_json(f"{base}/moved", config)
    with pytest.raises(KeyFetchError, match="not JSON"):
        fetch_json(f"{base}/html", config)
    with pytest.raises(KeyFetchError, match="404"):
        fetch_json(f"{base}/missing", config)
