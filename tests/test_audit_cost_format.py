"""The audit log's cheaper entry building writes what it wrote before: format 3 is format 2 with the whole-flow
digest moved from the flow entry into a record entry of its own, every value the same.

Proved three ways on flows of every shape the gateway audits: the offline verifier verifies the log and
the flow files; every line and every whole-flow digest is recomputed with the `rfc8785` library alone; and
the entries, value for value, and the helpers, on generated values, equal those of the code before the
speed-up (commit BEFORE_SPEEDUP, run from `git show`, not copied; skipped where the checkout has no such
commit, a shallow clone, when the rfc8785 checks still hold).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import math
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest
import rfc8785
from hypothesis import given, settings
from hypothesis import strategies as st
from mitmproxy import flow as mflow
from mitmproxy import http, io
from mitmproxy.test import tflow

from auditgate.audit import chain, entries, record_digest
from auditgate.audit.verify import verify
from auditgate.core.flow_contract import INTENT_SEQ

ROOT = Path(__file__).resolve().parents[1]
MODULES = ("chain", "entries", "record_digest")
NOW = 1_796_000_000.123456


# The last commit whose audit modules built entries the slower way: the reference the faster code must equal.
BEFORE_SPEEDUP = "f1ee789275bdf242221fe86313a3a5b8b4ce1d92"


@pytest.fixture(scope="module")
def before_speedup(tmp_path_factory):
    """auditgate.audit.{chain,entries,record_digest} as they were at BEFORE_SPEEDUP, as a package of their own."""
    package = "audit_before_speedup"
    where = tmp_path_factory.mktemp("head")
    (where / package).mkdir()
    (where / package / "__init__.py").write_text("")
    for name in MODULES:
        shown = subprocess.run(["git", "-C", str(ROOT), "show", f"{BEFORE_SPEEDUP}:auditgate/audit/{name}.py"],
                               capture_output=True, text=True)
        if shown.returncode != 0:
            pytest.skip(f"no commit {BEFORE_SPEEDUP[:8]} to take {name}.py from: {shown.stderr.strip()}")
        source = shown.stdout
        for other in MODULES:
            source = source.replace(f"from auditgate.audit.{other} import", f"from {package}.{other} import")
        (where / package / f"{name}.py").write_text(source)
    sys.path.insert(0, str(where))
    try:
        yield {name: importlib.import_module(f"{package}.{name}") for name in MODULES}
    finally:
        sys.path.remove(str(where))
        for name in [m for m in sys.modules if m.startswith(package)]:
            del sys.modules[name]


# ---- flows of every shape ---------------------------------------------------------------------------

def _gateway_metadata(flow, name: str) -> None:
    flow.metadata.update({
        "auditgate.instance": "vm:8080",
        "auditgate.identity": {"name": "bench", "groups": ["agents"], "method": "service_token",
                               "token_id": "392259c38d1010b7"},
        "auditgate.upstream": {"host": "127.0.0.1", "port": 40471, "key_source": "env:OPENAI_API_KEY"},
        "auditgate.policy": {"action": "allow", "rule": "default", "policy": "sha256:92cc1d703ac555a8", "eval_us": 131},
        "auditgate.body_limits": {"request_bytes": 80, "response_bytes": 2065},
        "auditgate.overhead_ms": 1.374,  # a float: text in the record digest, never in an entry
        "auditgate.flow_file": name,
    })


def _masked_responses_flow(name):
    flow = tflow.tflow(resp=True)
    flow.request.path = "/v1/responses"
    flow.request.headers["content-type"] = "application/json"
    flow.request.content = json.dumps({"model": "gpt-test", "input": "Write to me"}).encode()
    text = "Reach me at <EMAIL_ADDRESS> or <PHONE_NUMBER>; card <CREDIT_CARD>. " * 24
    flow.response.headers["content-type"] = "application/json"
    flow.response.headers["x-request-id"] = "req_upstream_000018"
    flow.response.content = json.dumps({"id": "resp_1", "object": "response", "model": "gpt-test", "output": [
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": text}]}]}).encode()
    _gateway_metadata(flow, name)
    flow.metadata["auditgate.masking"] = {"status": "masked", "findings": [
        {"direction": "response", "entity_type": kind, "path": "output[0].content[0].text", "count": 24}
        for kind in ("EMAIL_ADDRESS", "CREDIT_CARD", "PHONE_NUMBER")]}
    return flow


def _plain_flow(name):
    flow = tflow.tflow(resp=True)
    flow.metadata["auditgate.flow_file"] = name
    return flow


def _refused_flow(name):
    flow = tflow.tflow(resp=True)
    flow.response = http.Response.make(403, b'{"error":{"code":"policy_denied"}}', {"content-type": "application/json"})
    _gateway_metadata(flow, name)
    flow.metadata["auditgate.refusal"] = {"status": 403, "code": "policy_denied", "by": "policy", "message": "no"}
    flow.metadata["auditgate.policy"] = {"action": "deny", "rule": "no-secrets", "eval_us": 12}
    return flow


def _streamed_flow(name):
    flow = tflow.tflow(resp=True)
    flow.response.headers["content-type"] = "text/event-stream"
    flow.response.stream = True
    flow.response.content = b"data: one\n\ndata: two\n\n"
    _gateway_metadata(flow, name)
    flow.error = mflow.Error("peer closed connection without sending complete message body")
    flow.metadata["auditgate.stream_cut"] = {"reason": flow.error.msg, "bytes_to_client": 22}
    return flow


def _websocket_flow(name):
    flow = tflow.twebsocketflow()
    flow.websocket.close_reason = "bye"
    _gateway_metadata(flow, name)
    return flow


def _odd_flow(name):
    """What an entry must survive: text beyond ASCII and U+FFFF, a credential-named key, bytes, huge and
    float numbers, tuples, an IPv6 Host header and a query string."""
    flow = tflow.tflow(resp=True)
    flow.request.headers["host"] = "[::1]:8443"
    flow.request.headers["x-é"] = "ü"
    flow.request.path = "/v1/responses?key=not-in-the-entry"
    flow.response.trailers = http.Headers(grpc_status="0")
    flow.comment = "zoë \U0001f600"
    _gateway_metadata(flow, name)
    flow.metadata["auditgate.identity"] = {"name": "zoë \U0001f600", "groups": ("ops", "agents"), "api_key": "sk-x",
                                           "\U0001f600": 1, "\ue000": 2, "big": 2**60, "ratio": 0.5,
                                           "raw": b"\xff", "whole": 3.0}
    return flow


def _no_response_flow(name):
    flow = tflow.tflow(err=True)
    _gateway_metadata(flow, name)
    return flow


def _http2_flow(name):
    flow = tflow.tflow(resp=True)
    flow.request.http_version = "HTTP/2.0"
    flow.request.authority = "api.openai.com:443"
    _gateway_metadata(flow, name)
    return flow


FLOWS = {"masked": _masked_responses_flow, "plain": _plain_flow, "refused": _refused_flow,
         "streamed": _streamed_flow, "websocket": _websocket_flow, "odd": _odd_flow,
         "no response": _no_response_flow, "http2": _http2_flow}
REFUSED_BEFORE_UPSTREAM = {"refused"}


FLOW_FILE_NAME = "flows-run1.mitm"


def _flows() -> list:
    return [make(FLOW_FILE_NAME) for make in FLOWS.values()]


def _write_run(modules: dict, records: Path, key, flows: list, clock=None) -> None:
    """What the audit log addon writes for each flow (intent at the request hook, the flow entry at its end),
    with the flows written to their flow file."""
    writer = modules["chain"].AuditWriter(records / "audit", key, modules["chain"].WriterSettings(checkpoint_entries=5),
                                          instance="vm:8080")
    if clock is not None:
        writer.clock = clock
    writer.append("gateway_start", {"pid": 1, "signing_key": modules["chain"].public_key_record(key.public_key())})
    flows_dir = records / "flows"
    flows_dir.mkdir(parents=True, exist_ok=True)
    with open(flows_dir / FLOW_FILE_NAME, "wb") as f:
        flow_writer = io.FlowWriter(f)
        for label, flow in zip(FLOWS, flows):
            if label not in REFUSED_BEFORE_UPSTREAM:
                entry = writer.append("intent", modules["entries"].intent_fields(flow), sanitized=True)
                INTENT_SEQ.set(flow, entry["seq"])
            entry = writer.append("flow", modules["entries"].flow_fields(flow, NOW), sanitized=True)
            if hasattr(modules["entries"], "record_fields"):  # format 3: the record's digest as the record is taken
                writer.append("record", modules["entries"].record_fields(flow, entry["seq"]), sanitized=True)
            flow_writer.add(flow)
    writer.append("gateway_stop", {"pid": 1, "flows": len(flows)})
    writer.close()


def _rfc8785_record_digest(claims: dict) -> dict:
    """docs/auditors.md's whole-flow digest, with hashlib and rfc8785 alone."""
    full = {name: hashlib.sha256(rfc8785.dumps(value)).hexdigest() for name, value in claims.items()
            if value is not None}
    return {"sha256": hashlib.sha256(rfc8785.dumps(full)).hexdigest(),
            "fields": {name: digest[:16] for name, digest in full.items()}}


