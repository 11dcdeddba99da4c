"""mitmproxy's flow file encoding (tnetstring), byte for byte, at about a third of the cost.

Why this exists: ``mitmproxy.io.tnetstring.dumps`` is pure Python that pushes every chunk through an
``isinstance`` chain onto a deque; encoding one recorded flow (~270 values) took ~0.25-0.5 ms of the
gateway's core, the largest single cost of recording. This encoder dispatches on the exact type,
builds each value with one bytes ``%`` format, inlines the common cases (str and bytes, header pairs)
and remembers the encoding of dict keys (a flow state's keys are a small fixed vocabulary): ~3x faster.

Its output is identical to mitmproxy's for every value a flow state holds (dicts, lists, tuples, str,
bytes, int, float, bool, None, nested): proven by a hypothesis property test against mitmproxy's
``dumps`` and by real flows through the gateway (tests/test_recording_tnetstring.py). Anything else (a
subclass of those types, or a value tnetstring cannot hold) is handed to mitmproxy's own ``dumps``, so
it is encoded, or refused with its error, exactly as mitmproxy would. mitmproxy writes a dict's items
last first (it fills its deque from the left); so does this.
"""

from __future__ import annotations

import pickle
from typing import Any

from mitmproxy.io import tnetstring as _mitmproxy_tnetstring

_fallback = _mitmproxy_tnetstring.dumps
# Encodings remembered by value: a flow state's dict keys are a small fixed vocabulary, and many of its
# strings, small ints and header lines recur flow after flow (hosts, modes, entity types, ports,
# counts). Each cache is a plain dict keyed by the exact value (looked up only for its exact type: 1,
# 1.0 and True are equal keys but never meet in one cache). Full, a cache is emptied and fills again
# with what recurs, so one-off values (ids) cannot crowd out the rest and memory stays bounded.
_KEYS: dict[str, bytes] = {}  # dict keys (str)
_STRS: dict[str, bytes] = {}  # short str values
_INTS: dict[int, bytes] = {}  # small ints
_HEADERS: dict[tuple[bytes, bytes], bytes] = {}  # short (name, value) header pairs
_CACHE_MAX = 4096
_STR_MAX = 40  # longer strings (prompts, comments) rarely recur; not worth the hash
_HEADER_MAX = 64  # name + value bytes


def dumps(value: Any) -> bytes:
    """The tnetstring of value, equal to ``mitmproxy.io.tnetstring.dumps(value)``; raises where it raises."""
    return _ENCODE.get(type(value), _fallback)(value)


def _str(value: str) -> bytes:
    encoded = _STRS.get(value)
    if encoded is None:
        data = value.encode("utf8")  # strict, as mitmproxy's: a lone surrogate raises UnicodeEncodeError
        encoded = b"%d:%s;" % (len(data), data)
        if len(value) <= _STR_MAX:
            if len(_STRS) >= _CACHE_MAX:
                _STRS.clear()
            _STRS[value] = encoded
    return encoded


def _bytes(value: bytes) -> bytes:
    return b"%d:%s," % (len(value), value)


def _int(value: int) -> bytes:
    encoded = _INTS.get(value)
    if encoded is None:
        data = str(value).encode()  # str(), as mitmproxy's: past sys.get_int_max_str_digits it raises ValueError
        encoded = b"%d:%s#" % (len(data), data)
        if -(1 << 31) <= value < (1 << 31):
            if len(_INTS) >= _CACHE_MAX:
                _INTS.clear()
            _INTS[value] = encoded
    return encoded


def _float(value: float) -> bytes:
    data = repr(value).encode()
    return b"%d:%s^" % (len(data), data)


def _bool(value: bool) -> bytes:
    return b"4:true!" if value else b"5:false!"


def _none(value: None) -> bytes:
    return b"0:~"


def _key(key: str) -> bytes:
    data = key.encode("utf8")
    encoded = b"%d:%s;" % (len(data), data)
    if len(_KEYS) >= _CACHE_MAX:
        _KEYS.clear()
    _KEYS[key] = encoded
    return encoded


def _header(name: bytes, content: bytes) -> bytes:
    pair = b"%d:%s,%d:%s," % (len(name), name, len(content), content)
    encoded = b"%d:%s]" % (len(pair), pair)
    if len(name) + len(content) <= _HEADER_MAX:
        if len(_HEADERS) >= _CACHE_MAX:
            _HEADERS.clear()
        _HEADERS[(name, content)] = encoded
    return encoded


