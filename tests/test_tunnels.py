"""Tunnels without a running proxy: credentials on a CONNECT, grants, the options refused, the addon's hooks.

The same paths through a real mitmdump: tests/test_tunnels_e2e.py.
"""

from __future__ import annotations

import asyncio
import base64

import pytest
from mitmproxy import exceptions
from mitmproxy.proxy.context import Context
from mitmproxy.proxy.layers import (
    ClientTLSLayer,
    DNSLayer,
    HttpLayer,
    ServerTLSLayer,
    TCPLayer,
    UDPLayer,
)
from mitmproxy.proxy.layers.http import HTTPMode
from mitmproxy.test import taddons, tflow

from addons.tunnels import Tunnels
from auditgate.core.flow_contract import PASSTHROUGH, TUNNEL, AuditUnavailable, services
from auditgate.identity.grants import Authorization, Grant
from auditgate.identity.service_tokens import add_service_token
from auditgate.routing.tunnel_layers import MeteredTunnelLayer, unread_layer
from auditgate.routing.tunnels import (
    TunnelMeter,
    may_tunnel,
    tunnel_credential,
    ungoverned_options,
)
from tests.conftest import make_rules


def _basic(value: str) -> str:
    return "Basic " + base64.b64encode(value.encode()).decode()


@pytest.mark.parametrize("header, parked, expected", [
    ("Bearer agt_abc", None, "agt_abc"),
    ("bearer   agt_abc ", None, "agt_abc"),
    (_basic("agent:agt_abc"), None, "agt_abc"),
    (_basic("agt_abc"), None, "agt_abc"),  # http://<token>@gateway: the token is the user name
    (_basic("agent:"), None, "agent"),
    ("Basic !!!not-base64", None, None),
    ("Digest username=x", None, None),
    ("", None, None),
    ("", ["agent", "agt_parked"], "agt_parked"),  # mitmproxy's proxyauth took the header first
    ("", ["agt_user_only", ""], "agt_user_only"),
])
def test_the_credential_on_a_connect(header, parked, expected):
    assert tunnel_credential(header, parked) == expected


def test_without_an_authorization_section_every_authenticated_caller_may_tunnel():
    assert may_tunnel(None, (), "pypi.org", 443).allowed


def test_a_tunnel_needs_a_grant_naming_the_host_without_endpoint_or_model_limits():
    rules = Authorization((
        Grant(groups=("agents",), index=0),  # every upstream: not a pass-through host
        Grant(groups=("agents",), upstreams=("pypi.org",), endpoints=("/v1/*",), index=1),  # unreadable in a tunnel
        Grant(groups=("builders",), upstreams=("pypi.org:443", "*.pythonhosted.org"), index=2),
        Grant(groups=("*",), upstreams=("status.example.com",), index=3),
    ))
    refused = may_tunnel(rules, ("agents",), "pypi.org", 443)
    assert not refused.allowed and "not granted to group(s) [agents]" in refused.reason
    assert may_tunnel(rules, ("builders",), "pypi.org", 443).grant == 2
    assert not may_tunnel(rules, ("builders",), "pypi.org", 8443).allowed
    assert may_tunnel(rules, ("builders",), "files.pythonhosted.org", 443).allowed
    assert may_tunnel(rules, ("agents",), "status.example.com", 443).grant == 3
    nobody = may_tunnel(Authorization((Grant(groups=("admins",), upstreams=("*",)),)), (), "pypi.org", 443)
    assert not nobody.allowed and "no authorization grant covers a caller without groups" in nobody.reason


def test_options_and_modes_that_would_open_ungoverned_tunnels():
    assert ungoverned_options({"ignore_hosts": [], "tcp_hosts": []}, [("regular", None), ("reverse", "https")]) == []
    problems = ungoverned_options({"ignore_hosts": [".*"], "allow_hosts": ["x"], "tcp_hosts": ["y"], "udp_hosts": ["z"]},
                                  [("dns", None), ("reverse", "tls"), ("reverse", "http")])
    assert [p.split("=")[0].split(" ")[0] for p in problems] == [
        "ignore_hosts", "allow_hosts", "tcp_hosts", "udp_hosts", "mode", "mode"]
    assert "mode=reverse:tls" in problems[-1]


