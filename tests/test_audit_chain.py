"""The pure audit modules: canonical JSON, the chain, checkpoints, restarts, key rotation, the tnetstring reader."""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import subprocess
import sys

import pytest
from mitmproxy import io
from mitmproxy.io import tnetstring
from mitmproxy.test import tflow

from auditgate.audit.chain import (
    GENESIS_HASH,
    AuditWriter,
    CanonicalJsonError,
    WriterSettings,
    canonical_json,
    checkpoint_message,
    create_private_key_file,
    entry_hash,
    json_safe,
    load_or_create_private_key,
    parse_entry_line,
    public_key_from_record,
    public_key_record,
    read_tail,
    seal,
    verify_signature,
)
from auditgate.audit.flow_files import TnetstringError, parse_tnetstring, read_flow_file
from auditgate.audit.verify import verify
from tests.audit_logs import build_log, run_gateway_once
from tests.gateway_process import ROOT


def test_canonical_json_is_sorted_compact_ascii_and_integer_only():
    assert canonical_json({"b": 1, "a": [True, None, "é\n\"x\""], "A": {"z": -3}}) == (
        b'{"A":{"z":-3},"a":[true,null,"\\u00e9\\n\\"x\\""],"b":1}'
    )
    assert canonical_json({"emoji": "\U0001f600"}) == b'{"emoji":"\\ud83d\\ude00"}'
    with pytest.raises(CanonicalJsonError):
        canonical_json({"latency": 1.5})


def test_seal_hashes_the_canonical_body_and_appends_the_hash_last():
    entry, line = seal({"seq": 1, "prev": GENESIS_HASH, "kind": "x", "time": "t"})
    body = canonical_json({"kind": "x", "prev": GENESIS_HASH, "seq": 1, "time": "t"})
    assert entry["hash"] == hashlib.sha256(body).hexdigest() == entry_hash(entry)
    assert line == body[:-1] + f',"hash":"{entry["hash"]}"}}\n'.encode()
    # Re-serialising the parsed line gives back the hashed bytes: an auditor's parser recomputes the same hash.
    assert entry_hash(parse_entry_line(line)) == entry["hash"]


def test_strict_parsing_refuses_duplicates_and_floats():
    with pytest.raises(ValueError):
        parse_entry_line(b'{"a":1,"a":2}')
    with pytest.raises(ValueError):
        parse_entry_line(b'{"a":1.5}')


def test_json_safe_drops_credential_keys_and_floats():
    safe = json_safe({"name": "alice", "token": "agt_x", "api_key": "sk", "id_token": "jwt", "max_tokens": 5,
                      "score": 0.85, "raw": b"secret", "nested": [{"Authorization": "Bearer x", "ok": 2.0}]})
    assert safe == {"name": "alice", "max_tokens": 5, "score": "0.85", "raw": "<6 bytes>", "nested": [{"ok": 2}]}


def test_checkpoints_sign_the_head_and_the_chain_continues_across_restarts(tmp_path):
    key = create_private_key_file(tmp_path / "k.pem")
    assert (tmp_path / "k.pem").stat().st_mode & 0o777 == 0o600
    writer = AuditWriter(tmp_path / "audit", key, WriterSettings(checkpoint_entries=3))
    entries = [writer.append("event", {"n": i}) for i in range(3)]
    [checkpoint] = [e for e in parse_lines(writer.path) if e["kind"] == "checkpoint"]
    assert (checkpoint["signed_seq"], checkpoint["signed_hash"]) == (3, entries[-1]["hash"])
    public = public_key_from_record(public_key_record(key.public_key()))
    assert verify_signature(public, checkpoint["signature"], checkpoint_message(3, entries[-1]["hash"]))
    assert not verify_signature(public, checkpoint["signature"], checkpoint_message(2, entries[-1]["hash"]))
    writer.append("gateway_stop", {})
    writer.close()
    first_file = writer.path

    again = AuditWriter(tmp_path / "audit", key)
    assert again.tail.clean and again.seq == 6
    entry = again.append("event", {})
    again.close()
    assert again.path != first_file  # each run writes a file of its own
    assert entry["prev"] == parse_lines(first_file)[-1]["hash"] and entry["seq"] == 7 and "recovered" not in entry


def test_a_run_after_a_crash_names_the_cut_it_continues_from(tmp_path):
    key = create_private_key_file(tmp_path / "k.pem")
    writer = AuditWriter(tmp_path / "audit", key)
    writer.append("event", {})
    last = writer.append("event", {})
    with open(writer.path, "ab") as f:
        f.write(b'{"kind":"flow","se')  # the process died in the middle of a line
    tail = read_tail(tmp_path / "audit")
    assert (tail.seq, tail.hash, tail.partial_bytes) == (2, last["hash"], 18) and not tail.clean
    restarted = AuditWriter(tmp_path / "audit", key)
    first = restarted.append("gateway_start", {"signing_key": public_key_record(key.public_key())})
    restarted.close()
    assert first["recovered"]["file"] == writer.path.name and first["recovered"]["partial_bytes"] == 18
    assert first["prev"] == last["hash"]