def test_entries_written_now_verify_and_recompute_with_rfc8785(tmp_path):
    key = chain.create_private_key_file(tmp_path / "keys" / "key.pem")
    pubkey = tmp_path / "keys" / "public.pem"
    pubkey.write_bytes(chain.public_key_pem(key.public_key()))
    records = tmp_path / "records"
    flows = _flows()
    _write_run({"chain": chain, "entries": entries}, records, key, flows)

    result = verify(records, [pubkey])
    assert result.status == "verified", result.summary()

    flow_entries, record_entries = [], {}
    for path in chain.audit_files(records / "audit"):
        for line in path.read_bytes().splitlines():
            entry = json.loads(line)
            claimed = entry.pop("hash")
            assert line == rfc8785.dumps(entry)[:-1] + f',"hash":"{claimed}"}}'.encode()
            assert hashlib.sha256(rfc8785.dumps(entry)).hexdigest() == claimed
            if entry["kind"] == "flow":
                flow_entries.append(entry)
            elif entry["kind"] == "record":
                record_entries[entry["flow"]] = entry
    assert [e["flow_id"] for e in flow_entries] == [f.id for f in flows]
    for entry, flow in zip(flow_entries, flows):
        assert "record" not in entry and record_entries[entry["seq"]]["flow_id"] == flow.id
        assert record_entries[entry["seq"]]["record"] == _rfc8785_record_digest(record_digest.claims_of_flow(flow))
        assert entry["request_sha256"] == hashlib.sha256(flow.request.raw_content).hexdigest()
        response = flow.response
        assert entry["response_sha256"] == (hashlib.sha256(response.raw_content).hexdigest() if response else None)
        assert entry["host"] == flow.request.pretty_host
    odd = flow_entries[list(FLOWS).index("odd")]
    assert "api_key" not in odd["identity"] and odd["host"] == "::1" and odd["path"] == "/v1/responses"


