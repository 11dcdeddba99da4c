"""Our flow state equals mitmproxy's get_state for any connection field values, and for real flows."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mitmproxy import connection
from mitmproxy.proxy.mode_specs import ProxyMode
from mitmproxy.test import tflow, tutils

from auditgate.recording import state as recording_state
from auditgate.recording.state import connection_state, http_flow_state

CLIENT_FIELDS = [f.name for f in connection.Client._SerializableDataclass__fields()]
SERVER_FIELDS = [f.name for f in connection.Server._SerializableDataclass__fields()]

# Values of the types connection fields hold, and of types they must not hold (mitmproxy's errors then).
field_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats(allow_nan=False) | st.text(max_size=8)
    | st.binary(max_size=8) | st.sampled_from(["tcp", "udp", "TLSv1.3", "QUICv1", "http", "https", "bogus"])
    | st.just(tutils.tcert()) if hasattr(tutils, "tcert") else st.none(),
    lambda children: st.lists(children, max_size=4) | st.lists(children, max_size=4).map(tuple),
    max_leaves=6,
) | st.tuples(st.text(max_size=8), st.integers(0, 65535)) | st.tuples(
    st.sampled_from(["http", "https", "tls"]), st.tuples(st.text(max_size=8), st.integers(0, 65535)))

address = st.tuples(st.text(max_size=8), st.integers(0, 65535)) | st.tuples(
    st.text(max_size=8), st.integers(0, 65535), st.integers(0, 9), st.integers(0, 9))
timestamp = st.none() | st.floats(allow_nan=False) | st.integers(0, 2**33)
VALID = {  # what each field holds in a working proxy
    "peername": st.none() | address, "sockname": st.none() | address, "address": st.none() | address,
    "id": st.text(), "transport_protocol": st.sampled_from(["tcp", "udp"]), "error": st.none() | st.text(),
    "tls": st.booleans(), "alpn": st.none() | st.binary(), "alpn_offers": st.lists(st.binary()).map(tuple) | st.lists(st.binary()),
    "cipher": st.none() | st.text(), "cipher_list": st.lists(st.text()) | st.lists(st.text()).map(tuple),
    "tls_version": st.none() | st.sampled_from(["TLSv1.2", "TLSv1.3", "QUICv1"]), "sni": st.none() | st.text(),
    "timestamp_start": timestamp, "timestamp_end": timestamp, "timestamp_tls_setup": timestamp,
    "timestamp_tcp_setup": timestamp, "via": st.none() | st.tuples(st.sampled_from(["http", "https"]), address),
}


def _changes(fields):
    valid = st.sampled_from([f for f in fields if f in VALID]).flatmap(lambda f: st.tuples(st.just(f), VALID[f]))
    return st.lists(valid | st.tuples(st.sampled_from(fields), field_values), max_size=4)


def _same(conn):
    try:
        theirs = conn.get_state()
    except Exception as e:
        with pytest.raises(type(e)):
            connection_state(conn)
        return
    assert connection_state(conn) == theirs


@settings(max_examples=400, deadline=None)
@given(_changes(CLIENT_FIELDS))
def test_client_connection_state_equals_mitmproxys_for_any_field_values(changes):
    _same_after(tflow.tclient_conn(), changes)


@settings(max_examples=400, deadline=None)
@given(_changes(SERVER_FIELDS))
def test_server_connection_state_equals_mitmproxys_for_any_field_values(changes):
    _same_after(tflow.tserver_conn(), changes)


def _same_after(conn, changes) -> None:
    for name, value in changes:
        setattr(conn, name, value)
    _same(conn)


def test_connections_as_a_gateway_has_them():
    client = connection.Client(peername=("127.0.0.1", 50000), sockname=("127.0.0.1", 8080), timestamp_start=1.5,
                               proxy_mode=ProxyMode.parse("reverse:http://127.0.0.1:9"))
    server = connection.Server(address=("127.0.0.1", 9), peername=("127.0.0.1", 9, 0, 0), via=("http", ("h", 1)))
    for conn in (client, server, tflow.tclient_conn(), tflow.tserver_conn()):
        assert connection_state(conn) == conn.get_state()


@pytest.mark.parametrize("make", [
    lambda: tflow.tflow(), lambda: tflow.tflow(resp=True), lambda: tflow.tflow(err=True),
    lambda: tflow.tflow(resp=True, ws=True), tflow.twebsocketflow,
])
def test_http_flow_state_is_get_state_with_the_flows_own_metadata(make):
    flow = make()
    flow.metadata["auditgate.identity"] = {"name": "alice", "groups": ["agents"]}
    assert http_flow_state(flow) == flow.get_state()
    assert http_flow_state(flow)["metadata"] is flow.metadata  # not a copy: the caller encodes it at once
    flow.backup()  # a flow changed by hand (mitmproxy's UI, a replay) carries its backup in the state
    flow.comment = "changed since its backup"
    state = http_flow_state(flow)
    assert state == flow.get_state() and state["backup"] is not None


def test_this_mitmproxy_passes_the_import_check_and_a_failing_check_falls_back(monkeypatch):
    monkeypatch.setattr(recording_state, "_FAST", None)
    assert recording_state._check() and recording_state._FAST  # else every flow took the slow path, silently
    flow = tflow.tflow(resp=True)
    monkeypatch.setattr(recording_state, "_FAST", False)
    assert http_flow_state(flow) == flow.get_state()


@pytest.mark.e2e
def test_tls_flows_through_a_forward_gateway_record_as_mitmproxy_writes_them(forward_env, tls_upstream, records_root):
    """Forward mode: TLS on both sides (certificates, ALPN, ciphers, SNI in the connections' states)."""
    import io as std_io
    import uuid

    import openai
    from mitmproxy import io

    from auditgate.recording.writer import flow_record
    from tests.records import wait_for_flows

    marker = f"state-{uuid.uuid4().hex}"
    openai.OpenAI().responses.create(model="gpt-test", input=marker)
    [flow] = wait_for_flows(records_root / "forward", lambda f: marker.encode() in (f.request.content or b""), 1)
    assert flow.client_conn.tls and flow.server_conn.tls and flow.server_conn.certificate_list
    assert flow.client_conn.sni and flow.client_conn.cipher
    for conn in (flow.client_conn, flow.server_conn):
        assert connection_state(conn) == conn.get_state()
    mitmproxys = std_io.BytesIO()
    io.FlowWriter(mitmproxys).add(flow)
    assert flow_record(flow) == mitmproxys.getvalue()