def test_files_rotate_with_a_closing_checkpoint_and_the_log_verifies(tmp_path):
    key = create_private_key_file(tmp_path / "k.pem")
    records = tmp_path / "records"
    writer = AuditWriter(records / "audit", key, WriterSettings(checkpoint_entries=1000, max_bytes=600))
    writer.append("gateway_start", {"signing_key": public_key_record(key.public_key())})
    for i in range(6):
        writer.append("event", {"n": i, "padding": "x" * 200})
    writer.append("gateway_stop", {})
    writer.close()
    files = sorted((records / "audit").glob("audit-*.jsonl"))
    assert len(files) >= 3
    for path in files:
        assert parse_lines(path)[-1]["kind"] == "checkpoint"
    result = verify(records)
    assert result.status == "verified", result.summary()


def test_key_rotation_is_a_signed_entry_and_trust_follows_it(tmp_path):
    old = create_private_key_file(tmp_path / "old.pem")
    new = create_private_key_file(tmp_path / "new.pem")
    records = tmp_path / "records"
    writer = AuditWriter(records / "audit", old, WriterSettings(checkpoint_entries=2))
    writer.append("gateway_start", {"signing_key": public_key_record(old.public_key())})
    writer.append("event", {})
    rotation = writer.rotate_key(new)
    writer.append("event", {})
    writer.append("gateway_stop", {})
    writer.close()
    entries = parse_lines(writer.path)
    after = [e for e in entries if e["kind"] == "checkpoint" and e["seq"] > rotation["seq"]]
    assert after[0]["key_id"] == rotation["old_key_id"]  # the old key vouches for the rotation
    assert {e["key_id"] for e in after[1:]} == {rotation["new_key"]["key_id"]}
    for anchor in (old, new):  # trusting either key is enough: the rotation links them
        pem = tmp_path / "anchor.pem"
        from auditgate.audit.chain import public_key_pem
        pem.write_bytes(public_key_pem(anchor.public_key()))
        assert verify(records, [pem], check_flows=False).status == "verified"
    stranger = tmp_path / "stranger.pem"
    stranger.write_bytes(public_key_pem(create_private_key_file(tmp_path / "s.pem").public_key()))
    result = verify(records, [stranger], check_flows=False)
    assert result.status == "failed" and result.first_break.kind == "untrusted key"


def test_the_private_key_is_created_once(tmp_path):
    first, created = load_or_create_private_key(tmp_path / "k.pem")
    second, created_again = load_or_create_private_key(tmp_path / "k.pem")
    assert created and not created_again
    assert public_key_record(first.public_key()) == public_key_record(second.public_key())


# ---- tnetstring reader ---------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [
    b"bytes \x00\xff", "text é ✓", 0, -12345678901234567890, 1.5, -0.0, True, False, None, [], {},
    [1, [2, b"x"], {"k": None}], {"a": {"b": [True, "c"]}, "n": 3.25},
])
def test_tnetstring_values_read_like_mitmproxy_writes_them(value):
    assert parse_tnetstring(tnetstring.dumps(value)) == value


