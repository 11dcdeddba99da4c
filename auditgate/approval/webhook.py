"""Telling approvers about a held request: a Slack-compatible incoming-webhook message (never the prompt)."""

from __future__ import annotations

import json
import urllib.request

from auditgate.approval.store import Approval


def slack_escape(text: str) -> str:
    """Slack's mrkdwn control characters, escaped as Slack documents it (&, <, >)."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def webhook_message(approval: Approval, page_url: str) -> dict:
    """A Slack-compatible incoming-webhook payload: who, what, which rule, and a link to decide (no prompt)."""
    who = slack_escape(str(approval.requester.get("name")))
    what = slack_escape(f"{approval.method} {approval.host}{approval.path}" + (f" ({approval.model})" if approval.model else ""))
    rule = slack_escape(approval.rule)
    link = f"{page_url}#{approval.id}"
    text = (f"auditgate: request {approval.id} from *{who}* waits for approval: {what}, rule `{rule}`. "
            f"Approvers: {slack_escape(', '.join(approval.approver_groups))}. <{link}|Open the approvals page>")
    return {"text": text}


def post_webhook(url: str, payload: dict, timeout: float = 5.0) -> int:
    request = urllib.request.Request(url, json.dumps(payload).encode(), {"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 (the scheme is checked at start)
        return response.status
