"""Our tnetstring encoder writes exactly what mitmproxy's writes, for any value a flow state can hold."""

from __future__ import annotations

import copy
import enum
import io as std_io
import sys
from collections import OrderedDict

import openai
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mitmproxy import io
from mitmproxy.io import tnetstring as mitmproxy_tnetstring
from mitmproxy.test import tflow

from auditgate.recording import tnetstring
from auditgate.recording.writer import flow_record
from tests.fake_openai import pii_reply
from tests.records import flow_files, wait_for_flows

scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(10**80), max_value=10**80)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text()
    | st.text(st.characters(min_codepoint=0x80, codec="utf-8"))  # multi-byte UTF-8: lengths count bytes, not characters
    | st.binary()
)
keys = st.text() | st.binary() | st.integers() | st.none()
values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children)
        | st.lists(children).map(tuple)
        | st.tuples(st.binary(), st.binary())  # a header
        | st.dictionaries(keys, children)
    ),
    max_leaves=60,
)


@settings(max_examples=600, deadline=None)
@given(values)
def test_any_value_encodes_byte_for_byte_as_mitmproxy_does(value):
    assert tnetstring.dumps(value) == mitmproxy_tnetstring.dumps(value)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.text(), values, max_size=8), st.dictionaries(st.text(), values, max_size=8))
def test_remembered_dict_keys_change_nothing(first, second):
    # Keys met before come from the encoder's cache: the output is still mitmproxy's.
    for value in (first, second, {"nested": [first, second]}, first):
        assert tnetstring.dumps(value) == mitmproxy_tnetstring.dumps(value)


class Level(enum.IntEnum):
    HIGH = 2


class Name(str):
    pass


@pytest.mark.parametrize("value", [
    Level.HIGH, Name("x"), OrderedDict(a=1, b=[2]), {"level": Level.HIGH, Name("k"): Name("v")},
    [True, False, 1, 0, 1.0, -0.0, float("nan"), float("inf")], {}, [], (), b"", "",
])
def test_subclasses_and_edge_values_encode_as_mitmproxy_does(value):
    assert tnetstring.dumps(value) == mitmproxy_tnetstring.dumps(value)


@pytest.mark.parametrize("value", [
    {1, 2}, {"odd": {1, 2}}, [object()], "lone \udc80 surrogate", {"k": "\ud800"}, 10 ** (sys.get_int_max_str_digits() + 1),
    bytearray(b"x"),
], ids=lambda value: type(value).__name__)
def test_what_mitmproxy_cannot_encode_raises_here_too(value):
    with pytest.raises(Exception) as ours:
        tnetstring.dumps(value)
    with pytest.raises(Exception) as theirs:
        mitmproxy_tnetstring.dumps(value)
    assert type(ours.value) is type(theirs.value)


def test_mitmproxys_test_flows_encode_as_mitmproxy_does():
    for flow in (tflow.tflow(resp=True), tflow.tflow(err=True), tflow.twebsocketflow(), tflow.tflow(resp=True, ws=True)):
        state = flow.get_state()
        assert tnetstring.dumps(state) == mitmproxy_tnetstring.dumps(state)


@settings(max_examples=400, deadline=None)
@given(st.data(), st.lists(st.text(max_size=3) | st.integers(0, 300) | st.binary(max_size=3), max_size=30))
def test_the_encoders_value_caches_change_nothing(data, recurring):
    # Short strs, small ints and header lines met before come from caches (emptied when full): still mitmproxy's.
    for _ in range(3):
        value = data.draw(values)
        for item in (recurring, {"r": recurring, "v": value}, [tuple(x for x in recurring if type(x) is bytes)[:2]], value):
            assert tnetstring.dumps(item) == mitmproxy_tnetstring.dumps(item)


def _twin(data, value):
    """A value equal to value (==) that may differ in what tnetstring sees: exact types, float sign, dict order."""
    kind = type(value)
    if kind is dict:
        items = [(key, _twin(data, item)) for key, item in value.items()]
        if data.draw(st.booleans()):
            items = data.draw(st.permutations(items))
        return dict(items)
    if kind in (list, tuple):
        return kind(_twin(data, item) for item in value)
    choices = [value]
    if kind is int and abs(value) < 2**53:
        choices.append(float(value))
    if kind in (int, float) and value in (0, 1):
        choices.append(bool(value))
    if kind is bool:
        choices.append(int(value))
    if kind is float and value == 0:
        choices.append(-value)
    if kind is float and value.is_integer():
        choices.append(int(value))
    if kind is str:
        choices.append(Name(value))
    return data.draw(st.sampled_from(choices))


