"""Lets each authenticated caller use only the upstreams, endpoints and models its groups are granted."""

from __future__ import annotations

import logging

from mitmproxy import exceptions, http

from auditgate.core.config import ConfigError
from auditgate.core.flow_contract import AUTHORIZATION, IDENTITY, UPSTREAM
from auditgate.core.options import add_gateway_options, rules_dir
from auditgate.core.refusal import is_answered, refuse
from auditgate.core.request_facts import facts_of
from auditgate.identity.identities_file import IdentitiesFile, identities_file

logger = logging.getLogger("auditgate.addons.authorization")


class GroupAuthorization:
    """Refuses with 403 gateway_forbidden what no grant in identities.yaml allows the caller's groups."""

    def __init__(self) -> None:
        self.identities: IdentitiesFile | None = None

    def load(self, loader) -> None:
        add_gateway_options(loader)

    def configure(self, updated: set[str]) -> None:
        if "gateway_rules" not in updated:
            return
        try:
            self.identities = identities_file(rules_dir())
        except ConfigError as e:
            raise exceptions.OptionsError(f"auditgate: {e}") from None
        rules = self.identities.current().authorization
        if rules is None:
            logger.info("authorization: no 'authorization' section, every authenticated caller may use every upstream")
        else:
            logger.info("authorization: %d grant(s); anything not granted is refused", len(rules.grants))

    def request(self, flow: http.HTTPFlow) -> None:
        if not flow.live or is_answered(flow):
            return
        if self.identities is None:
            refuse(flow, 503, "gateway_not_configured", "the gateway has no authorization loaded")
            return
        rules = self.identities.current().authorization
        if rules is None:
            return
        identity = IDENTITY.get(flow)
        if not identity:  # loaded without caller_auth: nobody to grant anything to
            refuse(flow, 403, "gateway_forbidden", "the request has no authenticated caller")
            return
        upstream = UPSTREAM.get(flow) or {}
        host, port = upstream.get("host", flow.request.host), upstream.get("port", flow.request.port)
        decision = rules.decide(
            tuple(identity.get("groups", ())), host, port, flow.request.path, lambda: facts_of(flow).model
        )
        AUTHORIZATION.set(flow, decision.as_metadata())
        if not decision.allowed:
            logger.info("forbidden for %s: %s", identity.get("name"), decision.reason)
            refuse(flow, 403, "gateway_forbidden", decision.reason)


addons = [GroupAuthorization()]