def test_truncated_and_malformed_tnetstrings_are_errors():
    data = tnetstring.dumps({"a": [1, 2, b"xyz"]})
    for cut in (1, len(data) // 2, len(data) - 1):
        with pytest.raises(TnetstringError):
            parse_tnetstring(data[:cut])
    with pytest.raises(TnetstringError):
        parse_tnetstring(b"3:abc?")


def test_flow_files_written_by_mitmproxy_read_without_it(tmp_path):
    flows = [tflow.tflow(resp=True), tflow.tflow(err=True), tflow.tflow(resp=True)]
    flows[0].request.content = "prompt é ✓".encode()
    flows[0].response.content = os.urandom(3000)
    flows[2].response.content = None
    flows[2].metadata["auditgate.refusal"] = {"code": "gateway_forbidden"}
    path = tmp_path / "f.mitm"
    with open(path, "wb") as f:
        writer = io.FlowWriter(f)
        for flow in flows:
            writer.add(flow)
    read = read_flow_file(path)
    assert read.cut_at is None
    with open(path, "rb") as f:
        expected = list(io.FlowReader(f).stream())
    digest = lambda data: hashlib.sha256(data).hexdigest() if data is not None else None  # noqa: E731
    assert [(r.flow_id, r.request_sha256, r.response_sha256) for r in read.records] == [
        (f.id, digest(f.request.raw_content), digest(f.response.raw_content) if f.response else None) for f in expected
    ]
    assert read.records[2].refusal_code == "gateway_forbidden"
    # A crash-cut file: the complete records still read, the cut is located.
    data = path.read_bytes()
    path.write_bytes(data[:-40])
    cut = read_flow_file(path)
    assert len(cut.records) == 2 and cut.cut_at == read.records[2].offset


def test_the_verifier_needs_neither_mitmproxy_nor_yaml(tmp_path):
    log = build_log(tmp_path, runs=1, flows=2)
    code = ("import sys; from auditgate.cli import main; rc = main(['verify', sys.argv[1], '--pubkey', sys.argv[2]]);"
            "bad = [m for m in ('mitmproxy', 'yaml') if m in sys.modules]; sys.exit(10 if bad else rc)")
    done = subprocess.run([sys.executable, "-c", code, str(log.records), str(log.pubkey)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "VERIFIED" in done.stdout


def test_two_runs_chain_into_one_verifiable_log(tmp_path):
    log = build_log(tmp_path, runs=2, flows=3)
    key = log.key
    from auditgate.audit.chain import load_private_key_file
    run_gateway_once(log.records, load_private_key_file(key), 3, 2)
    assert len(log.files()) == 3
    result = verify(log.records, [log.pubkey])
    assert result.status == "verified", result.summary()
    assert result.flows_matched == result.flow_entries == 8


def parse_lines(path):
    return [json.loads(line) for line in path.read_bytes().splitlines()]


def test_a_key_rotation_at_a_checkpoint_boundary_or_cut_by_a_failed_write_still_verifies(tmp_path):
    from auditgate.audit.chain import AuditWriteError, public_key_pem

    old = create_private_key_file(tmp_path / "old.pem")
    new = create_private_key_file(tmp_path / "new.pem")
    records = tmp_path / "records"
    # Two entries per checkpoint: the rotation entry is the second, where an N-entries checkpoint would fall.
    writer = AuditWriter(records / "audit", old, WriterSettings(checkpoint_entries=2))
    writer.append("gateway_start", {"signing_key": public_key_record(old.public_key())})
    fd = writer._fd
    saved, full = os.dup(fd), os.open("/dev/full", os.O_WRONLY)
    real_write = writer._write_line
    calls = []

    def write_line(line):  # the rotation entry reaches the disk; its checkpoint hits a full disk
        calls.append(line)
        if len(calls) == 2:
            os.dup2(full, fd)
        try:
            real_write(line)
        finally:
            os.dup2(saved, fd)

    writer._write_line = write_line
    with pytest.raises(AuditWriteError):
        writer.rotate_key(new)
    del writer._write_line
    os.close(saved)
    os.close(full)
    writer.append("event", {})  # the rotation's checkpoint, signed by the old key, is written first
    writer.append("gateway_stop", {})
    writer.close()
    entries = parse_lines(writer.path)
    rotation = next(e for e in entries if e["kind"] == "key_rotation")
    following = next(e for e in entries if e["seq"] == rotation["seq"] + 1)
    assert following["kind"] == "checkpoint" and following["reason"] == "key_rotation"
    assert following["key_id"] == rotation["old_key_id"]
    pem = tmp_path / "anchor.pem"
    pem.write_bytes(public_key_pem(old.public_key()))
    result = verify(records, [pem], check_flows=False)
    assert result.status == "verified", result.summary()


# ---- format 2: RFC 8785 (JCS) ------------------------------------------------------------------------------------

import rfc8785  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from auditgate.audit import chain  # noqa: E402
from auditgate.audit.chain import jcs  # noqa: E402

_json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**60), max_value=2**60) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=20,
)


def _assert_jcs_is_rfc8785(value) -> None:
    try:
        expected = rfc8785.dumps(value)
    except rfc8785.CanonicalizationError:
        with pytest.raises(CanonicalJsonError):
            jcs(value)
        return
    assert jcs(value) == expected


@settings(max_examples=400, deadline=None)
@given(_json_values)
def test_jcs_is_rfc8785_byte_for_byte(value):
    _assert_jcs_is_rfc8785(value)


def _nested_lists(depth: int) -> list:
    value: list = ["leaf"]
    for _ in range(depth):
        value = [value, 1]
    return value


_EDGE_CASES = [{"\U0001f600": 1, "\ue000": 2, "z": 3}, {"a": "\u2028\x7f\x00\x1f\"\\/"}, [2**53 - 1, -(2**53 - 1)],
               {"k": [1, {"b": 1, "a": "é"}]}, "", {}, [],
               _nested_lists(300),  # deeper than orjson writes (254): the slower ways
               {"é": 1, "e": 2, "\x7f": 3, "\u00ff": 4, "\uffff": 5}]  # keys ordered by code point, not by UTF-8 length