def test_the_log_holds_every_value_the_committed_code_writes(tmp_path, before_speedup):
    key = chain.create_private_key_file(tmp_path / "key.pem")
    ticks = iter(range(10**6))

    def clock():  # the same time for the same entry in both runs, seconds and microseconds changing
        return NOW + next(ticks) * 0.2500005

    flows = _flows()  # the same flows (ids, timestamps) for both
    _write_run({"chain": chain, "entries": entries}, tmp_path / "new", key, flows, clock)
    new = _entries_by_kind(tmp_path / "new")
    # The code before, on the flows as the run left them (their intent seqs are the run's, in the record digest).
    assert [r["record"] for r in new["record"]] == [before_speedup["entries"].flow_fields(f, NOW)["record"] for f in flows]
    assert [r["flow_id"] for r in new["record"]] == [e["flow_id"] for e in new["flow"]] == [f.id for f in flows]
    ticks = iter(range(10**6))
    _write_run(before_speedup, tmp_path / "old", key, flows, clock)
    old = _entries_by_kind(tmp_path / "old")
    assert len(new["flow"]) == len(old["flow"]) == len(FLOWS) and len(new["intent"]) == len(old["intent"]) > 0
    assert new["intent"] == old["intent"]
    assert new["flow"] == [{k: v for k, v in e.items() if k != "record"} for e in old["flow"]]


