"""One way to authenticate a bearer credential, for callers and approvers alike: a service token or an OIDC JWT.

    authenticator = CallerAuthenticator.from_rules(rules_dir)
    result = await authenticator.authenticate(credential)     # in an event loop (fetches keys in a thread)
    result = authenticator.authenticate_blocking(credential)  # in a thread of its own
    if isinstance(result, AuthFailure): refuse with result.reason  else: result is the Identity

Every call verifies the credential afresh: nothing but the issuers' public keys is cached, so a token
stops working the moment it expires, and a service token the moment its hash leaves identities.yaml.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from auditgate.core.config import RulesFile
from auditgate.identity.oidc_config import IssuerConfig, issuers_from
from auditgate.identity.oidc_keys import FetchJson, IssuerKeys, fetch_json
from auditgate.identity.oidc_tokens import (
    TokenRejected,
    UnverifiedToken,
    looks_like_jwt,
    parse,
    verify,
)
from auditgate.identity.service_tokens import (
    TOKEN_PREFIX,
    Identity,
    ServiceTokens,
    read_identities_file,
    service_tokens_from,
)


@dataclass(frozen=True)
class AuthFailure:
    """Why a credential authenticates no one; safe to show to the caller and to record (never the credential)."""

    reason: str
    credential: str  # "none", "service_token" or "jwt": what kind of credential was presented
    claimed: dict[str, str] = field(default_factory=dict)  # a rejected JWT's unverified alg/kid/iss/sub

    def as_metadata(self) -> dict:
        out = {"reason": self.reason, "credential": self.credential}
        if self.claimed:
            out["unverified_claims"] = dict(self.claimed)
        return out


class CallerAuthenticator:
    """Authenticates service tokens (by hash) and OIDC JWTs (by the configured issuers' keys)."""

    def __init__(
        self,
        service_tokens: ServiceTokens,
        issuers: tuple[IssuerConfig, ...] = (),
        previous: CallerAuthenticator | None = None,
        fetch: FetchJson = fetch_json,
    ) -> None:
        self.service_tokens = service_tokens
        self.issuers: Mapping[str, IssuerConfig] = {i.issuer: i for i in issuers}
        # On a reload, an issuer whose settings did not change keeps its cached keys.
        kept = previous.keys if previous else {}
        self.keys: dict[str, IssuerKeys] = {
            i.issuer: kept[i.issuer] if i.issuer in kept and kept[i.issuer].issuer == i else IssuerKeys(i, fetch)
            for i in issuers
        }

    @classmethod
    def from_rules(cls, rules_dir: Path, previous: CallerAuthenticator | None = None) -> CallerAuthenticator:
        """Read service tokens and issuers from rules_dir/identities.yaml (ConfigError when invalid)."""
        return cls.from_file(read_identities_file(rules_dir), previous)

    @classmethod
    def from_file(cls, file: RulesFile, previous: CallerAuthenticator | None = None) -> CallerAuthenticator:
        """From an identities.yaml already read (ConfigError when invalid)."""
        return cls(service_tokens_from(file), issuers_from(file), previous)

    def is_gateway_credential(self, credential: str) -> bool:
        """Whether a credential is meant for the gateway (a JWT, or a service token) rather than a placeholder."""
        return looks_like_jwt(credential) or credential.startswith(TOKEN_PREFIX) or bool(
            self.service_tokens.authenticate(credential)
        )

    def _start(self, credential: str | None) -> Identity | AuthFailure | tuple[UnverifiedToken, IssuerKeys]:
        if not credential:
            return AuthFailure("missing gateway token (send 'Authorization: Bearer <token>')", "none")
        if not looks_like_jwt(credential):
            identity = self.service_tokens.authenticate(credential)
            return identity or AuthFailure("invalid gateway token", "service_token")
        try:
            token = parse(credential)
        except TokenRejected as e:
            return AuthFailure(f"invalid gateway token: {e}", "jwt")
        keys = self.keys.get(token.issuer) if token.issuer else None
        if keys is None:
            return AuthFailure(f"invalid gateway token: issuer {token.issuer!r} is not trusted", "jwt", token.describe())
        if token.alg not in keys.issuer.algorithms:
            # Refused before any key lookup ('none', HMAC, ...): a bad algorithm must not cost an IdP fetch.
            allowed = ", ".join(keys.issuer.algorithms)
            reason = f"invalid gateway token: algorithm {token.alg!r} is not allowed (allowed: {allowed})"
            return AuthFailure(reason, "jwt", token.describe())
        return token, keys

    def _finish(self, token: UnverifiedToken, keys: IssuerKeys, key) -> Identity | AuthFailure:
        if key is None:
            return AuthFailure(f"invalid gateway token: {keys.unavailable_reason(token.kid)}", "jwt", token.describe())
        try:
            return verify(token, keys.issuer, key)
        except TokenRejected as e:
            return AuthFailure(f"invalid gateway token: {e}", "jwt", token.describe())

    async def authenticate(self, credential: str | None) -> Identity | AuthFailure:
        started = self._start(credential)
        if not isinstance(started, tuple):
            return started
        token, keys = started
        return self._finish(token, keys, await keys.key_for(token.kid))

    def authenticate_blocking(self, credential: str | None) -> Identity | AuthFailure:
        started = self._start(credential)
        if not isinstance(started, tuple):
            return started
        token, keys = started
        return self._finish(token, keys, keys.key_for_blocking(token.kid))

    def prefetch_if_running(self) -> None:
        """prefetch() when called inside a running event loop; nothing otherwise (a CLI, a unit test)."""
        import asyncio

        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return
        self.prefetch()

    def prefetch(self) -> None:
        """Start fetching every issuer's keys in the background (call from within the event loop)."""
        for keys in self.keys.values():
            keys.refresh_in_background()