def test_jcs_edge_cases_agree_with_rfc8785():
    for value in _EDGE_CASES:
        assert jcs(value) == rfc8785.dumps(value)
    for bad in [2**53, {"x": "\ud800"}, [2**64 + 1], {"n": -(2**63) - 1}]:  # beyond 64 bits orjson refuses too
        with pytest.raises(CanonicalJsonError):
            jcs(bad)
    with pytest.raises(CanonicalJsonError):  # entries stay integer-only in format 2 too
        seal({"v": 2, "seq": 1, "latency": 1.5})


@settings(max_examples=200, deadline=None)
@given(_json_values)
def test_jcs_without_orjson_is_rfc8785_byte_for_byte(value):
    """orjson is the gateway's, for speed; the verifier, installed with cryptography and rfc8785 alone, hashes the
    same bytes without it."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(chain, "orjson", None)
        assert chain.sorted_json({"a": 1}) is None
        _assert_jcs_is_rfc8785(value)


def test_what_orjson_would_write_unlike_json_goes_the_slower_ways():
    @dataclasses.dataclass
    class Point:
        x: int

    moment = datetime.datetime(2026, 12, 2, tzinfo=datetime.timezone.utc)
    for value in [moment, {"when": moment.date()}, [Point(1)], {1: "int key"}, b"bytes", {"s": {1, 2}}]:
        assert chain.sorted_json(value) is None, value
    assert chain.sorted_json({"b": [1, True, None], "a": "é"}) == '{"a":"é","b":[1,true,null]}'.encode()
    for value in _EDGE_CASES[:-2] + [{"é": 1, "e": 2}]:
        data = chain.sorted_json(value)
        assert data is None or data == json.dumps(value, sort_keys=True, separators=(",", ":"),
                                                   ensure_ascii=False).encode()


def test_every_entry_the_writer_makes_is_hashed_over_rfc8785(tmp_path):
    log = build_log(tmp_path)
    for path in log.files():
        for line in path.read_bytes().splitlines():
            entry = json.loads(line)
            assert entry["v"] == 3 and "instance" in entry
            claimed = entry.pop("hash")
            assert line == rfc8785.dumps(entry)[:-1] + f',"hash":"{claimed}"}}'.encode()
            assert hashlib.sha256(rfc8785.dumps(entry)).hexdigest() == claimed


def test_the_docs_recipe_recomputes_a_hash_and_checks_a_signature_without_auditgate(tmp_path):
    """Follows /tmp/s3/evidence-core.md's recipe literally: json + hashlib + rfc8785, then openssl."""
    import base64
    import shutil

    log = build_log(tmp_path)
    audit_file = log.files()[0]
    public_key_pem = log.pubkey
    # -- the recipe, step 1: one entry's hash
    recipe = f'''
import hashlib, json, rfc8785
lines = open({str(audit_file)!r}, "rb").read().splitlines()
entry = json.loads(lines[2])
claimed = entry.pop("hash")
print(hashlib.sha256(rfc8785.dumps(entry)).hexdigest() == claimed)
'''
    done = subprocess.run([sys.executable, "-I", "-c", recipe], capture_output=True, text=True, timeout=60,
                          cwd=tmp_path)
    assert done.stdout.strip() == "True", done.stderr
    # -- step 2: one checkpoint's signature, with openssl
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    lines = audit_file.read_bytes().splitlines()
    index, checkpoint = next((i, json.loads(l)) for i, l in enumerate(lines) if json.loads(l)["kind"] == "checkpoint")
    assert checkpoint["signed_hash"] == json.loads(lines[index - 1])["hash"] == checkpoint["prev"]
    message = f"auditgate-audit-checkpoint:v1:{checkpoint['signed_seq']}:{checkpoint['signed_hash']}"
    (tmp_path / "msg.bin").write_bytes(message.encode())
    (tmp_path / "sig.bin").write_bytes(base64.b64decode(checkpoint["signature"]))
    verify_cmd = ["openssl", "pkeyutl", "-verify", "-pubin", "-inkey", str(public_key_pem), "-rawin",
                  "-in", "msg.bin", "-sigfile", "sig.bin"]
    done = subprocess.run(verify_cmd, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "Signature Verified Successfully" in done.stdout, done.stdout + done.stderr
    (tmp_path / "msg.bin").write_bytes(message.replace(":v1:", ":v1:9").encode())  # another seq: must fail
    assert subprocess.run(verify_cmd, cwd=tmp_path, capture_output=True, timeout=60).returncode != 0
