"""Identifies every caller, on every request, by service token or OIDC JWT, and takes the caller's credentials off."""

from __future__ import annotations

import logging
import sys
import weakref
from pathlib import Path

from mitmproxy import connection, exceptions, http

from auditgate.core.config import ConfigError
from auditgate.core.credentials import (
    CREDENTIAL_METADATA_KEYS,
    bearer_token,
    proxy_credential,
    remove_credential_headers,
    remove_identity_headers,
    remove_query_credentials,
)
from auditgate.core.flow_contract import (
    AUTH_FAILURE,
    IDENTITY,
    REMOVED_IDENTITY_HEADERS,
    services,
)
from auditgate.core.options import add_gateway_options, rules_dir
from auditgate.core.refusal import is_answered, refuse
from auditgate.core.request_facts import header_value
from auditgate.identity.authenticator import AuthFailure, CallerAuthenticator
from auditgate.identity.identities_file import IdentitiesFile, identities_file
from auditgate.identity.service_tokens import IDENTITIES_FILE, add_service_token

logger = logging.getLogger("auditgate.addons.caller_auth")

FIRST_IDENTITY = "operator"


class CallerAuth:
    """Authenticates every request (401 otherwise) and strips the caller's credentials and identity headers."""

    def __init__(self) -> None:
        self.identities: IdentitiesFile | None = None
        # Forward mode: the credential from a connection's CONNECT (HTTPS_PROXY=http://user:<token>@...),
        # in memory only, for that connection's lifetime. It is verified again on every request.
        self._connect_credentials: weakref.WeakKeyDictionary[connection.Client, str] = weakref.WeakKeyDictionary()

    @property
    def authenticator(self) -> CallerAuthenticator | None:
        return self.identities.current().authenticator if self.identities else None

    def load(self, loader) -> None:
        add_gateway_options(loader)

    def configure(self, updated: set[str]) -> None:
        if "gateway_rules" not in updated:
            return
        directory = rules_dir()
        try:
            identities = identities_file(directory)
            snapshot = identities.current()
            if len(snapshot.authenticator.service_tokens) == 0 and not snapshot.authenticator.issuers:
                self._mint_first_identity(directory)
                snapshot = identities.reload()
        except (ConfigError, OSError) as e:
            raise exceptions.OptionsError(f"auditgate: {e}") from None
        self.identities = identities
        logger.info("caller identities: %s", snapshot.describe())

    def running(self) -> None:
        # Fetch the issuers' keys now, in the background, so the first caller does not wait for them.
        if self.authenticator:
            self.authenticator.prefetch()

    @staticmethod
    def _mint_first_identity(directory: Path) -> None:
        # Like Jupyter: a gateway with no identity would refuse everything, so it makes one and shows
        # its token once, on the console only (never through logging, which may be shipped elsewhere).
        token = add_service_token(directory, FIRST_IDENTITY, ["admins"])
        print(
            f"\nauditgate: no caller identity was configured, so one was created: '{FIRST_IDENTITY}' (groups: admins).\n"
            f"auditgate: its token is shown this once; only its hash is stored in {directory / IDENTITIES_FILE}:\n\n"
            f"    OPENAI_API_KEY={token}\n\n"
            f"auditgate: mint more with: auditgate token new NAME --group GROUP --rules {directory}\n",
            file=sys.stdout,
            flush=True,
        )
        services.minted_identity = FIRST_IDENTITY

    def http_connect(self, flow: http.HTTPFlow) -> None:
        # Forward mode: keep the proxy credential for the requests in this tunnel; it leaves the flow now.
        credential = proxy_credential(flow.request.headers.get("proxy-authorization", ""))
        # If an operator switched on mitmproxy's own proxyauth, it has consumed the header already and
        # parked (user, password) in the metadata, which must never reach a record.
        parked = flow.metadata.pop("proxyauth", None)
        if credential is None and parked:
            credential = parked[1] or parked[0] or None
        remove_credential_headers(flow.request.headers)
        if credential:
            self._connect_credentials[flow.client_conn] = credential

    def client_disconnected(self, client: connection.Client) -> None:
        self._connect_credentials.pop(client, None)

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        # A credential in the URL (?api_key=, ?key=, ?access_token=...) is never read by the gateway and
        # must not be kept: it comes off before any later hook, mitmweb's view (added after the scripts)
        # or a refusal's log line sees the URL. The request hook does it again for a flow without this one.
        self._remove_query_credentials(flow)

    @staticmethod
    def _remove_query_credentials(flow: http.HTTPFlow) -> None:
        removed = remove_query_credentials(flow.request)
        if removed:
            logger.warning("removed credential query parameter(s) sent by client %s: %s",
                           flow.client_conn.peername[0] if flow.client_conn.peername else "?", ", ".join(removed))

    def _credential(self, flow: http.HTTPFlow, authenticator: CallerAuthenticator) -> tuple[str | None, str]:
        """The credential this request authenticates with, and where it came from."""
        headers = flow.request.headers
        own = bearer_token(header_value(headers, b"authorization")) or header_value(headers, b"api-key").strip() or None
        # A plain-HTTP request through the proxy carries Proxy-Authorization itself; a tunnel had it on CONNECT.
        on_request = proxy_credential(header_value(headers, b"proxy-authorization"))
        proxy = on_request or self._connect_credentials.get(flow.client_conn)
        # A per-request credential wins. The SDK always sends OPENAI_API_KEY, though, so with the token
        # in HTTPS_PROXY a placeholder there (neither a JWT nor a service token) leaves the proxy's.
        if own and (proxy is None or authenticator.is_gateway_credential(own)):
            return own, "authorization"
        if proxy:
            return proxy, "proxy-authorization" if on_request else "connect"
        return own, "authorization"

    async def request(self, flow: http.HTTPFlow) -> None:
        if not flow.live or is_answered(flow):
            return
        for key in CREDENTIAL_METADATA_KEYS:  # mitmproxy's proxyauth, if switched on, parks the password here
            flow.metadata.pop(key, None)
        self._remove_query_credentials(flow)
        forged = remove_identity_headers(flow.request.headers)
        if forged:
            REMOVED_IDENTITY_HEADERS.set(flow, forged)
            client = flow.client_conn.peername[0]
            logger.warning("removed identity header(s) sent by client %s: %s", client, ", ".join(forged))
        # One snapshot of identities.yaml for the whole request (an edited file is parsed off the loop).
        authenticator = (await self.identities.refreshed()).authenticator if self.identities else None
        credential, source = self._credential(flow, authenticator) if authenticator else (None, "authorization")
        # The caller's credentials are consumed here whatever the outcome: they never travel on.
        remove_credential_headers(flow.request.headers)
        try:
            result = await authenticator.authenticate(credential) if authenticator else None
        except Exception:  # an addon error would let mitmproxy carry on with the request: fail closed instead
            logger.exception("authentication failed with an internal error")
            result = AuthFailure("the gateway could not verify the token", "unknown")
        if result is None or isinstance(result, AuthFailure):
            failure = result or AuthFailure("the gateway has no identities loaded", "none")
            AUTH_FAILURE.set(flow, {**failure.as_metadata(), "source": source})
            logger.info("unauthenticated %s %s%s from %s: %s", flow.request.method, flow.request.pretty_host,
                        flow.request.path.split("?", 1)[0], flow.client_conn.peername[0], failure.reason)  # fmt: skip
            refuse(flow, 401, "gateway_unauthenticated", failure.reason)
            return
        IDENTITY.set(flow, result.as_metadata())
        if logger.isEnabledFor(logging.DEBUG):  # its arguments cost more than the rest of this hook
            logger.debug("caller %s: %s %s%s", result.describe(), flow.request.method, flow.request.pretty_host,
                        flow.request.path.split("?", 1)[0])  # fmt: skip


addons = [CallerAuth()]
