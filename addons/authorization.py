"""Lets each authenticated caller use only the upstreams, endpoints and models its groups are granted."""

from __future__ import annotations

import json
import logging

from mitmproxy import http

from addons.authorization_rules import Authorization, authorization_from
from addons.file_watch import ChangedFile
from addons.gateway_options import add_gateway_options, load_rules, rules_dir
from addons.identity import IDENTITIES_FILE, read_identities_file
from addons.openai_errors import is_answered, refuse
from addons.rules_yaml import ConfigError

logger = logging.getLogger(__name__)



def requested_model(request: http.Request) -> str | None:
    """The "model" a request names: in a JSON body, or a form field (audio and image uploads)."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    try:
        if content_type in ("multipart/form-data", "application/x-www-form-urlencoded"):
            form = request.multipart_form if content_type == "multipart/form-data" else request.urlencoded_form
            value = form.get(b"model") if content_type == "multipart/form-data" else form.get("model")
            value = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
        else:
            body = request.get_content(strict=False)
            value = json.loads(body).get("model") if body else None
    except (ValueError, AttributeError):
        return None
    return value if isinstance(value, str) and value else None


class GroupAuthorization:
    """Refuses with 403 gateway_forbidden what no grant in identities.yaml allows the caller's groups."""

    def __init__(self) -> None:
        self.rules: Authorization | None = None  # None: no authorization section, every caller may use every upstream
        self._watch: ChangedFile | None = None

    def load(self, loader) -> None:
        add_gateway_options(loader)

    def configure(self, updated: set[str]) -> None:
        if "gateway_rules" not in updated:
            return
        self.rules = load_rules(lambda directory: authorization_from(*read_identities_file(directory)))
        self._watch = ChangedFile(rules_dir() / IDENTITIES_FILE)
        self._log_loaded("authorization")

    def _log_loaded(self, what: str) -> None:
        if self.rules is None:
            logger.info("%s: no 'authorization' section, every authenticated caller may use every upstream", what)
        else:
            logger.info("%s: %d grant(s); anything not granted is refused", what, len(self.rules.grants))

    def _reload_if_changed(self) -> None:
        if self._watch is None or not self._watch.changed():
            return
        try:
            self.rules = authorization_from(*read_identities_file(self._watch.path.parent))
            self._log_loaded("authorization reloaded")
        except ConfigError as e:
            logger.error("keeping the previous authorization: %s", e)

    def request(self, flow: http.HTTPFlow) -> None:
        if not flow.live or is_answered(flow):
            return
        self._reload_if_changed()
        if self.rules is None:
            return
        identity = flow.metadata.get("auditgate.identity")
        if not identity:  # loaded without caller_auth: nobody to grant anything to
            refuse(flow, 403, "gateway_forbidden", "the request has no authenticated caller")
            return
        upstream = flow.metadata.get("auditgate.upstream") or {}
        host, port = upstream.get("host", flow.request.host), upstream.get("port", flow.request.port)
        decision = self.rules.decide(
            tuple(identity.get("groups", ())), host, port, flow.request.path, lambda: requested_model(flow.request)
        )
        flow.metadata["auditgate.authorization"] = decision.as_metadata()
        if not decision.allowed:
            logger.info("forbidden for %s: %s", identity.get("name"), decision.reason)
            refuse(flow, 403, "gateway_forbidden", decision.reason)


addons = [GroupAuthorization()]