def test_a_meter_counts_each_way_and_never_holds_bytes():
    meter = TunnelMeter("t1", "pypi.org", 443, "10.0.0.7", caller="carol", started=100.0)
    meter.count(True, 10)
    meter.count(False, 25)
    meter.count(True, 5)
    meter.ended = "closed"
    assert meter.closed_fields(now=100.25) == {
        "event": "closed", "tunnel_id": "t1", "caller": "carol", "client": "10.0.0.7", "host": "pypi.org",
        "port": 443, "bytes_up": 15, "bytes_down": 25, "duration_ms": 250, "ended": "closed"}
    assert meter.opened_fields()["event"] == "opened"


def test_unread_layers_are_found_in_a_chosen_stack():
    context = Context(tflow.tclient_conn(), None)
    assert unread_layer(TCPLayer(context)) == "TCPLayer"
    assert unread_layer(UDPLayer(context)) == "UDPLayer"
    assert unread_layer(DNSLayer(context)) == "DNSLayer"
    tls_then_tcp = ServerTLSLayer(context)
    tls_then_tcp.child_layer = ClientTLSLayer(context)
    tls_then_tcp.child_layer.child_layer = TCPLayer(context)
    assert unread_layer(tls_then_tcp) == "TCPLayer"
    tls_then_http = ServerTLSLayer(context)
    tls_then_http.child_layer = HttpLayer(context, HTTPMode.transparent)
    assert unread_layer(tls_then_http) is None
    meter = TunnelMeter("t", "h", 1, None)
    assert unread_layer(MeteredTunnelLayer(context, meter, lambda: True, lambda m: None)) is None


# ---- the addon in mitmproxy's test harness --------------------------------------------------------------------
@pytest.mark.parametrize("option", ["ignore_hosts", "allow_hosts", "tcp_hosts", "udp_hosts"])
def test_host_list_options_are_refused(tmp_path, option):
    addon = Tunnels()
    with taddons.context(addon) as tctx:
        with pytest.raises(exceptions.OptionsError, match=f"{option}="):
            tctx.configure(addon, **{option: ["pypi\\.org"]})


@pytest.mark.parametrize("mode, refused", [
    ("regular", False), ("reverse:https://api.openai.com", False), ("reverse:http://127.0.0.1:9", False),
    ("dns", True), ("reverse:tcp://127.0.0.1:9", True), ("reverse:tls://127.0.0.1:9", True),
    ("reverse:udp://127.0.0.1:9", True), ("reverse:dns://127.0.0.1:53", True),
])
def test_modes_that_carry_only_unread_bytes_are_refused(mode, refused):
    addon = Tunnels()
    with taddons.context(addon) as tctx:
        if refused:
            with pytest.raises(exceptions.OptionsError, match="mode="):
                tctx.configure(addon, mode=[mode])
        else:
            tctx.configure(addon, mode=[mode])


class _AuditEvents:
    """The audit log's event service as the bundle offers it (services.audit_events): entries kept in a list."""

    def __init__(self, fail: bool = False) -> None:
        self.entries: list[tuple[str, dict]] = []
        self.fail = fail
        self.unavailable = None

    def append_event(self, kind: str, fields: dict) -> dict:
        if self.fail:
            raise AuditUnavailable("disk full")
        self.entries.append((kind, fields))
        return {"seq": len(self.entries)}


@pytest.fixture
def rules(tmp_path):
    directory = make_rules(tmp_path / "rules", upstreams=[{"host": "api.openai.com"}],
                           passthrough=[{"host": "pypi.org", "port": 443}])
    return directory, add_service_token(directory, "carol", ["builders"])


def _connect_flow(proxy_authorization: str | None = None, passthrough: bool = True):
    flow = tflow.tflow()
    flow.request.method, flow.request.host, flow.request.port = "CONNECT", "pypi.org", 443
    if proxy_authorization:
        flow.request.headers["proxy-authorization"] = proxy_authorization
    if passthrough:
        PASSTHROUGH.set(flow, True)
    return flow


def _http_connect(rules_dir, flow, audit=None) -> Tunnels:
    addon = Tunnels()
    services.audit_events = audit
    with taddons.context(addon) as tctx:
        tctx.configure(addon, gateway_rules=str(rules_dir))
        asyncio.run(addon.http_connect(flow))
    return addon


