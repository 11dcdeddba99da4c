"""Sample personal data for masking tests, one value per entity type the default rules mask."""

from __future__ import annotations

from pathlib import Path

from auditgate.core.shipped import SHIPPED_RULES

PII_VALUES = {
    "EMAIL_ADDRESS": "jane.roe@example.org",
    "PHONE_NUMBER": "+1 415-555-0100",
    "CREDIT_CARD": "4111 1111 1111 1111",
    "US_SSN": "536-22-1234",
    "IBAN_CODE": "DE89 3704 0044 0532 0130 00",
    "IP_ADDRESS": "192.168.10.20",
    "API_KEY": "sk-proj-" + "Ab3dEf6hIj9kLm2nOp5qRs8t",
}

PII_SENTENCE = (
    f"Write to {PII_VALUES['EMAIL_ADDRESS']} or call {PII_VALUES['PHONE_NUMBER']}. "
    f"Card {PII_VALUES['CREDIT_CARD']}, SSN {PII_VALUES['US_SSN']}, IBAN {PII_VALUES['IBAN_CODE']}, "
    f"host {PII_VALUES['IP_ADDRESS']}, key {PII_VALUES['API_KEY']} - thanks!"
)
MASKED_SENTENCE = (
    "Write to <EMAIL_ADDRESS> or call <PHONE_NUMBER>. Card <CREDIT_CARD>, SSN <US_SSN>, IBAN <IBAN_CODE>, "
    "host <IP_ADDRESS>, key <API_KEY> - thanks!"
)


def shipped_rules() -> Path:
    return SHIPPED_RULES
