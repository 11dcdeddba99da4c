"""`auditgate approvals list|show|approve|deny ID [--reason TEXT]`: decide held requests through the admin API.

The API shows each caller their own requests and those they may decide, nobody else's: `list` is that.

The approver's own gateway token is read from $AUDITGATE_TOKEN (never from the command line, where other
users could see it in the process list); the admin listener from --url or $AUDITGATE_ADMIN_URL.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request

DEFAULT_URL = "http://127.0.0.1:8181"
TOKEN_ENV = "AUDITGATE_TOKEN"


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status


def _call(args: argparse.Namespace, method: str, path: str, body: dict | None = None) -> dict:
    token = os.environ.get(TOKEN_ENV, "")
    if not token:
        raise ApiError(0, "no_token", f"set {TOKEN_ENV} to your gateway token (a service token or OIDC JWT)")
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(args.url.rstrip("/") + path, data=data, method=method,
                                     headers={"authorization": f"Bearer {token}", "content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=args.timeout) as response:  # noqa: S310 (an operator's URL)
            return json.loads(response.read())
    except urllib.error.HTTPError as e:
        try:
            error = json.loads(e.read()).get("error", {})
        except ValueError:
            error = {}
        raise ApiError(e.code, error.get("code", "error"), error.get("message", e.reason)) from None
    except (urllib.error.URLError, OSError) as e:
        raise ApiError(0, "unreachable", f"cannot reach the admin listener at {args.url}: {e}") from None


def _requester(approval: dict) -> str:
    """The requester's name as it shows (the API's requester_display: invisible characters removed), marked
    with '*' when the name as spelled differs from it."""
    raw = (approval.get("requester") or {}).get("name") or "?"
    shown = approval.get("requester_display") or raw
    return shown if shown == raw else f"{shown}*"


def _summary(approval: dict) -> str:
    requester = _requester(approval)
    age = approval.get("age_s", 0)
    return (f"{approval['id']}  {approval['status']:<8}  {requester:<16}  {approval.get('model') or '-':<16}  "
            f"{approval['rule']:<28}  {age:>6.0f}s")


def _list(args: argparse.Namespace) -> int:
    query = "" if args.all else "?status=pending"
    approvals = _call(args, "GET", f"/api/approvals{query}")["approvals"]
    if args.json:
        print(json.dumps(approvals, indent=2))
        return 0
    if not approvals:
        print("no pending approvals" if not args.all else "no approvals")
        return 0
    print(f"{'id':<14}  {'status':<8}  {'caller':<16}  {'model':<16}  {'rule':<28}  {'age':>7}")
    for approval in approvals:
        print(_summary(approval))
    if any(_requester(a).endswith("*") for a in approvals):
        print("* the caller's name has hidden or look-alike characters: `show` gives who it really is")
    return 0


def _show(args: argparse.Namespace) -> int:
    approval = _call(args, "GET", f"/api/approvals/{args.id}")
    if args.json:
        print(json.dumps(approval, indent=2))
        return 0
    requester = approval.get("requester") or {}
    lines = [
        ("id", approval["id"]), ("status", approval["status"]), ("rule", approval["rule"]),
        ("caller", f"{_requester(approval)} (groups: {', '.join(requester.get('groups') or [])})"),
        ("subject", approval.get("requester_principal") or "-"),
        ("request", f"{approval['method']} {approval['host']}{approval['path']}"), ("model", approval.get("model")),
        ("tools", ", ".join(approval.get("tools") or []) or "-"),
        ("approvers", ", ".join(approval.get("approver_groups") or [])),
        ("held on", approval.get("instance") or "-"),  # the gateway instance holding it (any instance decides)
        ("requested", time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(approval["created_at"]))),
        ("age", f"{approval.get('age_s', 0):.0f}s"),
    ]
    if approval.get("decided_by") or approval["status"] != "pending":
        lines.append(("decided by", (approval.get("decided_by") or {}).get("name", "-")))
        lines.append(("reason", approval.get("reason") or "-"))
    for refusal in approval.get("refusals") or []:
        lines.append(("refused", f"{(refusal.get('by') or {}).get('name')}: {refusal.get('code')}"))
    if approval.get("viewer_may") is not None:
        lines.append(("you may", ", ".join(approval["viewer_may"]) or "nothing (waiting for an approver)"))
    for key, value in lines:
        print(f"{key:>11}: {value}")
    print("     prompt (masked):")
    for line in (approval.get("preview") or "").splitlines() or [""]:
        print(f"       {line}")
    return 0


def _decide(args: argparse.Namespace) -> int:
    approval = _call(args, "POST", f"/api/approvals/{args.id}/{args.command_name}", {"reason": args.reason})
    verb = "approved" if args.command_name == "approve" else "denied"
    print(f"{approval['id']} {verb} (requested by {(approval.get('requester') or {}).get('name')}, "
          f"rule {approval['rule']})")
    return 0


def _run(handler):
    def run(args: argparse.Namespace) -> int:
        try:
            return handler(args)
        except ApiError as e:
            print(f"auditgate: {e}", file=sys.stderr)
            # 1: the gateway refused (four-eyes, not found, already decided); 2: could not ask it.
            return 1 if e.status else 2
    return run


def register(commands) -> None:
    approvals = commands.add_parser("approvals", help="list and decide requests held for approval")
    actions = approvals.add_subparsers(dest="action", required=True)

    def common(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--url", default=os.environ.get("AUDITGATE_ADMIN_URL", DEFAULT_URL),
                            help=f"the gateway's admin listener (default: $AUDITGATE_ADMIN_URL or {DEFAULT_URL})")
        parser.add_argument("--timeout", type=float, default=10.0, help=argparse.SUPPRESS)
        parser.add_argument("--json", action="store_true", help="print the API's JSON")

    listing = actions.add_parser("list", help="pending requests (--all: every recent one)")
    listing.add_argument("--all", action="store_true")
    common(listing)
    listing.set_defaults(handler=_run(_list))
    show = actions.add_parser("show", help="one request: caller, rule, masked prompt, decision")
    show.add_argument("id")
    common(show)
    show.set_defaults(handler=_run(_show))
    for name in ("approve", "deny"):
        decide = actions.add_parser(name, help="approve a held request (never your own)" if name == "approve" else "deny a held request")
        decide.add_argument("id")
        decide.add_argument("--reason", default=None, help="why (recorded, and shown to the caller on deny)")
        common(decide)
        decide.set_defaults(handler=_run(_decide), command_name=name)
