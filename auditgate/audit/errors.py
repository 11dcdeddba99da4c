"""Errors as they may be written into a record or a log line: never with what they failed on."""

from __future__ import annotations


def describe(error: BaseException) -> str:
    """An OSError with its errno text and file name; any other exception by its type alone.

    Other exceptions' messages may quote what they failed on (a flow's content, a prompt), which never
    goes into a record, an audit entry or a log line. A file name is the gateway's own path.
    """
    if isinstance(error, OSError):
        text = f"{type(error).__name__}: {error.strerror or error}"
        return f"{text}: {error.filename}" if error.filename else text
    return type(error).__name__
