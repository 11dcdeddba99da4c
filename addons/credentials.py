"""Which request headers carry credentials, so they can be taken off callers' requests and out of records."""

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


_CREDENTIAL_HEADER_BYTES = frozenset(h.encode() for h in CREDENTIAL_HEADERS)


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
