"""The evidence pack's HTML as an auditor sees it: rendered by a real headless Chromium, over two instances."""

from __future__ import annotations

import re

import pytest

from auditgate.audit.evidence import write_evidence_pack
from tests.browser import headless_chromium
from tests.test_audit_evidence import T0, _write_rich_log

SECTIONS = {
    "verification": "Verification per instance",
    "who-called-what": "Who called what",
    "decisions-by-rule": "Decisions by rule",
    "approvals": "Approvals",
    "refused-decision-attempts": "Refused decision attempts",
    "config-changes": "Configuration changes",
    "websocket": "WebSocket sessions",
    "outcome-unknown": "Forwarded, outcome unknown",
    "findings": "Verifier findings",
    "self-check": "How to check these records yourself",
    "cannot-show": "What this pack cannot show",
}


@pytest.fixture
def browser(tmp_path):
    driver = headless_chromium(tmp_path)
    yield driver
    driver.quit()


def test_the_html_pack_over_two_instances_reads_as_tables_without_none_or_json(tmp_path, browser):
    from selenium.webdriver.common.by import By

    gw_a = _write_rich_log(tmp_path / "gw-a", instance="gw-a:8080")
    gw_b = _write_rich_log(tmp_path / "gw-b", instance="gw-b:8080", start=T0 + 5)
    write_evidence_pack([gw_a, gw_b], tmp_path / "out")
    browser.get((tmp_path / "out" / "report.html").as_uri())

    text = browser.find_element(By.TAG_NAME, "body").text
    for section_id, title in SECTIONS.items():
        section = browser.find_element(By.ID, section_id)
        assert section.find_element(By.TAG_NAME, "h2").text == title
    assert "None" not in text and "null" not in text
    # No raw JSON anywhere the auditor reads: no braces, no "key": pairs, no [..] lists of quoted strings.
    assert "{" not in text and "}" not in text and not re.search(r'"\w+"\s*:', text) and '["' not in text

    callers = browser.find_elements(By.CSS_SELECTOR, "#who-called-what-table tbody tr")
    assert {tuple(c.text for c in row.find_elements(By.TAG_NAME, "td"))[:2] for row in callers} == {
        ("alice", "gw-a:8080"), ("alice", "gw-b:8080")}
    approvals = [[c.text for c in row.find_elements(By.TAG_NAME, "td")]
                 for row in browser.find_elements(By.CSS_SELECTOR, "#approvals-table tbody tr")]
    assert len(approvals) == 2 and all(row[2] == "alice" and row[6] == "bob" for row in approvals)
    for row in approvals:
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", row[3]) and re.fullmatch(
            r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", row[7])
        assert re.search(r"gw-[ab]:8080: \d", row[-1])  # traceable: the instance and its sequence numbers
    attempts = browser.find_element(By.ID, "refused-decision-attempts-table").text
    assert "alice" in attempts and "approve" in attempts and "self_approval_refused" in attempts
    config = browser.find_element(By.ID, "config-changes-table").text
    assert "policy.yaml" in config and "sha256:1111111111111111… → sha256:3333333333333333…" in config
    assert "added: new-rule; changed: hold-exports" in config
    websocket = {row.find_elements(By.TAG_NAME, "td")[0].text: row.find_elements(By.TAG_NAME, "td")[1].text
                 for row in browser.find_elements(By.CSS_SELECTOR, "#websocket-table tbody tr")}
    assert websocket["sessions"] == "2" and websocket["messages blocked"] == "2" and websocket["messages masked"] == "4"
    unknown = browser.find_element(By.ID, "outcome-unknown-table").text
    assert unknown.count("lost-1") == 2 and "bob" in unknown
    check = browser.find_element(By.ID, "self-check")
    commands = [pre.text for pre in check.find_elements(By.TAG_NAME, "pre")]
    assert len(commands) == 2 and "rfc8785.dumps" in commands[0] and "openssl pkeyutl -verify" in commands[1]
    assert "RFC 8785" in check.find_element(By.TAG_NAME, "p").text
