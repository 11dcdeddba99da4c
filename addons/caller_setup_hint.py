"""Prints, once the proxy listens, exactly what a caller exports to reach the gateway."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from mitmproxy import ctx
from mitmproxy.proxy.mode_specs import RegularMode, ReverseMode

from auditgate.core.flow_contract import services

logger = logging.getLogger("auditgate.addons.caller_setup_hint")

CA_CERT_FILE = "mitmproxy-ca-cert.pem"
TRACES_PATH = "/v1/traces/ingest"


def reverse_mode_traces_hint(base: str) -> str:
    """What a reverse-mode caller using the Agents SDK must do so its trace uploads stay inside."""
    return (
        "auditgate: Agents SDK users in reverse mode: the SDK uploads traces to https://api.openai.com"
        f"{TRACES_PATH} whatever OPENAI_BASE_URL says, with OPENAI_API_KEY (your gateway token) as its "
        "credential, past this gateway. Keep them inside with one of:\n"
        "  export OPENAI_AGENTS_DISABLE_TRACING=1      # no trace uploads at all\n"
        "  or send them here (masked, recorded and audited under masking.yaml's 'traces' setting):\n"
        "    from agents import set_trace_processors\n"
        "    from agents.tracing.processors import BackendSpanExporter, BatchTraceProcessor\n"
        f"    set_trace_processors([BatchTraceProcessor(BackendSpanExporter(endpoint=\"{base}{TRACES_PATH}\"))])\n"
        "  or use the gateway in forward mode (HTTPS_PROXY), where the uploads pass through it like any request."
    )


def _url_host(host: str) -> str:
    if host in ("", "0.0.0.0", "::"):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


class CallerSetupHint:
    """Logs the environment variables a caller sets for each listening proxy mode."""

    def running(self) -> None:
        proxyserver = ctx.master.addons.get("proxyserver")
        if proxyserver is None:
            return
        ca_file = (Path(ctx.options.confdir).expanduser() / CA_CERT_FILE).resolve()
        for server in proxyserver.servers:
            if not server.listen_addrs:
                continue
            host, port = server.listen_addrs[0][:2]
            base = f"http://{_url_host(host)}:{port}"
            if isinstance(server.mode, RegularMode):
                lines = [f"HTTPS_PROXY={base}", f"SSL_CERT_FILE={ca_file}"]
            elif isinstance(server.mode, ReverseMode):
                lines = [f"OPENAI_BASE_URL={base}/v1"]
            else:
                continue
            token = "<the token printed above>" if services.minted_identity else "<your gateway token>"
            lines.append(f"OPENAI_API_KEY={token}")
            logger.info(
                "auditgate %s: callers export\n%s", server.mode.description, "\n".join(f"  export {l}" for l in lines)
            )
            if isinstance(server.mode, ReverseMode):
                logger.info("%s", reverse_mode_traces_hint(base))
        if services.minted_identity:
            # Printed last, so the start-up output ends by pointing at the one-time token.
            logger.info("auditgate: ready. The token of '%s' is printed once above (OPENAI_API_KEY=agt_...); only its "
                        "hash is stored. Set it as OPENAI_API_KEY in the caller.", services.minted_identity)
        # mitmdump's console log is block-buffered when stdout is a pipe (systemd, a supervisor, a test):
        # the start-up lines must reach whoever watches for them now, not at the next 8 KB.
        sys.stdout.flush()


addons = [CallerSetupHint()]
