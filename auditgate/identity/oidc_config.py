"""The OIDC issuers the gateway trusts, read strictly from the `issuers:` section of rules/identities.yaml."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from auditgate.core.config import ConfigError, RulesFile, check_keys

# Asymmetric algorithms only: an HMAC algorithm would make the verification key a shared secret, and
# the classic confusion attack feeds a public key to HMAC as its secret. "none" is never accepted.
ASYMMETRIC_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA", "Ed25519"}
)
DEFAULT_ALGORITHMS = ("RS256", "ES256", "EdDSA")
DEFAULT_GROUPS_CLAIM = "groups"
DEFAULT_CLOCK_SKEW_SECONDS = 60
MAX_CLOCK_SKEW_SECONDS = 300
DEFAULT_JWKS_REFRESH_SECONDS = 300
DEFAULT_JWKS_EXPIRY_SECONDS = 3600
DEFAULT_JWKS_REFETCH_INTERVAL_SECONDS = 30
DEFAULT_FETCH_TIMEOUT_SECONDS = 5

_ISSUER_KEYS = {
    "issuer", "audience", "jwks_uri", "groups_claim", "groups_map", "algorithms", "clock_skew_seconds",
    "jwks_refresh_seconds", "jwks_expiry_seconds", "jwks_refetch_interval_seconds", "fetch_timeout_seconds",
    "ca_file",
}  # fmt: skip


@dataclass(frozen=True)
class IssuerConfig:
    """One trusted OIDC issuer: whose tokens, for which audience, with which keys and algorithms."""

    issuer: str
    audiences: tuple[str, ...]
    jwks_uri: str | None = None  # None: found by OIDC discovery at <issuer>/.well-known/openid-configuration
    groups_claim: str = DEFAULT_GROUPS_CLAIM
    # IdP group → gateway groups. When given, only mapped groups count; otherwise the claim is taken as is.
    groups_map: tuple[tuple[str, tuple[str, ...]], ...] | None = None
    algorithms: tuple[str, ...] = DEFAULT_ALGORITHMS
    clock_skew_seconds: int = DEFAULT_CLOCK_SKEW_SECONDS
    jwks_refresh_seconds: int = DEFAULT_JWKS_REFRESH_SECONDS
    jwks_expiry_seconds: int = DEFAULT_JWKS_EXPIRY_SECONDS
    jwks_refetch_interval_seconds: int = DEFAULT_JWKS_REFETCH_INTERVAL_SECONDS
    fetch_timeout_seconds: int = DEFAULT_FETCH_TIMEOUT_SECONDS
    ca_file: str | None = None  # a private CA for the IdP's HTTPS; the system trust store otherwise

    @property
    def discovery_uri(self) -> str:
        return self.issuer.rstrip("/") + "/.well-known/openid-configuration"

    def map_groups(self, claimed: list[str]) -> tuple[str, ...]:
        if self.groups_map is None:
            return tuple(dict.fromkeys(claimed))
        mapping = dict(self.groups_map)
        return tuple(dict.fromkeys(g for c in claimed for g in mapping.get(c, ())))


def is_acceptable_url(url: str) -> bool:
    """https, or plain http to a loopback address only (keys fetched in clear text could be swapped)."""
    parts = urlsplit(url)
    if not parts.hostname or parts.username or parts.password:
        return False
    if parts.scheme == "https":
        return True
    if parts.scheme != "http":
        return False
    if parts.hostname == "localhost":
        return True
    try:
        return ipaddress.ip_address(parts.hostname).is_loopback
    except ValueError:
        return False


def issuers_from(file: RulesFile) -> tuple[IssuerConfig, ...]:
    """The issuers of identities.yaml (read with service_tokens.read_identities_file)."""
    with file.locating():
        return _issuers(file)


def _issuers(file: RulesFile) -> tuple[IssuerConfig, ...]:
    path = file.path
    issuers: list[IssuerConfig] = []
    for i, entry in enumerate(file.list_of_mappings("issuers")):
        issuer = _issuer(path, i, entry)
        if any(other.issuer == issuer.issuer for other in issuers):
            raise _error(path, i, "issuer", f"issuers[{i}]: issuer {issuer.issuer!r} is listed twice")
        issuers.append(issuer)
    return tuple(issuers)


def _error(path: Path, index: int, key: str | None, reason: str) -> ConfigError:
    return ConfigError(path, reason, at=("issuers", index, *([key] if key else [])))


def _issuer(path: Path, i: int, entry: dict) -> IssuerConfig:
    where = f"issuers[{i}]"
    check_keys(path, where, entry, _ISSUER_KEYS, at=("issuers", i))

    def fail(key: str, reason: str) -> ConfigError:
        return _error(path, i, key, f"{where}: '{key}' {reason}")

    issuer = entry.get("issuer")
    if not isinstance(issuer, str) or not is_acceptable_url(issuer):
        raise fail("issuer", "must be the issuer's https URL, exactly as in its tokens' 'iss' (http only on loopback)")
    audience = entry.get("audience")
    audiences = [audience] if isinstance(audience, str) else audience
    if not isinstance(audiences, list) or not audiences or not all(isinstance(a, str) and a for a in audiences):
        raise fail("audience", "must be the audience (or a list of audiences) tokens are issued for")
    jwks_uri = entry.get("jwks_uri")
    if jwks_uri is not None and (not isinstance(jwks_uri, str) or not is_acceptable_url(jwks_uri)):
        raise fail("jwks_uri", "must be an https URL (http only on loopback)")
    groups_claim = entry.get("groups_claim", DEFAULT_GROUPS_CLAIM)
    if not isinstance(groups_claim, str) or not groups_claim:
        raise fail("groups_claim", "must be a claim name (a dotted path reaches into nested claims)")
    groups_map = entry.get("groups_map")
    if groups_map is not None:
        if not isinstance(groups_map, dict) or not all(
            isinstance(k, str) and (isinstance(v, str) or (isinstance(v, list) and all(isinstance(g, str) for g in v)))
            for k, v in groups_map.items()
        ):
            raise fail("groups_map", "must map IdP group names to a gateway group or a list of them")
        groups_map = tuple((k, (v,) if isinstance(v, str) else tuple(v)) for k, v in groups_map.items())
    algorithms = entry.get("algorithms", list(DEFAULT_ALGORITHMS))
    if (
        not isinstance(algorithms, list)
        or not algorithms
        or not all(isinstance(a, str) and a in ASYMMETRIC_ALGORITHMS for a in algorithms)
    ):
        raise fail("algorithms", f"must be a non-empty list from {', '.join(sorted(ASYMMETRIC_ALGORITHMS))}")

    def seconds(key: str, default: int, low: int, high: int) -> int:
        value = entry.get(key, default)
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            raise fail(key, f"must be a whole number of seconds from {low} to {high}")
        return value

    day = 86400
    config = IssuerConfig(
        issuer=issuer,
        audiences=tuple(audiences),
        jwks_uri=jwks_uri,
        groups_claim=groups_claim,
        groups_map=groups_map,
        algorithms=tuple(dict.fromkeys(algorithms)),
        clock_skew_seconds=seconds("clock_skew_seconds", DEFAULT_CLOCK_SKEW_SECONDS, 0, MAX_CLOCK_SKEW_SECONDS),
        jwks_refresh_seconds=seconds("jwks_refresh_seconds", DEFAULT_JWKS_REFRESH_SECONDS, 1, day),
        jwks_expiry_seconds=seconds("jwks_expiry_seconds", DEFAULT_JWKS_EXPIRY_SECONDS, 1, 7 * day),
        # At least a second: every token with an invented kid would otherwise cost a fetch from the IdP.
        jwks_refetch_interval_seconds=seconds(
            "jwks_refetch_interval_seconds", DEFAULT_JWKS_REFETCH_INTERVAL_SECONDS, 1, day
        ),
        fetch_timeout_seconds=seconds("fetch_timeout_seconds", DEFAULT_FETCH_TIMEOUT_SECONDS, 1, 60),
        ca_file=entry.get("ca_file"),
    )
    if config.jwks_expiry_seconds < config.jwks_refresh_seconds:
        raise fail("jwks_expiry_seconds", "must not be shorter than jwks_refresh_seconds")
    if config.ca_file is not None and (not isinstance(config.ca_file, str) or not Path(config.ca_file).is_file()):
        raise fail("ca_file", "must name a readable PEM file of CA certificates")
    return config