def _list(value: list | tuple) -> bytes:
    parts = []
    append = parts.append
    strs = _STRS
    for item in value:
        kind = type(item)
        if kind is tuple and len(item) == 2 and type(item[0]) is bytes and type(item[1]) is bytes:
            append(_HEADERS.get(item) or _header(*item))  # a header: the most common item in a flow state's lists
        elif kind is str:
            append(strs.get(item) or _str(item))
        elif kind is bytes:
            append(b"%d:%s," % (len(item), item))
        elif kind is dict:
            append(_dict(item))
        elif kind is int:
            append(_INTS.get(item) or _int(item))
        else:
            append(_ENCODE.get(kind, _fallback)(item))
    body = b"".join(parts)
    return b"%d:%s]" % (len(body), body)


def _dict(value: dict) -> bytes:
    parts = []
    append = parts.append
    keys = _KEYS
    strs = _STRS
    ints = _INTS
    for key, item in reversed(value.items()):  # mitmproxy's order: the last item first
        if type(key) is str:
            append(keys.get(key) or _key(key))
        else:
            append(_ENCODE.get(type(key), _fallback)(key))
        kind = type(item)
        if kind is str:
            append(strs.get(item) or _str(item))
        elif item is None:
            append(b"0:~")
        elif kind is bytes:
            append(b"%d:%s," % (len(item), item))
        elif kind is int:
            append(ints.get(item) or _int(item))
        elif kind is float:
            data = repr(item).encode()
            append(b"%d:%s^" % (len(data), data))
        elif kind is bool:
            append(b"4:true!" if item else b"5:false!")
        elif kind is dict:
            append(_dict(item))
        else:
            append(_ENCODE.get(kind, _fallback)(item))
    body = b"".join(parts)
    return b"%d:%s}" % (len(body), body)


class Encoded:
    """A value's tnetstring, already made: stands in for the value in what ``dumps`` encodes."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data


class Remembered:
    """Encodings of whole values that recur unchanged (a kept-alive connection's state, flow after flow).

    ``remembered(value)`` gives an ``Encoded`` of value, made once and reused while an identical value
    comes back. Identical means type-strict, not ``==`` (``1 == 1.0 == True`` and ``0.0 == -0.0``, and
    dicts are equal in any order, yet each encodes differently): the key is the value's pickle, which
    records each item's exact type, float bits and dict order. Only plain values (exact dict, list,
    tuple, str, bytes, int, float, bool, None all the way down) are remembered: a plain value's pickle
    holds only those types' opcodes, so a value pickling to the same bytes is plain too, and is the same
    value for tnetstring. A value that is not plain or not picklable is encoded as usual, each time.
    Bounded: full, it is emptied and fills again with what still recurs.
    """

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self._encoded: dict[bytes, Encoded] = {}

    def __call__(self, value: Any) -> Encoded:
        try:
            key = pickle.dumps(value, 5)
        except Exception:  # not picklable (so not plain): encoded, not remembered
            return Encoded(dumps(value))
        encoded = self._encoded.get(key)
        if encoded is None:
            encoded = Encoded(dumps(value))  # raises as mitmproxy's dumps would
            if is_plain(value):
                if len(self._encoded) >= self.max_entries:
                    self._encoded.clear()
                self._encoded[key] = encoded
        return encoded

    def __len__(self) -> int:
        return len(self._encoded)


_PLAIN_SCALARS = frozenset({str, bytes, int, float, bool, type(None)})


def is_plain(value: Any) -> bool:
    """Whether value is made of exact dicts, lists, tuples and tnetstring's scalars only."""
    kind = type(value)
    if kind in _PLAIN_SCALARS:
        return True
    if kind is dict:
        return all(is_plain(key) and is_plain(item) for key, item in value.items())
    if kind is list or kind is tuple:
        return all(is_plain(item) for item in value)
    return False


_ENCODE = {
    dict: _dict,
    str: _str,
    bytes: _bytes,
    list: _list,
    tuple: _list,
    int: _int,
    float: _float,
    bool: _bool,
    type(None): _none,
    Encoded: lambda value: value.data,
}
