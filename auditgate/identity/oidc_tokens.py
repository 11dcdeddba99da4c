"""The verification policy for OIDC JWTs: what a token must be for the gateway to accept its identity.

Parsing, signatures and claim checks are joserfc's; this module decides which issuer, key, algorithms,
audience and clock skew apply, and turns the verified claims into an Identity.
"""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass
from typing import Any

from joserfc import jws
from joserfc.errors import (
    ExpiredTokenError,
    InvalidClaimError,
    JoseError,
    MissingClaimError,
    SecurityWarning,
)
from joserfc.jwk import Key
from joserfc.jwt import JWTClaimsRegistry

from auditgate.identity.oidc_config import IssuerConfig
from auditgate.identity.service_tokens import Identity

# Issuers name Ed25519 signatures "EdDSA" (RFC 8037) and an operator allows it deliberately; joserfc
# warns on every use since RFC 9864 deprecated the name.
warnings.filterwarnings("ignore", message="EdDSA is deprecated", category=SecurityWarning)

MAX_TOKEN_LENGTH = 16 * 1024
# Header parameters that would change how the token is processed (RFC 7515 §4.1.11 crit, RFC 7797 b64)
# or point at keys of the sender's choosing: keys come from the configured issuer only.
_REFUSED_HEADER_PARAMETERS = ("crit", "b64", "jku", "x5u", "jwk", "x5c")


class TokenRejected(Exception):
    """A token that does not authenticate anyone; str() is the reason, safe to show and record."""


def looks_like_jwt(credential: str) -> bool:
    """A compact JWS (or a broken one): three dot-separated parts, or the base64 of a JSON header."""
    return credential.count(".") == 2 or credential.startswith("eyJ")


@dataclass(frozen=True)
class UnverifiedToken:
    """A parsed token whose signature has not been checked yet: good only for choosing issuer and key."""

    compact: Any  # joserfc CompactSignature
    header: dict
    claims: dict

    @property
    def issuer(self) -> str | None:
        iss = self.claims.get("iss")
        return iss if isinstance(iss, str) else None

    @property
    def kid(self) -> str | None:
        kid = self.header.get("kid")
        return kid if isinstance(kid, str) else None

    @property
    def alg(self) -> str | None:
        alg = self.header.get("alg")
        return alg if isinstance(alg, str) else None

    def describe(self) -> dict[str, str]:
        """What the token claims to be, for the record of a refusal (unverified, never the token)."""
        out = {"alg": self.alg, "kid": self.kid, "iss": self.issuer, "sub": self.claims.get("sub")}
        return {k: str(v)[:200] for k, v in out.items() if v is not None}


def parse(token: str) -> UnverifiedToken:
    """Split a compact JWS and decode its header and claims, without trusting either. Raises TokenRejected."""
    if len(token) > MAX_TOKEN_LENGTH:
        raise TokenRejected("malformed token (too long)")
    try:
        compact = jws.extract_compact(token.encode("ascii"))
        claims = json.loads(compact.payload)
    except (JoseError, ValueError, UnicodeError):
        raise TokenRejected("malformed token (not a signed JWT)") from None
    header = compact.headers()
    if not isinstance(claims, dict):
        raise TokenRejected("malformed token (the payload is not a JSON object)")
    return UnverifiedToken(compact, header, claims)


def verify(token: UnverifiedToken, issuer: IssuerConfig, key: Key, now: float | None = None) -> Identity:
    """Check the signature with key and the claims against issuer; the verified identity, or TokenRejected."""
    alg = token.alg
    if alg not in issuer.algorithms:
        raise TokenRejected(f"algorithm {alg!r} is not allowed for this issuer (allowed: {', '.join(issuer.algorithms)})")
    refused = [p for p in _REFUSED_HEADER_PARAMETERS if p in token.header]
    if refused:
        raise TokenRejected(f"header parameter(s) {', '.join(refused)} are not accepted")
    registry = jws.JWSRegistry(algorithms=list(issuer.algorithms), strict_check_header=False)
    try:
        # joserfc checks the alg against the allow-list again and that the key's type (and curve, and
        # its own "alg"/"use" if published) fit the algorithm: an RSA key is never an HMAC secret.
        valid = jws.validate_compact(token.compact, key, registry=registry)
    except JoseError as e:
        raise TokenRejected(f"the key does not fit the token ({e.error})") from None
    if not valid:
        raise TokenRejected("bad signature")
    claims = token.claims
    checks = JWTClaimsRegistry(
        now=int(time.time() if now is None else now),
        leeway=issuer.clock_skew_seconds,
        iss={"essential": True, "value": issuer.issuer},
        aud={"essential": True, "values": list(issuer.audiences)},
        exp={"essential": True},
        sub={"essential": True},
    )
    try:
        checks.validate(claims)
    except ExpiredTokenError:
        raise TokenRejected("token expired") from None
    except MissingClaimError as e:
        raise TokenRejected(f"missing claim(s) {e.claim}") from None
    except InvalidClaimError as e:
        claim = e.claim
        what = {
            "aud": "wrong audience", "iss": "wrong issuer", "nbf": "token not valid yet (nbf)",
            "iat": "token issued in the future (iat)",
        }.get(claim, f"invalid claim {claim!r}")  # fmt: skip
        raise TokenRejected(what) from None
    return identity_from_claims(issuer, claims)


def identity_from_claims(issuer: IssuerConfig, claims: dict) -> Identity:
    extra = {"issuer": issuer.issuer, "subject": claims["sub"]}
    for claim, key in (("email", "email"), ("name", "display_name"), ("jti", "jti")):
        value = claims.get(claim)
        if isinstance(value, str) and value:
            extra[key] = value
    username = claims.get("preferred_username")
    name = extra.get("email") or (username if isinstance(username, str) and username else None) or claims["sub"]
    return Identity(name=name, groups=issuer.map_groups(claimed_groups(claims, issuer.groups_claim)), method="oidc",
                    extra=extra)  # fmt: skip


def claimed_groups(claims: dict, claim: str) -> list[str]:
    """The groups a token claims: a list of strings or one space-separated string; a missing claim is no groups.

    The claim name is looked up as is first (Auth0-style names are URLs with dots), then as a dotted
    path into nested objects (Keycloak's realm_access.roles).
    """
    value: Any = claims.get(claim)
    if value is None and "." in claim:
        value = claims
        for part in claim.split("."):
            value = value.get(part) if isinstance(value, dict) else None
    if isinstance(value, str):
        return value.split()
    if isinstance(value, list):
        return [g for g in value if isinstance(g, str) and g]
    return []
