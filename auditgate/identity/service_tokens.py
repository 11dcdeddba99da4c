"""Caller identities, and the service tokens backing some of them (stored only as SHA-256 hashes in
rules/identities.yaml). OIDC identities are verified in the oidc_* modules."""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from auditgate.core.config import ConfigError, RulesFile, check_keys
from auditgate.core.private_files import private_dir, write_private_atomically

IDENTITIES_FILE = "identities.yaml"
TOKEN_PREFIX = "agt_"
# Top-level keys other capabilities add to identities.yaml (OIDC issuers, group grants) are kept on rewrite.
_TOP_LEVEL_KEYS = {"service_tokens", "issuers", "authorization"}
_ENTRY_KEYS = {"name", "groups", "token_sha256"}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,127}$")
_HASH = re.compile(r"^sha256:[0-9a-f]{64}$")


def mint_token() -> str:
    """A fresh random service token: 256 bits of entropy, recognisable by its prefix."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def token_hash(token: str) -> str:
    # A plain digest is enough: tokens are random 256-bit values, so there is nothing to brute-force.
    return "sha256:" + hashlib.sha256(token.encode("utf-8")).hexdigest()


def token_id(digest: str) -> str:
    """A service token's stable id, recorded with its identity: the first 16 hex digits of its SHA-256 (as in
    identities.yaml, where an operator finds it). It names the token without being it, and stays the same
    when the token's name changes: four-eyes compares it, never the name."""
    return digest.removeprefix("sha256:")[:16]


@dataclass(frozen=True)
class Identity:
    """Who made a request: what is recorded with the flow (never the credential)."""

    name: str
    groups: tuple[str, ...] = ()
    method: str = "service_token"  # or "oidc"
    # OIDC identities add issuer, subject and, where the token has them, email, display_name and jti;
    # service-token identities add token_id. issuer + subject, or token_id, is the stable subject.
    extra: dict[str, str] = field(default_factory=dict, compare=False)

    def as_metadata(self) -> dict:
        return {"name": self.name, "groups": list(self.groups), "method": self.method, **self.extra}

    def describe(self) -> str:
        """One line for the log: who, how, which groups (never the credential)."""
        who = self.name
        if self.method == "oidc":
            who += f" (sub {self.extra.get('subject')} of {self.extra.get('issuer')}"
            who += f", jti {self.extra['jti']})" if "jti" in self.extra else ")"
        return f"{who} via {self.method}, groups [{', '.join(self.groups)}]"


@dataclass(frozen=True)
class ServiceTokens:
    by_hash: dict[str, Identity]

    def __len__(self) -> int:
        return len(self.by_hash)

    def authenticate(self, token: str) -> Identity | None:
        return self.by_hash.get(token_hash(token))


def _validate_groups(path: Path, where: str, groups: object, at: tuple = ()) -> tuple[str, ...]:
    if groups is None:
        return ()
    if not isinstance(groups, list) or not all(isinstance(g, str) and _NAME.match(g) for g in groups):
        raise ConfigError(path, f"{where}: 'groups' must be a list of names ({_NAME.pattern})", at=at)
    return tuple(groups)


def read_identities_file(rules_dir: Path) -> RulesFile:
    """identities.yaml as read (a missing file reads as empty); every section's loader takes it."""
    return RulesFile.read(rules_dir / IDENTITIES_FILE, _TOP_LEVEL_KEYS, missing_ok=True)


def load_service_tokens(rules_dir: Path) -> ServiceTokens:
    """Read identities.yaml; a missing file means no identities yet."""
    return service_tokens_from(read_identities_file(rules_dir))


def service_tokens_from(file: RulesFile) -> ServiceTokens:
    """The service tokens of an identities.yaml read with read_identities_file."""
    with file.locating():
        return _service_tokens(file)


