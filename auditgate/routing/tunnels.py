"""Tunnels the gateway relays without reading them: who may open one, what is written about it, what is refused.

A CONNECT to a host listed under ``passthrough:`` in upstreams.yaml opens a tunnel whose bytes the
gateway does not decrypt. Such a tunnel is opened only for an authenticated caller (a credential on
the CONNECT), only when the grants allow it, and only while the audit log takes its entries: one when
it opens, one when it ends (bytes each way, duration). Every other way bytes could pass unread (raw
TCP or UDP after a CONNECT to an intercepted upstream, mitmproxy's ``ignore_hosts``, ``tcp_hosts`` ...)
is refused. No mitmproxy import here: the addon ``addons/tunnels.py`` and the layers in
``routing/tunnel_layers.py`` speak mitmproxy.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from auditgate.core.credentials import bearer_token, proxy_credential
from auditgate.identity.grants import Authorization

AUDIT_KIND = "tunnel"  # the audit entry kind of every tunnel event (see TunnelMeter.*_fields)
PROXY_AUTHENTICATE = ('Basic realm="auditgate"', 'Bearer realm="auditgate"')

# mitmproxy options that make it relay bytes it neither reads nor hands to any hook of ours, and why
# each is refused: the operator lists pass-through hosts in upstreams.yaml instead, where they are governed.
UNGOVERNED_HOST_OPTIONS = {
    "ignore_hosts": "tunnels these hosts untouched: no caller authentication, no audit entry",
    "allow_hosts": "tunnels every other host untouched: no caller authentication, no audit entry",
    "tcp_hosts": "relays raw TCP to these hosts: no caller authentication, no audit entry",
    "udp_hosts": "relays raw UDP to these hosts: no caller authentication, no audit entry",
}
# Proxy modes whose traffic is never an HTTP request the gateway's hooks see: raw bytes or DNS.
UNGOVERNED_REVERSE_SCHEMES = frozenset({"tcp", "tls", "udp", "dtls", "dns", "quic"})


def ungoverned_options(options: Mapping[str, object], modes: Iterable[tuple[str, str | None]]) -> list[str]:
    """Why the given option values would open ungoverned tunnels; empty when none would.

    ``options``: option name → value (the host lists); ``modes``: (mode type, reverse scheme or None).
    """
    problems = [
        f"{name}={list(value)!r} {why}; list pass-through hosts under 'passthrough:' in upstreams.yaml instead"
        for name, why in UNGOVERNED_HOST_OPTIONS.items()
        if (value := options.get(name))
    ]
    for kind, scheme in modes:
        if kind == "dns":
            problems.append("mode=dns answers DNS itself, outside every check of the gateway")
        elif kind == "reverse" and scheme in UNGOVERNED_REVERSE_SCHEMES:
            problems.append(f"mode=reverse:{scheme}://... relays raw {scheme} bytes, never an HTTP request the "
                            "gateway can authenticate, check or record")
    return problems


def tunnel_credential(proxy_authorization: str, parked: Sequence[str] | None = None) -> str | None:
    """The credential on a CONNECT: ``Proxy-Authorization: Bearer <token>``, or Basic with the token as password.

    ``parked``: mitmproxy's own proxyauth, if an operator switched it on, has consumed the header and
    left (user, password) in the flow's metadata.
    """
    credential = bearer_token(proxy_authorization) or proxy_credential(proxy_authorization)
    if credential is None and parked:
        credential = (parked[1] if len(parked) > 1 else "") or parked[0] or None
    return credential


@dataclass(frozen=True)
class TunnelGrant:
    allowed: bool
    reason: str = ""  # for a refusal: safe to show the caller
    grant: int | None = None


def may_tunnel(authorization: Authorization | None, groups: Sequence[str], host: str, port: int) -> TunnelGrant:
    """Whether a caller in these groups may open a tunnel to a pass-through host.

    Without an ``authorization:`` section every authenticated caller may, as for the upstreams. With
    one, a grant must cover one of the caller's groups and name the host under ``upstreams`` (a grant
    without ``upstreams`` means every *upstream*, the hosts the gateway reads, not pass-through hosts),
    and must not limit ``endpoints`` or ``models``: inside a tunnel the gateway cannot see either, so
    such a grant cannot be honoured there.
    """
    if authorization is None:
        return TunnelGrant(True)
    who = f"group(s) [{', '.join(groups)}]" if groups else "a caller without groups"
    grants = [g for g in authorization.grants if g.covers(tuple(groups))]
    if not grants:
        return TunnelGrant(False, f"no authorization grant covers {who}")
    for grant in grants:
        if grant.upstreams is not None and grant.allows_upstream(host, port) and grant.endpoints is None \
                and grant.models is None:
            return TunnelGrant(True, grant=grant.index)
    return TunnelGrant(False, f"pass-through host {host}:{port} is not granted to {who} (a grant must name it "
                              "under 'upstreams', without 'endpoints' or 'models')")


@dataclass
class TunnelMeter:
    """One tunnel's audit facts: who, where, how many bytes each way, for how long. Never the bytes."""

    tunnel_id: str  # the CONNECT flow's id
    host: str
    port: int
    client: str | None
    caller: str | None = None
    identity: dict | None = None
    grant: int | None = None
    started: float = field(default_factory=time.monotonic)
    bytes_up: int = 0  # client → host
    bytes_down: int = 0  # host → client
    ended: str | None = None  # why it ended, once it has

    def count(self, from_client: bool, size: int) -> None:
        if from_client:
            self.bytes_up += size
        else:
            self.bytes_down += size

    def duration_ms(self, now: float | None = None) -> int:
        return max(0, int(((now if now is not None else time.monotonic()) - self.started) * 1000))

    def _where(self) -> dict:
        return {"tunnel_id": self.tunnel_id, "caller": self.caller, "client": self.client, "host": self.host,
                "port": self.port}

    def opened_fields(self) -> dict:
        return {"event": "opened", **self._where(), "identity": self.identity, "grant": self.grant}

    def closed_fields(self, now: float | None = None) -> dict:
        return {"event": "closed", **self._where(), "bytes_up": self.bytes_up, "bytes_down": self.bytes_down,
                "duration_ms": self.duration_ms(now), "ended": self.ended}

    def record(self, now: float | None = None) -> dict:
        """The TUNNEL flow-metadata record (auditgate.core.flow_contract.TunnelRecord)."""
        return {"caller": self.caller, "host": self.host, "port": self.port, "bytes_up": self.bytes_up,
                "bytes_down": self.bytes_down, "duration_ms": self.duration_ms(now)}


def refused_fields(host: str | None, port: int | None, client: str | None, what: str, reason: str,
                   tunnel_id: str | None = None, caller: str | None = None) -> dict:
    """The audit fields of a tunnel refused after its CONNECT was accepted (raw bytes to an intercepted host)."""
    return {"event": "refused", "tunnel_id": tunnel_id, "caller": caller, "client": client, "host": host,
            "port": port, "what": what, "refused": reason}
