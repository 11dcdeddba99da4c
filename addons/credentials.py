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


def bearer_token(authorization: str) -> str | None:
    """The token of an 'Authorization: Bearer <token>' value, or None."""
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    return token
