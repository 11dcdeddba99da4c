"""Identifies every caller, on every request, by service token or OIDC JWT, and takes the caller's credentials off."""

from __future__ import annotations

import logging
import sys
import weakref
from pathlib import Path

from mitmproxy import connection, exceptions, http

from addons.credentials import (
    CREDENTIAL_METADATA_KEYS,
    bearer_token,
    proxy_credential,
    remove_credential_headers,
    remove_identity_headers,
)
from addons.file_watch import ChangedFile
from addons.gateway_options import add_gateway_options, rules_dir
from addons.identity import IDENTITIES_FILE, add_service_token
from addons.oidc_authenticator import AuthFailure, CallerAuthenticator
from addons.openai_errors import is_answered, refuse
from addons.rules_yaml import ConfigError

logger = logging.getLogger(__name__)

FIRST_IDENTITY = "operator"


class CallerAuth:
    """Authenticates every request (401 otherwise) and strips the caller's credentials and identity headers."""

    def __init__(self) -> None:
        self.authenticator: CallerAuthenticator | None = None
        self._watch: ChangedFile | None = None
        # Forward mode: the credential from a connection's CONNECT (HTTPS_PROXY=http://user:<token>@...),
        # in memory only, for that connection's lifetime. It is verified again on every request.
        self._connect_credentials: weakref.WeakKeyDictionary[connection.Client, str] = weakref.WeakKeyDictionary()

    def load(self, loader) -> None:
        add_gateway_options(loader)

    def configure(self, updated: set[str]) -> None:
        if "gateway_rules" not in updated:
            return
        directory = rules_dir()
        try:
            authenticator = CallerAuthenticator.from_rules(directory)
            if len(authenticator.service_tokens) == 0 and not authenticator.issuers:
                authenticator = self._mint_first_identity(directory)
        except (ConfigError, OSError) as e:
            raise exceptions.OptionsError(f"auditgate: {e}") from None
        self._watch = ChangedFile(directory / IDENTITIES_FILE)
        self.authenticator = authenticator
        self._log_loaded("caller identities")

    def running(self) -> None:
        # Fetch the issuers' keys now, in the background, so the first caller does not wait for them.
        if self.authenticator:
            self.authenticator.prefetch()

    def _log_loaded(self, what: str) -> None:
        assert self.authenticator
        issuers = ", ".join(self.authenticator.issuers) or "none"
        logger.info("%s: %d service token(s); OIDC issuers: %s", what, len(self.authenticator.service_tokens), issuers)

    @staticmethod
    def _mint_first_identity(directory: Path) -> CallerAuthenticator:
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
        return CallerAuthenticator.from_rules(directory)

    def _reload_if_changed(self) -> None:
        # Tokens minted with `auditgate token new` and edited issuers take effect without a restart; an
        # invalid file keeps the identities already loaded. Unchanged issuers keep their cached keys.
        if self._watch is None or not self._watch.changed():
            return
        try:
            self.authenticator = CallerAuthenticator.from_rules(self._watch.path.parent, previous=self.authenticator)
            self.authenticator.prefetch()
            self._log_loaded("caller identities reloaded")
        except ConfigError as e:
            logger.error("keeping the previous identities: %s", e)

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

    def _credential(self, flow: http.HTTPFlow) -> tuple[str | None, str]:
        """The credential this request authenticates with, and where it came from."""
        headers = flow.request.headers
        own = bearer_token(headers.get("authorization", "")) or headers.get("api-key", "").strip() or None
        # A plain-HTTP request through the proxy carries Proxy-Authorization itself; a tunnel had it on CONNECT.
        on_request = proxy_credential(headers.get("proxy-authorization", ""))
        proxy = on_request or self._connect_credentials.get(flow.client_conn)
        # A per-request credential wins. The SDK always sends OPENAI_API_KEY, though, so with the token
        # in HTTPS_PROXY a placeholder there (neither a JWT nor a service token) leaves the proxy's.
        if own and (proxy is None or self.authenticator.is_gateway_credential(own)):
            return own, "authorization"
        if proxy:
            return proxy, "proxy-authorization" if on_request else "connect"
        return own, "authorization"

    async def request(self, flow: http.HTTPFlow) -> None:
        if not flow.live or is_answered(flow):
            return
        self._reload_if_changed()
        for key in CREDENTIAL_METADATA_KEYS:  # mitmproxy's proxyauth, if switched on, parks the password here
            flow.metadata.pop(key, None)
        forged = remove_identity_headers(flow.request.headers)
        if forged:
            flow.metadata["auditgate.removed_identity_headers"] = forged
            client = flow.client_conn.peername[0]
            logger.warning("removed identity header(s) sent by client %s: %s", client, ", ".join(forged))
        credential, source = self._credential(flow) if self.authenticator else (None, "authorization")
        # The caller's credentials are consumed here whatever the outcome: they never travel on.
        remove_credential_headers(flow.request.headers)
        try:
            result = await self.authenticator.authenticate(credential) if self.authenticator else None
        except Exception:  # an addon error would let mitmproxy carry on with the request: fail closed instead
            logger.exception("authentication failed with an internal error")
            result = AuthFailure("the gateway could not verify the token", "unknown")
        if result is None or isinstance(result, AuthFailure):
            failure = result or AuthFailure("the gateway has no identities loaded", "none")
            flow.metadata["auditgate.auth_failure"] = {**failure.as_metadata(), "source": source}
            logger.info("unauthenticated %s %s%s from %s: %s", flow.request.method, flow.request.pretty_host,
                        flow.request.path.split("?", 1)[0], flow.client_conn.peername[0], failure.reason)  # fmt: skip
            refuse(flow, 401, "gateway_unauthenticated", failure.reason)
            return
        flow.metadata["auditgate.identity"] = result.as_metadata()
        logger.debug("caller %s: %s %s%s", result.describe(), flow.request.method, flow.request.pretty_host,
                    flow.request.path.split("?", 1)[0])  # fmt: skip


addons = [CallerAuth()]
