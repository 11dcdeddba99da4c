"""The options every auditgate addon shares, declared identically by each so any of them loads alone."""

from __future__ import annotations

from pathlib import Path

from mitmproxy import ctx


def add_gateway_options(loader) -> None:
    # mitmproxy accepts the same option declared twice when the declarations are identical.
    loader.add_option(
        "gateway_rules", str, "rules", "Directory of auditgate's YAML configuration (upstreams, identities, ...)."
    )
    loader.add_option(
        "gateway_records", str, "records", "Directory where auditgate writes its records (flow files under flows/)."
    )


def rules_dir() -> Path:
    return Path(ctx.options.gateway_rules).expanduser()


def records_dir() -> Path:
    return Path(ctx.options.gateway_records).expanduser()
