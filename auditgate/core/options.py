"""The options every auditgate addon shares, declared identically by each so any of them loads alone."""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from mitmproxy import ctx, exceptions

from auditgate.core.config import ConfigError
from auditgate.core.shipped import SHIPPED_RULES, ensure_rules_dir

T = TypeVar("T")

# Under mitmproxy every log record, whatever its level, becomes an event dispatched to every loaded
# addon (mitmdump sets the root logger to DEBUG). Our per-request lines are debug lines; capping our
# loggers at INFO skips them before a record is made. Here, because every addon imports this module,
# alone or in the bundle. (Set termlog_verbosity=debug and lower this to see them.)
logging.getLogger("auditgate").setLevel(logging.INFO)


def add_gateway_options(loader) -> None:
    # mitmproxy accepts the same option declared twice when the declarations are identical.
    loader.add_option(
        "gateway_rules", str, "rules", "Directory of auditgate's YAML configuration (upstreams, identities, ...)."
    )
    loader.add_option(
        "gateway_records", str, "records", "Directory where auditgate writes its records (flow files under flows/)."
    )
    loader.add_option(
        "gateway_instance", str, "",
        "This gateway process's name among several sharing one approvals store (flow metadata, audit entries, "
        "approval leases). Empty: <hostname>:<listen_port>.",
    )


def rules_dir() -> Path:
    directory = Path(ctx.options.gateway_rules).expanduser()
    try:
        made = ensure_rules_dir(directory, ctx.options.gateway_rules)
    except ConfigError as e:
        raise exceptions.OptionsError(f"auditgate: {e}") from None
    if made:
        logging.getLogger("auditgate.rules").info(
            "made %s from the shipped defaults (%s); edit it there, the defaults stay as shipped",
            directory.absolute(), SHIPPED_RULES)
    return directory


def instance_id() -> str:
    """The gateway_instance option, or <hostname>:<listen_port> when it is empty."""
    given = getattr(ctx.options, "gateway_instance", "") or ""
    if given:
        return given
    try:
        port = ctx.options.listen_port
    except (AttributeError, KeyError):
        port = None
    return f"{socket.gethostname()}:{port if port else 8080}"


def records_dir() -> Path:
    return Path(ctx.options.gateway_records).expanduser()


def load_rules(load: Callable[[Path], T]) -> T:
    """Load a rules file from gateway_rules; a bad file stops the start (or the option change) with its reason."""
    try:
        return load(rules_dir())
    except ConfigError as e:
        raise exceptions.OptionsError(f"auditgate: {e}") from None
