"""An issuer's signing keys: found by OIDC discovery, fetched from its JWKS, cached with an expiry."""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from joserfc.errors import JoseError
from joserfc.jwk import ECKey, JWKRegistry, Key, OKPKey, RSAKey

from auditgate.identity.oidc_config import IssuerConfig, is_acceptable_url

logger = logging.getLogger(__name__)

MAX_DOCUMENT_BYTES = 1024 * 1024

FetchJson = Callable[[str, IssuerConfig], Any]


class KeyFetchError(Exception):
    """Discovery or the JWKS could not be fetched or made no sense; the message says why."""


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    # A redirect could lead from https to http, or to another host: keys come from the configured URL only.
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        raise urllib.error.HTTPError(req.full_url, code, f"redirect to {newurl} refused", headers, fp)


def fetch_json(url: str, issuer: IssuerConfig) -> Any:
    """GET a JSON document (blocking: run it in a thread). Raises KeyFetchError."""
    context = ssl.create_default_context(cafile=issuer.ca_file) if url.startswith("https:") else None
    opener = urllib.request.build_opener(_NoRedirects(), urllib.request.HTTPSHandler(context=context))
    request = urllib.request.Request(url, headers={"Accept": "application/json", "User-Agent": "auditgate"})
    try:
        with opener.open(request, timeout=issuer.fetch_timeout_seconds) as response:
            body = response.read(MAX_DOCUMENT_BYTES + 1)
    except urllib.error.HTTPError as e:
        raise KeyFetchError(f"{url}: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise KeyFetchError(f"{url}: {getattr(e, 'reason', e)}") from None
    if len(body) > MAX_DOCUMENT_BYTES:
        raise KeyFetchError(f"{url}: larger than {MAX_DOCUMENT_BYTES} bytes")
    try:
        return json.loads(body)
    except ValueError:
        raise KeyFetchError(f"{url}: not JSON") from None


@dataclass(frozen=True)
class KeySet:
    """Verification keys by kid, plus the keys published without one."""

    by_kid: dict[str, Key] = field(default_factory=dict)
    without_kid: tuple[Key, ...] = ()

    def __len__(self) -> int:
        return len(self.by_kid) + len(self.without_kid)

    def find(self, kid: str | None) -> Key | None:
        if kid is not None:
            return self.by_kid.get(kid)
        # A token without kid can only name a key unambiguously when the issuer publishes just one.
        keys = [*self.by_kid.values(), *self.without_kid]
        return keys[0] if len(keys) == 1 else None


def parse_jwks(document: Any) -> KeySet:
    """The public signature keys of a JWKS document; symmetric, private, encryption and unparsable keys are skipped."""
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise KeyFetchError("the JWKS has no 'keys' list")
    by_kid: dict[str, Key] = {}
    without_kid: list[Key] = []
    for entry in document["keys"]:
        if not isinstance(entry, dict) or entry.get("use", "sig") != "sig":
            continue
        if entry.get("kty") not in ("RSA", "EC", "OKP"):
            continue  # "oct" would be an HMAC secret: never a verification key from a public document
        if any(k in entry for k in ("d", "p", "q")):
            continue  # a private key published by mistake is not one we want to hold
        try:
            key = JWKRegistry.import_key(entry)
        except (JoseError, ValueError, TypeError):
            continue
        if not isinstance(key, (RSAKey, ECKey, OKPKey)):
            continue
        kid = entry.get("kid")
        if isinstance(kid, str) and kid:
            by_kid.setdefault(kid, key)
        else:
            without_kid.append(key)
    return KeySet(by_kid, tuple(without_kid))


class IssuerKeys:
    """The keys of one issuer, with refresh, expiry and a rate-limited refetch for unknown key ids.

    Keys are fresh for jwks_refresh_seconds (then refreshed in the background while still used), and
    expire jwks_expiry_seconds after the last successful fetch: an unreachable IdP keeps being served
    from the cache until then, and every token of the issuer is refused after (fail closed). Fetch
    attempts are at most one per jwks_refetch_interval_seconds, so invented kids cannot make the
    gateway hammer the IdP; concurrent needs share one fetch.
    """

    def __init__(
        self, issuer: IssuerConfig, fetch: FetchJson = fetch_json, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.issuer = issuer
        self._fetch = fetch
        self._clock = clock
        self._keys = KeySet()
        self._fetched_at: float | None = None
        self._last_attempt: float | None = None
        self._jwks_uri = issuer.jwks_uri
        self._lock = threading.Lock()  # one fetch at a time, whichever thread or task asks
        self._inflight: asyncio.Future | None = None
        self.fetches = 0  # successful fetches, for the log and tests

    # ---- state ----------------------------------------------------------------------------------
    def expired(self) -> bool:
        return self._fetched_at is None or self._clock() - self._fetched_at >= self.issuer.jwks_expiry_seconds

    def stale(self) -> bool:
        return self._fetched_at is None or self._clock() - self._fetched_at >= self.issuer.jwks_refresh_seconds

    def may_fetch(self) -> bool:
        return self._last_attempt is None or self._clock() - self._last_attempt >= self.issuer.jwks_refetch_interval_seconds

    def find(self, kid: str | None) -> Key | None:
        return None if self.expired() else self._keys.find(kid)

    # ---- fetching -------------------------------------------------------------------------------
    def refresh_blocking(self) -> bool:
        """Fetch the keys now unless a fetch is not allowed yet; True if fresh keys were stored."""
        with self._lock:
            if not self.may_fetch():
                return False
            self._last_attempt = self._clock()
            try:
                keys = self._download()
            except KeyFetchError as e:
                if self._jwks_uri != self.issuer.jwks_uri:
                    self._jwks_uri = None  # discovered: discover again next time, the IdP may have moved it
                if self.expired():
                    logger.error("keys of OIDC issuer %s unavailable, its tokens are refused: %s", self.issuer.issuer, e)
                else:
                    left = self.issuer.jwks_expiry_seconds - (self._clock() - self._fetched_at)
                    logger.warning(
                        "could not refresh the keys of OIDC issuer %s (%s); cached keys serve for %d s more",
                        self.issuer.issuer, e, left,
                    )  # fmt: skip
                return False
            self._keys, self._fetched_at = keys, self._clock()
            self.fetches += 1
            logger.info("OIDC issuer %s: %d signing key(s) [%s]", self.issuer.issuer, len(keys), ", ".join(keys.by_kid))
            return True

    def _download(self) -> KeySet:
        if self._jwks_uri is None:
            self._jwks_uri = self._discover()
        keys = parse_jwks(self._fetch(self._jwks_uri, self.issuer))
        if len(keys) == 0:
            raise KeyFetchError(f"{self._jwks_uri}: no usable signature key")
        return keys

    def _discover(self) -> str:
        document = self._fetch(self.issuer.discovery_uri, self.issuer)
        if not isinstance(document, dict):
            raise KeyFetchError(f"{self.issuer.discovery_uri}: not a discovery document")
        # OIDC Discovery 1.0 §4.3: the document must name exactly the issuer it was fetched for.
        if document.get("issuer") != self.issuer.issuer:
            raise KeyFetchError(f"{self.issuer.discovery_uri}: names issuer {document.get('issuer')!r}")
        jwks_uri = document.get("jwks_uri")
        if not isinstance(jwks_uri, str) or not is_acceptable_url(jwks_uri):
            raise KeyFetchError(f"{self.issuer.discovery_uri}: no acceptable jwks_uri ({jwks_uri!r})")
        return jwks_uri

    async def refresh(self) -> None:
        """Fetch in a worker thread (the event loop never waits on the network); joins a fetch in flight."""
        if self._inflight is None:
            self._inflight = asyncio.ensure_future(asyncio.to_thread(self.refresh_blocking))
            self._inflight.add_done_callback(self._fetch_done)
        await asyncio.shield(self._inflight)

    def _fetch_done(self, future: asyncio.Future) -> None:
        self._inflight = None
        if not future.cancelled() and future.exception():
            logger.error("fetching the keys of OIDC issuer %s failed: %r", self.issuer.issuer, future.exception())

    def refresh_in_background(self) -> None:
        if self._inflight is None and self.may_fetch():
            self._inflight = asyncio.ensure_future(asyncio.to_thread(self.refresh_blocking))
            self._inflight.add_done_callback(self._fetch_done)

    # ---- the key for a token --------------------------------------------------------------------
    async def key_for(self, kid: str | None) -> Key | None:
        """The verification key for kid, fetching (in a thread) when the keys are expired or kid is unknown."""
        if self.expired():
            if self._inflight is not None or self.may_fetch():
                await self.refresh()
        elif self.stale():
            self.refresh_in_background()
        key = self.find(kid)
        if key is None and kid is not None and not self.expired() and (self._inflight is not None or self.may_fetch()):
            await self.refresh()  # key rotation: a new kid is published before it is used
            key = self.find(kid)
        return key

    def key_for_blocking(self, kid: str | None) -> Key | None:
        """key_for for callers outside the event loop (a thread of their own); fetches inline."""
        if self.stale():
            self.refresh_blocking()
        key = self.find(kid)
        if key is None and kid is not None and not self.expired():
            self.refresh_blocking()
            key = self.find(kid)
        return key

    def unavailable_reason(self, kid: str | None) -> str:
        if self.expired():
            return f"the signing keys of issuer {self.issuer.issuer} are unavailable"
        if kid is None:
            return "the token names no key id (kid) and the issuer publishes several keys"
        return f"unknown key id {kid!r} (not among the issuer's published keys)"
