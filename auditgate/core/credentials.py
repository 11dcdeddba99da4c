"""Which request headers carry credentials or identities, to take them off callers' requests and out of records."""

import base64
import binascii

# Every header a caller (or a client library) may use to present a credential. The gateway consumes
# the caller's own and never forwards it; none of them may reach a record.
CREDENTIAL_HEADERS = (
    "authorization",
    "proxy-authorization",
    "api-key",  # Azure OpenAI
    "x-api-key",  # Anthropic and others
    "x-goog-api-key",
)

# Keys in flow.metadata that other addons use to hold credentials (mitmproxy's proxyauth keeps the
# proxy password there); they are removed before a flow is written.
CREDENTIAL_METADATA_KEYS = ("proxyauth",)

# Headers that carry an identity rather than a credential. The gateway's own (any x-auditgate-*
# header) are reserved: a caller's are dropped so nothing can mistake them for the gateway's. The
# others are what authenticating proxies (oauth2-proxy, Apache, nginx auth_request) put in front of
# services that trust them: a caller must not assert an identity to the upstream either.
IDENTITY_HEADER_PREFIX = "x-auditgate-"
IDENTITY_HEADERS = (
    "x-forwarded-user",
    "x-forwarded-email",
    "x-forwarded-groups",
    "x-forwarded-preferred-username",
    "x-forwarded-access-token",
    "x-auth-request-user",
    "x-auth-request-email",
    "x-auth-request-groups",
    "x-auth-request-preferred-username",
    "x-auth-request-access-token",
    "x-remote-user",
    "remote-user",
)


_CREDENTIAL_HEADER_BYTES = frozenset(h.encode() for h in CREDENTIAL_HEADERS)
_IDENTITY_HEADER_BYTES = frozenset(h.encode() for h in IDENTITY_HEADERS)
_IDENTITY_PREFIX_BYTES = IDENTITY_HEADER_PREFIX.encode()


def remove_credential_headers(headers) -> None:
    """Drop every credential header from a mitmproxy Headers object, in one pass over its fields."""
    fields = headers.fields
    kept = tuple(field for field in fields if field[0].lower() not in _CREDENTIAL_HEADER_BYTES)
    if len(kept) != len(fields):
        headers.fields = kept


def bearer_token(authorization: str) -> str | None:
    """The token of an 'Authorization: Bearer <token>' value, or None."""
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    return token


def remove_identity_headers(headers) -> list[str]:
    """Drop every identity header (see IDENTITY_HEADERS) from a mitmproxy Headers object; their names, lowercased."""
    fields = headers.fields
    removed = [
        name.lower()
        for name, _ in fields
        if name.lower() in _IDENTITY_HEADER_BYTES or name.lower().startswith(_IDENTITY_PREFIX_BYTES)
    ]
    if removed:
        headers.fields = tuple(f for f in fields if f[0].lower() not in removed)
    return sorted({n.decode("latin-1") for n in removed})


def proxy_credential(proxy_authorization: str) -> str | None:
    """The credential of a 'Proxy-Authorization: Basic base64(user:credential)' value, or None.

    HTTPS_PROXY=http://agent:<token>@gateway:8080 sends it: the password is the credential (the user
    name is free); a URL with only a user name (http://<token>@gateway:8080) carries it there instead.
    """
    scheme, _, encoded = proxy_authorization.strip().partition(" ")
    if scheme.lower() != "basic" or not encoded.strip():
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (binascii.Error, ValueError):
        return None
    user, _, password = decoded.partition(":")
    return password or user or None