def _entries_by_kind(records: Path) -> dict[str, list[dict]]:
    """A log's entries by kind, without what places them in the chain (seq, prev, hash, time, version, and the
    seqs an entry names): format 3 adds an entry a flow, so those move; every other value is the same."""
    kinds: dict[str, list[dict]] = {}
    for path in chain.audit_files(records / "audit"):
        for line in path.read_bytes().splitlines():
            entry = {k: v for k, v in json.loads(line).items()
                     if k not in ("seq", "prev", "hash", "time", "v", "flow", "intent", "signed_seq", "signed_hash",
                                  "signature")}
            kinds.setdefault(entry.pop("kind"), []).append(entry)
    return kinds


@pytest.mark.parametrize("make", FLOWS.values(), ids=FLOWS.keys())
def test_flow_and_intent_fields_equal_the_committed_ones(make, before_speedup):
    flow = make("flows-x.mitm")
    INTENT_SEQ.set(flow, 7)
    before = before_speedup["entries"].flow_fields(flow, NOW)
    assert {**entries.flow_fields(flow, NOW), "record": before["record"]} == before
    assert entries.record_fields(flow, 9) == {"flow_id": flow.id, "flow": 9, "record": before["record"]}
    assert entries.intent_fields(flow) == before_speedup["entries"].intent_fields(flow)
    claims = record_digest.claims_of_flow(flow)
    assert claims == before_speedup["record_digest"].claims_of_flow(flow)
    assert record_digest.record_digest(claims) == before_speedup["record_digest"].record_digest(claims)


@pytest.mark.parametrize("make", FLOWS.values(), ids=FLOWS.keys())
def test_record_of_flow_is_the_record_digest_of_the_flows_claims(make, monkeypatch):
    """The record entry digests each claim as it makes it (record_of_flow); the verifier gathers the claims of
    the record first (record_digest(claims_of_state)), as claims_of_flow does: the same digest, with orjson and
    without it (the verifier's dependencies)."""
    flow = make("flows-x.mitm")
    INTENT_SEQ.set(flow, 7)
    claims = record_digest.claims_of_flow(flow)
    expected = _rfc8785_record_digest(claims)
    assert record_digest.record_of_flow(flow) == expected
    content = flow.request.raw_content  # the intent's digest of the very same content, taken as it is
    assert record_digest.record_of_flow(flow, (content, claims["request.content"])) == expected
    monkeypatch.setattr(chain, "orjson", None)
    assert record_digest.record_of_flow(flow) == expected
    assert record_digest.record_digest(claims) == expected


@pytest.mark.parametrize("make", FLOWS.values(), ids=FLOWS.keys())
def test_the_intents_request_digest_is_taken_only_for_the_very_same_content(make):
    """The flow entry takes the request's SHA-256 from its intent entry (the audit log keeps the content with it)
    where the request still has that very content; a content replaced since is hashed anew."""
    flow = make("flows-x.mitm")
    INTENT_SEQ.set(flow, 7)
    expected = entries.flow_fields(flow, NOW)
    content = flow.request.raw_content
    assert entries.flow_fields(flow, NOW, (content, expected["request_sha256"])) == expected
    assert entries.flow_fields(flow, NOW, (bytes(b"other"), "0" * 64)) == expected  # not that content: ignored
    if content is not None:
        assert entries.flow_fields(flow, NOW, (content, "f" * 64))["request_sha256"] == "f" * 64  # taken as given


