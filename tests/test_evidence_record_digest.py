"""The whole-flow digest: the audit log's claims of a live flow equal the verifier's claims of its record."""

from __future__ import annotations

import io as pyio

import pytest
from mitmproxy import flow as mflow
from mitmproxy import http, io
from mitmproxy.test import tflow

import addons.sse_streaming as sse_streaming_addon
from auditgate.audit.flow_files import iter_records
from auditgate.audit.record_digest import (
    claims_of_flow,
    claims_of_state,
    differing_fields,
    record_digest,
)
from auditgate.core.flow_contract import STREAM_CUT
from auditgate.recording.state import http_flow_state


def _rich_flow():
    flow = tflow.tflow(resp=True)
    flow.metadata.update({
        "auditgate.identity": {"name": "zoë", "groups": ("agents", "ops"), "method": "service_token"},
        "auditgate.overhead_ms": 0.1 + 0.2, "auditgate.big": 2**60, "auditgate.raw": b"\xff\x00",
        "auditgate.nested": {"\U0001f600": [1, {"b": None, "a": True}]}, "other.addon": "not ours",
    })
    flow.request.headers["x-é"] = "ü"
    flow.request.path = "/v1/responses?x=1&y=%20"
    flow.response.trailers = http.Headers(grpc_status="0")
    flow.comment = "stream cut 502 gateway_key_custody_failed"
    return flow


def _websocket_flow():
    flow = tflow.twebsocketflow()
    flow.websocket.close_reason = "bye"
    return flow


def _error_flow():
    flow = tflow.tflow(resp=True)
    flow.error = mflow.Error("peer closed connection without sending complete message body")
    return flow


FLOWS = {"rich": _rich_flow, "websocket": _websocket_flow, "error": _error_flow,
         "no response": lambda: tflow.tflow(err=True), "plain": lambda: tflow.tflow(resp=True)}


def _written_and_read_back(flow):
    buffer = pyio.BytesIO()
    io.FlowWriter(buffer).add(flow)  # what the flow recorder's writer writes (flow_record)
    [(_, state)] = list(iter_records(buffer.getvalue()))
    return state


@pytest.mark.parametrize("make", FLOWS.values(), ids=FLOWS.keys())
def test_the_claims_of_a_live_flow_equal_those_of_its_record(make):
    flow = make()
    state = _written_and_read_back(flow)
    assert claims_of_flow(flow) == claims_of_state(state)
    assert record_digest(claims_of_flow(flow)) == record_digest(claims_of_state(state))
    assert record_digest(claims_of_state(http_flow_state(flow))) == record_digest(claims_of_flow(flow))


def test_the_websocket_digest_covers_every_message():
    flow = _websocket_flow()
    before = record_digest(claims_of_flow(flow))
    flow.websocket.messages[0].content = b"other"
    after = record_digest(claims_of_flow(flow))
    assert differing_fields(before, after) == ["websocket.messages"]
    flow.websocket.messages[0].from_client = not flow.websocket.messages[0].from_client
    flow.websocket.close_code = 4000
    assert differing_fields(after, record_digest(claims_of_flow(flow))) == ["websocket.messages", "websocket.close"]


def test_only_auditgate_metadata_is_claimed_and_other_keys_do_not_count():
    flow = _rich_flow()
    claims = claims_of_flow(flow)
    assert "metadata.other.addon" not in claims and "metadata.auditgate.identity" in claims
    before = record_digest(claims)
    flow.metadata["other.addon"] = "changed"
    assert record_digest(claims_of_flow(flow)) == before


def _sse_flow():
    flow = tflow.tflow(resp=True)
    flow.response.headers["content-type"] = "text/event-stream"
    flow.response.content = None
    return flow


def test_a_stream_cut_mid_way_is_recorded_with_what_passed_and_marked_cut():
    addon = sse_streaming_addon.SseStreaming()
    flow = _sse_flow()
    masker = lambda data: data.upper()  # noqa: E731 - stands for the masking addon's callable
    flow.response.stream = masker
    addon.responseheaders(flow)
    assert isinstance(flow.response.stream, type(masker))  # the earlier addon still finds its own
    sent = [flow.response.stream(b"data: one\n\n"), flow.response.stream(b"data: two\n\n")]
    assert sent == [[b"DATA: ONE\n\n"], [b"DATA: TWO\n\n"]]
    flow.error = mflow.Error("peer closed connection without sending complete message body")
    addon.error(flow)
    assert flow.response.raw_content == b"DATA: ONE\n\nDATA: TWO\n\n"
    assert STREAM_CUT.get(flow) == {"reason": flow.error.msg, "bytes_to_client": 22}


def test_a_stream_that_ends_well_is_left_to_mitmproxy():
    addon = sse_streaming_addon.SseStreaming()
    flow = _sse_flow()
    addon.responseheaders(flow)
    assert callable(flow.response.stream)
    flow.response.stream(b"data: one\n\n")
    flow.response.stream(b"")
    assert flow.response.stream is True  # put back as it was: mitmproxy keeps the body itself
    flow.response.content = b"data: one\n\n"
    addon.response(flow)
    assert STREAM_CUT.get(flow) is None
