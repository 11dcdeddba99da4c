"""Describing a failure of masking without quoting what was being masked."""

from __future__ import annotations

import traceback
from pathlib import Path


def describe(error: BaseException) -> str:
    """The exception's type and where it was raised, never its message.

    An unexpected exception's message may quote the text being masked (a KeyError names its key, a
    decode error shows the bytes), and the description goes into logs and flow records, which must
    never hold raw personal data. Exceptions of our own whose messages are known to be safe
    (StreamNotMaskable, BodyNotMaskable, MaskingWorkerError) are reported with their message instead.
    """
    frames = traceback.extract_tb(error.__traceback__) if error.__traceback__ else []
    where = f" at {Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else ""
    return f"{type(error).__name__}{where}"