# ---- the helpers, on generated values ------------------------------------------------------------------

_keys = st.one_of(st.text(max_size=8), st.sampled_from(["token", "api_key", "X-Api-Key", "my_secret", "Cookie",
                                                       "tokens", "name\n", "\U0001f600", "\ue000"]),
                  st.integers(-3, 3), st.booleans(), st.none())
_metadata = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.text() | st.binary(max_size=4)
    | st.floats(allow_nan=True, allow_infinity=True),
    lambda inner: (st.lists(inner, max_size=4) | st.lists(inner, max_size=3).map(tuple)
                   | st.frozensets(st.integers(-5, 5) | st.text(max_size=3), max_size=3)
                   | st.dictionaries(_keys, inner, max_size=4)),
    max_leaves=25,
)


@settings(max_examples=400, deadline=None)
@given(_metadata)
def test_json_safe_and_plain_equal_the_committed_ones(before_speedup, value):
    assert chain.json_safe(value) == before_speedup["chain"].json_safe(value)
    assert record_digest._plain(value) == before_speedup["record_digest"]._plain(value)


def _nested(depth: int, leaf):
    value = leaf
    for _ in range(depth):
        value = {"k": value, "t": "text", 1: None}
    return value


@pytest.mark.parametrize("depth", [14, 15, 16, 17, 18, 30, 31, 32, 33, 34])
def test_json_safe_and_plain_cut_deep_nesting_where_the_committed_ones_do(before_speedup, depth):
    for leaf in ("x", None, True, [1, "y"]):
        value = _nested(depth, leaf)
        assert chain.json_safe(value) == before_speedup["chain"].json_safe(value)
        assert record_digest._plain(value) == before_speedup["record_digest"]._plain(value)


_claim = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53 - 1), 2**53 - 1)
    | st.text(st.characters(blacklist_categories=("Cs",))),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(st.text(max_size=12), _claim, max_size=8))
def test_record_digest_is_rfc8785_of_rfc8785_digests(claims):
    assert record_digest.record_digest(claims) == _rfc8785_record_digest(claims)


def test_a_fields_digest_is_taken_again_only_for_the_very_same_value():
    """record_digest() remembers each field's last text, integer and JSON: one after another, values that Python
    deems equal but JSON writes apart (1, True, 1.0's text) get their own digests; so do headers that differ."""
    for value in [1, True, 1, "1", [1], [True], {"a": 1}, {"a": True}, "1", 1, 2**53 - 1, str(2**53 - 1), False, 0, "x"]:
        assert record_digest.record_digest({"f": value}) == _rfc8785_record_digest({"f": value}), value
    headers = ((b"host", b"a"), (b"x-n", b"1"))
    for fields in [headers, headers, ((b"host", b"a"),), headers, ((b"host", b"\xe9"),)]:
        claim = [[n.decode("latin-1"), v.decode("latin-1")] for n, v in fields]
        assert record_digest.field_digests({"request.headers": record_digest._flow_headers(fields)}) == {
            "request.headers": hashlib.sha256(rfc8785.dumps(claim)).hexdigest()}


def test_a_lines_digests_are_taken_again_only_for_the_very_same_line():
    """record_of_flow() takes each field's digest from the flow before where its value is the same: flow after
    flow, with one part of the request or status line changed at a time, the digests stay those of its claims."""
    changes = [lambda f: None, lambda f: None, lambda f: setattr(f.request, "path", "/v1/other?q=1"),
               lambda f: setattr(f.request, "method", "PUT"), lambda f: setattr(f.request, "port", 8443),
               lambda f: setattr(f.response, "status_code", 418), lambda f: setattr(f.response, "reason", "Teapot"),
               lambda f: setattr(f.request, "host", "example.org"), lambda f: None]
    for change in changes:
        flow = tflow.tflow(resp=True)
        change(flow)
        claims = record_digest.claims_of_flow(flow)
        assert record_digest.record_of_flow(flow) == _rfc8785_record_digest(claims)


