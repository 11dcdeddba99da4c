"""An HTTP flow's state, equal to ``flow.get_state()``, at about two thirds of the cost; the metadata not copied.

Why this exists: mitmproxy's ``SerializableDataclass.get_state`` analyses every field's type annotation
(``typing.get_origin``/``get_args``) on every call; for a flow's two connections (~37 fields) that was
three quarters of taking its state. Here each connection class's fields are analysed once into small
converters that do what ``serializable._to_state`` does for the values it accepts, and hand anything
else (a value it would refuse, a type it does not know) to ``_to_state`` itself, so the result, or the
error, is mitmproxy's. The flow's own fields are taken as ``Flow.get_state`` and ``HTTPFlow.get_state``
take them, except the metadata, which is the flow's own dict: the caller encodes the state at once.

Checked three ways: on first use, against ``get_state`` on mitmproxy's test flows (a mitmproxy release that
adds or changes a field makes this module fall back to ``get_state`` for good); by
tests/test_recording_state.py (hypothesis over connection field values, and real flows); and by the
flow files themselves, which tests compare with mitmproxy's own writer.
"""

from __future__ import annotations

import collections.abc
import copy
import enum
import logging
import typing
from collections.abc import Callable
from types import NoneType, UnionType
from typing import Any

from mitmproxy import connection, http, version
from mitmproxy.coretypes import serializable

logger = logging.getLogger(__name__)

_to_state = serializable._to_state
_ADDRESS_TYPES = (str, int, int, int)  # mitmproxy's own reading of peername/sockname tuples


def http_flow_state(flow: http.HTTPFlow, connection: Callable[[Any], Any] | None = None) -> dict[str, Any]:
    """``flow.get_state()``, but with ``flow.metadata`` itself (not a copy) as its metadata.

    connection, if given, stands in for ``connection_state`` for the two connections (flow_record hands
    their already encoded states); it is not used for a flow with a backup, whose state is compared
    with the backup, nor where this module falls back to ``get_state``.
    """
    if type(flow) is not http.HTTPFlow or not (_FAST if _FAST is not None else _check()):
        metadata = flow.metadata
        flow.metadata = {}
        try:
            state = flow.get_state()
        finally:
            flow.metadata = metadata
        state["metadata"] = metadata
        return state
    backup = flow._backup
    if connection is None or backup is not None:
        connection = connection_state
    # Flow.get_state, field for field
    state = {
        "version": version.FLOW_FORMAT_VERSION,
        "type": flow.type,
        "id": flow.id,
        "error": flow.error.get_state() if flow.error else None,
        "client_conn": connection(flow.client_conn),
        "server_conn": connection(flow.server_conn),
        "intercepted": flow.intercepted,
        "is_replay": flow.is_replay,
        "marked": flow.marked,
        "metadata": flow.metadata,
        "comment": flow.comment,
        "timestamp_created": flow.timestamp_created,
    }
    state["backup"] = copy.deepcopy(backup) if backup != state else None
    # HTTPFlow.get_state
    state["request"] = flow.request.get_state()
    state["response"] = flow.response.get_state() if flow.response else None
    state["websocket"] = flow.websocket.get_state() if flow.websocket else None
    return state


_plans: dict[type, list[tuple[str, Callable[[Any], Any]]]] = {}


def connection_state(conn: connection.Connection) -> dict[str, Any]:
    """``conn.get_state()``, with each field's type analysed once per class."""
    plan = _plans.get(type(conn))
    if plan is None:
        try:
            fields = type(conn)._SerializableDataclass__fields()  # the fields get_state walks, as it walks them
        except AttributeError:
            return conn.get_state()
        plan = _plans[type(conn)] = [(f.name, _converter(f.type, f.name)) for f in fields]
    return {name: convert(getattr(conn, name)) for name, convert in plan}


def _converter(kind: Any, name: str) -> Callable[[Any], Any]:
    """What ``_to_state(value, kind, name)`` does, for the values it accepts; the rest goes to it."""

    def theirs(value):
        return _to_state(value, kind, name)

    origin = typing.get_origin(kind)
    if origin is typing.Literal:
        allowed = typing.get_args(kind)
        return lambda value: value if value in allowed else theirs(value)
    if origin in (UnionType, typing.Union):
        args = typing.get_args(kind)
        if len(args) != 2 or args[1] is not NoneType:
            return theirs
        inner = _converter(args[0], name)
        return lambda value: None if value is None else inner(value)
    if hasattr(kind, "get_state"):
        return lambda value: theirs(value) if value is None else value.get_state()
    if origin in (list, collections.abc.Sequence):
        (item_kind,) = typing.get_args(kind)
        item = _converter(item_kind, name)
        return lambda value: theirs(value) if value is None else [item(x) for x in value]
    if origin is tuple and name in ("peername", "sockname"):
        def address(value):
            if value is None:
                return theirs(value)
            parts = []
            for x, part_kind in zip(value, _ADDRESS_TYPES):
                if not isinstance(x, (int, float) if part_kind is int else part_kind):
                    return theirs(value)
                parts.append(part_kind(x))
            return tuple(parts)
        return address
    if origin is tuple and Ellipsis not in typing.get_args(kind):
        parts_of = [_converter(part_kind, name) for part_kind in typing.get_args(kind)]

        def fixed_tuple(value):  # a server's `via`: (scheme, (host, port))
            if type(value) is not tuple or len(value) != len(parts_of):
                return theirs(value)
            return tuple(convert(x) for convert, x in zip(parts_of, value))
        return fixed_tuple
    if kind in (int, float):
        return lambda value: kind(value) if isinstance(value, (int, float)) else theirs(value)
    if kind in (str, bytes, bool):
        return lambda value: kind(value) if isinstance(value, kind) else theirs(value)
    if isinstance(kind, type) and issubclass(kind, enum.Enum):
        return lambda value: theirs(value) if value is None else value.value
    return theirs  # dicts, anything new: mitmproxy's own


def _agrees_with_mitmproxy() -> bool:
    """This module's states equal get_state's on mitmproxy's test flows (every connection field set)."""
    try:
        from mitmproxy.test import tflow

        flows = [tflow.tflow(resp=True), tflow.tflow(err=True), tflow.twebsocketflow()]
        flows[0].backup()
        flows[0].comment = "changed after its backup"
        flows[0].metadata["k"] = [1, {"x": b"y"}]
        return all(http_flow_state(f) == f.get_state() for f in flows)
    except Exception:
        logger.exception("checking the fast flow state against mitmproxy's failed")
        return False


_FAST: bool | None = None  # whether this mitmproxy's states are what we take: checked on first use


def _check() -> bool:
    global _FAST
    _FAST = True  # what the check itself runs
    _FAST = _agrees_with_mitmproxy()
    if not _FAST:
        logger.warning("this mitmproxy's flow states differ from what auditgate.recording.state takes: "
                       "flows are recorded with mitmproxy's own get_state")
    return _FAST