def _service_tokens(file: RulesFile) -> ServiceTokens:
    path = file.path
    by_hash: dict[str, Identity] = {}
    names: set[str] = set()
    for i, entry in enumerate(file.list_of_mappings("service_tokens")):
        where, at = f"service_tokens[{i}]", ("service_tokens", i)
        check_keys(path, where, entry, _ENTRY_KEYS, at=at)
        name, digest = entry.get("name"), entry.get("token_sha256")
        if not isinstance(name, str) or not _NAME.match(name):
            raise ConfigError(path, f"{where}: 'name' must match {_NAME.pattern}", at=at + ("name",))
        if name in names:
            raise ConfigError(path, f"{where}: duplicate name {name!r}", at=at + ("name",))
        if not isinstance(digest, str) or not _HASH.match(digest):
            raise ConfigError(path, f"{where}: 'token_sha256' must be 'sha256:' and 64 hex digits (never the token itself)", at=at + ("token_sha256",))
        if digest in by_hash:
            raise ConfigError(path, f"{where}: the same token hash is already listed for {by_hash[digest].name!r}", at=at + ("token_sha256",))
        names.add(name)
        groups = _validate_groups(path, where, entry.get("groups"), at + ("groups",))
        by_hash[digest] = Identity(name=name, groups=groups, extra={"token_id": token_id(digest)})
    return ServiceTokens(by_hash)


def add_service_token(rules_dir: Path, name: str, groups: list[str]) -> str:
    """Mint a token for NAME, store its hash in identities.yaml and return the token (shown once, never stored)."""
    path = rules_dir / IDENTITIES_FILE
    if not _NAME.match(name):
        raise ConfigError(path, f"name {name!r} must match {_NAME.pattern}")
    _validate_groups(path, "groups", list(groups))
    file = read_identities_file(rules_dir)
    existing = service_tokens_from(file)  # validates the file before we touch it
    if any(identity.name == name for identity in existing.by_hash.values()):
        raise ConfigError(path, f"an identity named {name!r} already exists")
    data = file.data
    token = mint_token()
    entries = list(data.get("service_tokens") or [])
    entries.append({"name": name, "groups": list(groups), "token_sha256": token_hash(token)})
    data["service_tokens"] = entries
    _atomic_write(path, _with_service_tokens(path, data))
    return token


def _with_service_tokens(path: Path, data: dict) -> str:
    """The file's text with only its service_tokens replaced, so the comments and the hand-written
    issuers and grants around them survive; a plain re-dump where the text cannot be spliced safely."""
    block = yaml.safe_dump({"service_tokens": data["service_tokens"]}, sort_keys=False, default_flow_style=False)
    text = path.read_text(encoding="utf-8") if path.exists() else _leading_comments(path)
    root = yaml.compose(text)  # the file was validated before: it parses
    entry = next(((k, v) for k, v in root.value if k.value == "service_tokens"), None) if root else None
    if entry is None:  # no file, only comments, or other sections only: the tokens go at the end
        spliced = text + ("\n" if text and not text.endswith("\n") else "") + block
    else:
        start, end = entry[0].start_mark.index, _node_end(entry[1])
        spliced = text[:start] + block.rstrip("\n") + text[end:]
    if yaml.safe_load(spliced) == data:
        return spliced
    return _leading_comments(path) + yaml.safe_dump(data, sort_keys=False, default_flow_style=False)


def _node_end(node: yaml.Node) -> int:
    # A block collection "ends" at the next token, past any comments after it; its last scalar does not.
    if isinstance(node, yaml.ScalarNode) or node.flow_style or not node.value:
        return node.end_mark.index
    last = node.value[-1]
    return _node_end(last[1] if isinstance(node, yaml.MappingNode) else last)


def _leading_comments(path: Path) -> str:
    if not path.exists():
        return "# Caller identities. Service tokens are stored only as SHA-256 hashes; mint one with\n# `auditgate token new NAME --group G`.\n"
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
        if not line.startswith("#"):
            break
        lines.append(line)
    return "".join(lines)


def _atomic_write(path: Path, text: str) -> None:
    # 0600 whatever the umask or the file's mode before (its directory 0700 if made here): the token hashes
    # are what a caller's token is checked against.
    private_dir(path.parent)
    write_private_atomically(path, text)