def test_record_digest_of_text_no_json_holds_is_the_committed_one(before_speedup):
    claims = {"a": "\ud800", "b": ["\udfff"], "\U0001f600": 1, "\ue000": "x", "n": 2**60}
    assert record_digest.record_digest(claims) == before_speedup["record_digest"].record_digest(claims)


def _datetime_text(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@settings(max_examples=1000, deadline=None)
@given(st.floats(min_value=-(2**33), max_value=2**34, allow_nan=False)
       | st.integers(0, 2**34).map(lambda s: s + 0.9999995) | st.integers(0, 2**34).map(lambda s: s + 0.0000025)
       | st.integers(-(2**20), 2**34))
def test_utc_timestamp_is_datetimes_own_text(epoch):
    assert chain.utc_timestamp(epoch) == _datetime_text(epoch)
    assert chain.utc_timestamp(epoch) == _datetime_text(epoch)  # again, from the second it kept


def test_utc_timestamp_of_now_and_of_what_is_no_time():
    before = time.time()
    text = chain.utc_timestamp()
    assert _datetime_text(before) <= text <= _datetime_text(time.time())
    for bad in (math.inf, math.nan):
        with pytest.raises((OverflowError, ValueError)):
            chain.utc_timestamp(bad)


@pytest.mark.parametrize("host", ["api.openai.com", "api.openai.com:443", "[::1]:8443", "127.0.0.1:8080", "ÄPI.example",
                                  "bad host:x", ""])
def test_pretty_host_is_mitmproxys(host):
    for version in ("HTTP/1.1", "HTTP/2.0"):
        flow = tflow.tflow()
        flow.request.http_version = version
        if version == "HTTP/2.0":
            flow.request.authority = host
        flow.request.headers["host"] = host
        for _ in range(2):  # then from what it remembered
            assert entries.pretty_host(flow.request) == flow.request.pretty_host


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.text(), st.text("0123456789abcdef", min_size=64, max_size=64), max_size=12))
def test_the_record_digests_own_jcs_is_rfc8785(full):
    assert record_digest._digests_jcs(full) == rfc8785.dumps(full)


_encodable = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.text() | st.floats(),
    lambda inner: (st.lists(inner, max_size=4) | st.lists(inner, max_size=3).map(tuple)
                   | st.dictionaries(st.text(max_size=6), inner, max_size=4)),
    max_leaves=20,
)


@settings(max_examples=400, deadline=None)
@given(_encodable)
def test_the_encoder_built_once_encodes_as_the_json_encoder_does(value):
    """jcs() and the record digest's fast path call the C encoder built once (chain.encode_sorted); it gives
    what the JSONEncoder it is built from gives, and refuses what that refuses (jcs() then asks rfc8785)."""
    try:
        expected = chain._JCS_ENCODER.encode(value)
    except (TypeError, ValueError, RecursionError) as e:
        with pytest.raises(type(e)):
            "".join(chain.encode_sorted(value, 0))
        return
    assert "".join(chain.encode_sorted(value, 0)) == expected


def test_a_field_whose_value_changes_is_hashed_anew():
    """record_digest keeps each field's last text and digest: a value that changes, even to one Python
    finds equal (1, True, 1.0 made text), gets the digest of its own canonical JSON."""
    for value in (1, True, "1", [1], [True], {"a": 1}, {"a": True}, 1, "x" * 3000, "x" * 3000, "é", "\U0001f600", 1):
        assert record_digest.record_digest({"f": value}) == _rfc8785_record_digest({"f": value})
