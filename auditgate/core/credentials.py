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
# others are what authenticating proxies put in front of services that trust them: a caller must not
# assert an identity to the upstream either. Each family is named by its prefix where it has several
# members (Azure App Service's x-ms-client-principal-*, Google IAP's x-goog-authenticated-user-*,
# Cloudflare Access's cf-access-*, AWS ALB's x-amzn-oidc-*...).
IDENTITY_HEADER_PREFIX = "x-auditgate-"
IDENTITY_HEADERS = (
    # oauth2-proxy, nginx auth_request, Apache, Traefik forward-auth, Authelia
    "x-forwarded-user",
    "x-forwarded-email",
    "x-forwarded-groups",
    "x-forwarded-preferred-username",
    "x-forwarded-access-token",
    "x-remote-user",
    "x-remote-email",
    "x-remote-groups",
    "remote-user",
    "remote-email",
    "remote-groups",
    "remote-name",
    "x-webauth-user",
    "x-user",
    "x-email",
    "x-userinfo",
    "x-jwt-assertion",
    "x-id-token",
    "x-access-token",
)
IDENTITY_HEADER_PREFIXES = (
    IDENTITY_HEADER_PREFIX,
    "x-auth-request-",  # oauth2-proxy, nginx auth_request
    "x-ms-client-principal",  # Azure App Service / Static Web Apps (EasyAuth): -name, -id, -idp, bare
    "x-ms-token-",  # EasyAuth's token store: x-ms-token-aad-access-token...
    "x-goog-authenticated-user-",  # Google IAP: -email, -id
    "x-goog-iap-",  # Google IAP: x-goog-iap-jwt-assertion
    "cf-access-",  # Cloudflare Access: -authenticated-user-email, -jwt-assertion, -client-id/-secret
    "x-amzn-oidc-",  # AWS ALB: -identity, -data, -accesstoken
    "x-pomerium-",  # Pomerium: -jwt-assertion, -claim-*
    "x-authenticated-",  # Kong: -userid, -scope, -groups
    "x-consumer-",  # Kong: -id, -username, -custom-id
    "x-forwarded-user-",
    "x-oidc-",
    "oidc_claim_",  # mod_auth_openidc
    "oidc-claim-",
)

# Query parameters that carry a credential (a token in a URL: ?api_key=, ?key=, ?access_token=...).
# The gateway never reads one; they are removed from the URL before anything records or logs it,
# and never go upstream. Compared after lowercasing and dropping "-", "_" and ".".
CREDENTIAL_QUERY_NAMES = frozenset({
    "key", "apikey", "xapikey", "token", "accesstoken", "authtoken", "idtoken", "refreshtoken", "bearer",
    "jwt", "auth", "authorization", "password", "passwd", "pwd", "secret", "clientsecret", "sig", "signature",
    "subscriptionkey", "ocpapimsubscriptionkey", "xgoogapikey", "sessiontoken", "session", "sessionid",
    "credential", "credentials", "xamzcredential", "xamzsignature", "xamzsecuritytoken", "code",
})
_CREDENTIAL_QUERY_SUFFIXES = ("token", "secret", "password", "apikey", "signature", "credential")


def is_credential_query_name(name: str) -> bool:
    """True for a query parameter name that carries a credential (see CREDENTIAL_QUERY_NAMES)."""
    plain = name.lower().replace("-", "").replace("_", "").replace(".", "").removesuffix("[]")
    return plain in CREDENTIAL_QUERY_NAMES or plain.endswith(_CREDENTIAL_QUERY_SUFFIXES)


def remove_query_credentials(request) -> list[str]:
    """Drop every credential parameter from a mitmproxy Request's query; their names, lowercased."""
    if "?" not in request.path:
        return []
    query = request.query
    removed = sorted({name.lower() for name in query.keys() if is_credential_query_name(name)})
    if removed:
        request.query = [(k, v) for k, v in query.items(multi=True) if not is_credential_query_name(k)]
    return removed


_CREDENTIAL_HEADER_BYTES = frozenset(h.encode() for h in CREDENTIAL_HEADERS)
_IDENTITY_HEADER_BYTES = frozenset(h.encode() for h in IDENTITY_HEADERS)
_IDENTITY_PREFIX_BYTES = tuple(p.encode() for p in IDENTITY_HEADER_PREFIXES)


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


def is_identity_header(name: bytes | str) -> bool:
    """True for a header that asserts who the caller is (see IDENTITY_HEADERS and IDENTITY_HEADER_PREFIXES)."""
    lowered = (name.encode("latin-1") if isinstance(name, str) else name).lower()
    return lowered in _IDENTITY_HEADER_BYTES or lowered.startswith(_IDENTITY_PREFIX_BYTES)


def is_credential_header(name: bytes | str) -> bool:
    return (name.encode("latin-1") if isinstance(name, str) else name).lower() in _CREDENTIAL_HEADER_BYTES


def remove_identity_headers(headers) -> list[str]:
    """Drop every identity header (see IDENTITY_HEADERS) from a mitmproxy Headers object; their names, lowercased."""
    fields = headers.fields
    removed = []
    for name, _ in fields:
        lowered = name.lower()
        if lowered in _IDENTITY_HEADER_BYTES or lowered.startswith(_IDENTITY_PREFIX_BYTES):
            removed.append(lowered)
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