def test_a_passthrough_connect_without_a_credential_is_407(rules):
    audit = _AuditEvents()
    flow = _connect_flow()
    _http_connect(rules[0], flow, audit)
    assert flow.response.status_code == 407
    assert flow.response.headers.get_all("proxy-authenticate") == ['Basic realm="auditgate"', 'Bearer realm="auditgate"']
    assert TUNNEL.get(flow)["refused"].startswith("a pass-through tunnel needs the caller's gateway token")
    assert audit.entries == []  # the refused CONNECT is audited as a flow, by the audit log's http_connect


def test_a_wrong_credential_is_407_and_is_taken_off_the_flow(rules):
    flow = _connect_flow(_basic("agent:agt_wrong"))
    _http_connect(rules[0], flow, _AuditEvents())
    assert flow.response.status_code == 407 and "proxy-authorization" not in flow.request.headers
    assert TUNNEL.get(flow)["refused"] == "invalid gateway token"


def test_an_authorised_tunnel_is_audited_before_it_opens(rules):
    directory, token = rules
    audit = _AuditEvents()
    flow = _connect_flow(f"Bearer {token}")
    addon = _http_connect(directory, flow, audit)
    assert flow.response is None  # mitmproxy answers 200 and the tunnel's layer is chosen next
    assert "proxy-authorization" not in flow.request.headers
    [(kind, fields)] = audit.entries
    assert kind == "tunnel" and fields["event"] == "opened" and fields["caller"] == "carol"
    assert (fields["host"], fields["port"], fields["tunnel_id"]) == ("pypi.org", 443, flow.id)
    assert TUNNEL.get(flow)["caller"] == "carol"
    assert flow.server_conn.id in addon._waiting
    # A tunnel that never carried a byte still gets its closing entry when its client leaves.
    addon.client_disconnected(flow.client_conn)
    assert [f["event"] for _, f in audit.entries] == ["opened", "closed"]
    assert audit.entries[1][1]["ended"] == "client_disconnected" and not addon._waiting


@pytest.mark.parametrize("audit", [None, _AuditEvents(fail=True)], ids=["no audit log", "audit log failing"])
def test_no_tunnel_opens_while_the_audit_log_cannot_take_its_entry(rules, audit):
    directory, token = rules
    flow = _connect_flow(_basic(f"agent:{token}"))
    addon = _http_connect(directory, flow, audit)
    assert flow.response.status_code == 503 and not addon._waiting
    assert b"gateway_audit_unavailable" in flow.response.content


def test_a_connect_to_an_intercepted_upstream_is_left_to_caller_auth(rules):
    flow = _connect_flow("Bearer agt_for_caller_auth", passthrough=False)
    _http_connect(rules[0], flow, _AuditEvents())
    assert flow.response is None and flow.request.headers["proxy-authorization"] == "Bearer agt_for_caller_auth"


def test_a_tcp_flow_that_reaches_its_start_is_never_dialled_and_relays_nothing():
    audit = _AuditEvents()
    services.audit_events = audit
    addon = Tunnels()
    flow = tflow.ttcpflow()
    flow.server_conn.timestamp_start = None  # not connected yet
    with taddons.context(addon):
        addon.tcp_start(flow)
        assert flow.server_conn.error and flow.error  # mitmproxy checks the error before dialling
        addon.tcp_message(flow)
    assert flow.messages[-1].content == b""
    [(kind, fields)] = audit.entries
    assert kind == "tunnel" and fields["event"] == "refused" and fields["what"] == "TCPLayer"
    addon.tcp_end(flow)
    assert not addon._refused_flows


def test_an_http_101_to_a_raw_protocol_is_refused_but_a_websocket_is_not():
    addon = Tunnels()
    raw = tflow.tflow(resp=True)
    raw.response.status_code, raw.response.headers["upgrade"] = 101, "raw"
    addon.response(raw)
    assert raw.response.status_code == 502 and b"gateway_protocol_refused" in raw.response.content
    websocket = tflow.twebsocketflow()
    websocket.live = True
    addon.response(websocket)
    assert websocket.response.status_code == 101
