"""`auditgate demo`: a first run without an OpenAI account (what `./run_gateway.sh --demo` runs).

Starts a local OpenAI-compatible demo upstream whose replies hold personal data, then the gateway in
reverse mode in front of it (mitmweb), with demo rules, records and tokens under records/demo, and prints
what to try: a masked reply, a masked stream, a block, an approval, the audit log and an evidence pack.
See docs/first-run.md.
"""

from __future__ import annotations

import argparse

# A constant only: the demo's modules (and mitmproxy, Presidio) load in the handler.
from auditgate.demo import DEFAULT_DEMO_DIR


def _demo(args: argparse.Namespace) -> int:
    from auditgate.demo.run import run_demo

    extra = list(args.mitmproxy_args)
    if extra[:1] == ["--"]:
        extra = extra[1:]
    return run_demo(directory=args.dir, confdir=args.confdir, port=args.port, admin_port=args.admin_port, web_port=args.web_port,
                    web=not args.no_web, ner=args.ner, event_delay=args.event_delay, mitmproxy_args=extra)


def register(commands) -> None:
    demo = commands.add_parser(
        "demo", help="a first run without an OpenAI account: a demo upstream and the gateway in front of it",
        description="Start a local demo upstream (OpenAI-compatible, replies holding personal data) and the gateway "
                    "in reverse mode in front of it, then print what to try. Ctrl-C stops both.")
    demo.add_argument("--dir", default=DEFAULT_DEMO_DIR,
                      help=f"the demo's rules, records and tokens, made afresh at each start (default {DEFAULT_DEMO_DIR})")
    demo.add_argument("--confdir", default="certs",
                      help="mitmproxy's confdir: its CA (default certs, the same as ./run_gateway.sh)")
    demo.add_argument("--port", type=int, default=None, help="the gateway's port (default 8080, or a free one if taken)")
    demo.add_argument("--admin-port", type=int, default=None,
                      help="the approvals admin listener's port (default: a free one; the instructions give it)")
    demo.add_argument("--web-port", type=int, default=None, help="mitmweb's port (default 8081, or a free one if taken)")
    demo.add_argument("--no-web", action="store_true", help="run mitmdump instead of mitmweb")
    demo.add_argument("--ner", action="store_true",
                      help="also mask person names (needs the spaCy model: ./run_gateway.sh --demo --ner installs it)")
    demo.add_argument("--event-delay", type=float, default=0.05, help="seconds between the demo upstream's streamed events")
    demo.add_argument("mitmproxy_args", nargs=argparse.REMAINDER, help="further arguments for mitmweb / mitmdump")
    demo.set_defaults(handler=_demo)