@settings(max_examples=500, deadline=None)
@given(st.data(), values)
def test_a_remembered_encoding_is_reused_only_where_dumps_gives_the_same_bytes(data, value):
    remembered = tnetstring.Remembered(8)
    twins = [value] + [_twin(data, value) for _ in range(3)]
    assert all(twin == value or twin != twin for twin in twins)  # equal to Python (nan aside), not to tnetstring
    for twin in twins + twins:
        try:
            expected = mitmproxy_tnetstring.dumps(twin)
        except Exception as e:
            with pytest.raises(type(e)):
                remembered(twin)
            continue
        assert remembered(twin).data == expected
    # and it is reused: a plain value met again is not encoded again
    if tnetstring.is_plain(value):
        try:
            first = remembered(value)
        except Exception:
            return
        assert remembered(copy.deepcopy(value)) is first


def test_a_remembered_encoding_is_bounded_and_only_plain_values_are_kept():
    remembered = tnetstring.Remembered(4)
    for n in range(10):
        assert remembered({"n": n}).data == mitmproxy_tnetstring.dumps({"n": n})
        assert len(remembered) <= 4
    not_plain = {"k": Name("v"), "level": Level.HIGH}
    assert remembered(not_plain).data == mitmproxy_tnetstring.dumps(not_plain)
    assert remembered(not_plain) is not remembered(not_plain)  # encoded each time, never remembered
    with pytest.raises(ValueError):
        remembered({"unpicklable and unencodable": object()})


@pytest.mark.parametrize(("value", "plain"), [
    ({"a": [1, (b"x", 2.5)], None: True}, True), ("", True), ({"k": Name("v")}, False),
    ([Level.HIGH], False), (OrderedDict(a=1), False), ({(1, 2): 3}, True), ([object()], False),
])
def test_plain_values_are_exact_tnetstring_types_all_the_way_down(value, plain):
    assert tnetstring.is_plain(value) is plain


def _in_dump_order(value):
    """A loaded value as it was before dumping: mitmproxy writes (so loads back) each dict's items last first."""
    if isinstance(value, dict):
        return {key: _in_dump_order(item) for key, item in reversed(value.items())}
    if isinstance(value, list):
        return [_in_dump_order(item) for item in value]
    return value


@pytest.mark.e2e
def test_flows_recorded_through_the_gateway_are_mitmproxys_bytes(reverse_env, upstream, callers, records_root):
    """A masked Responses API reply (~2 KB, personal data) and a streamed one, recorded by a real gateway: every
    record in the files is, byte for byte, what mitmproxy's encoder makes of it, and the recorder's encoding of each
    flow read back is what mitmproxy's FlowWriter writes for it."""
    marker = "tnetstring-marker"
    upstream.reply_text = pii_reply(2000)
    client = openai.OpenAI()
    client.responses.create(model="gpt-test", input=f"plain {marker} é ü 漢")
    with client.responses.stream(model="gpt-test", input=f"streamed {marker}") as stream:
        stream.get_final_response()
    flows = wait_for_flows(records_root / "reverse", lambda f: marker.encode() in (f.request.content or b""), 2)
    assert len(flows) == 2
    assert any(f.metadata.get("auditgate.masking", {}).get("status") == "masked" for f in flows)
    checked = 0
    for path in flow_files(records_root / "reverse"):
        data = path.read_bytes()
        reader = std_io.BytesIO(data)
        while reader.tell() < len(data):
            start = reader.tell()
            state = _in_dump_order(mitmproxy_tnetstring.load(reader))
            record = data[start:reader.tell()]
            assert record == mitmproxy_tnetstring.dumps(state)
            checked += 1
        with open(path, "rb") as file:
            for flow in io.FlowReader(file).stream():
                mitmproxys = std_io.BytesIO()
                io.FlowWriter(mitmproxys).add(flow)  # mitmproxy's own writer, on the flow read back
                assert flow_record(flow) == mitmproxys.getvalue()
    assert checked >= 2
