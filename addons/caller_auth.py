"""Identifies every caller by its service token and takes the caller's credentials off the request."""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

from mitmproxy import exceptions, http

from addons.credentials import bearer_token, remove_credential_headers
from addons.gateway_options import add_gateway_options, rules_dir
from addons.identity import IDENTITIES_FILE, ServiceTokens, add_service_token, load_service_tokens
from addons.openai_errors import is_answered, refuse
from addons.rules_yaml import ConfigError

logger = logging.getLogger(__name__)

FIRST_IDENTITY = "operator"
RELOAD_CHECK_SECONDS = 1.0


class CallerAuth:
    """Authenticates callers by service token (401 otherwise) and strips their credentials."""

    def __init__(self) -> None:
        self.tokens: ServiceTokens | None = None
        self._path: Path | None = None
        self._mtime: float | None = None
        self._next_check = 0.0

    def load(self, loader) -> None:
        add_gateway_options(loader)

    def configure(self, updated: set[str]) -> None:
        if "gateway_rules" not in updated:
            return
        directory = rules_dir()
        try:
            tokens = load_service_tokens(directory)
            if len(tokens) == 0:
                tokens = self._mint_first_identity(directory)
        except (ConfigError, OSError) as e:
            raise exceptions.OptionsError(f"auditgate: {e}") from None
        self._path = directory / IDENTITIES_FILE
        self._mtime = self._stat()
        self.tokens = tokens
        logger.info("caller identities: %d service token(s)", len(tokens))

    @staticmethod
    def _mint_first_identity(directory: Path) -> ServiceTokens:
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
        return load_service_tokens(directory)

    def _stat(self) -> float | None:
        try:
            return os.stat(self._path).st_mtime if self._path else None
        except OSError:
            return None

    def _reload_if_changed(self) -> None:
        # Tokens minted with `auditgate token new` take effect without a restart; an invalid file
        # keeps the identities already loaded.
        now = time.monotonic()
        if now < self._next_check:
            return
        self._next_check = now + RELOAD_CHECK_SECONDS
        mtime = self._stat()
        if mtime == self._mtime or self._path is None:
            return
        self._mtime = mtime
        try:
            self.tokens = load_service_tokens(self._path.parent)
            logger.info("caller identities reloaded: %d service token(s)", len(self.tokens))
        except ConfigError as e:
            logger.error("keeping the previous identities: %s", e)

    def request(self, flow: http.HTTPFlow) -> None:
        if not flow.live or is_answered(flow):
            return
        self._reload_if_changed()
        headers = flow.request.headers
        token = bearer_token(headers.get("authorization", "")) or headers.get("api-key", "").strip() or None
        # The caller's credentials are consumed here whatever the outcome: they never travel on.
        remove_credential_headers(headers)
        identity = self.tokens.authenticate(token) if (token and self.tokens) else None
        if identity is None:
            reason = "invalid gateway token" if token else "missing gateway token (send 'Authorization: Bearer <token>')"
            refuse(flow, 401, "gateway_unauthenticated", reason)
            return
        flow.metadata["auditgate.identity"] = identity.as_metadata()


addons = [CallerAuth()]
