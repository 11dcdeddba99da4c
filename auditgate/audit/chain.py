"""The audit log's hash chain: canonical JSON, entry hashes, Ed25519 checkpoints and the append-only writer.

Plain Python plus `cryptography` and `rfc8785`; no mitmproxy. docs/auditors.md defines the format this
module writes, so that an auditor can re-implement the verifier (auditgate/audit/verify.py) from it.

Format versions: an entry with `"v": 2` or `3` is hashed over its RFC 8785 (JCS) canonical JSON, so a standard JCS
implementation recomputes its hash; an entry without `v` is version 1, hashed over the gateway's own
canonical JSON (ASCII escapes), and still verifies.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import rfc8785
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from auditgate.core.private_files import (
    open_private_fd,
    private_dir,
    write_private_atomically,
)

try:  # the gateway's dependency, for speed; the verifier needs only cryptography and rfc8785 (see sorted_json)
    import orjson
except ImportError:  # tests/test_audit_chain.py takes this way by setting chain.orjson to None
    orjson = None

AUDIT_SUBDIR = "audit"
PUBLIC_KEY_FILE = "public-key.pem"
GENESIS_HASH = "0" * 64
FILE_PATTERN = re.compile(r"^audit-(\d{12})-(\d{8}T\d{6}Z)\.jsonl$")
CHECKPOINT_CONTEXT = "auditgate-audit-checkpoint:v1"
MAX_ENTRY_DEPTH = 64  # the gateway's entries nest a few levels (json_safe stops at 16); deeper is not an entry
ROTATION_CONTEXT = "auditgate-audit-key-rotation:v1"
FORMAT_VERSION = 3  # every entry written now says "v": 3 (2: JCS hashing, instance, intents, whole-flow digests in
# the flow entry; 3: the whole-flow digest in a "record" entry of its own, written as the record is taken)
JSON_SAFE_INT = 2**53 - 1  # RFC 8785: integers beyond IEEE 754's exact range are not JSON numbers

# Keys that name a credential are never copied into an entry, whatever addon put them in flow metadata.
_CREDENTIAL_KEY = re.compile(
    r"(^|[_-])(token|secret|password|passwd|authorization|api[_-]?key|apikey|jwt|credentials?|cookie|bearer)$"
)


class CanonicalJsonError(ValueError):
    pass


# ---- canonical JSON ------------------------------------------------------------------------------


def canonical_json(value) -> bytes:
    """Version 1's canonical JSON (entries without "v"): sorted keys, no whitespace, ASCII only, integers only.

    json.dumps(sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False): objects'
    members sorted by key (code point order), strings with `"`, `\\`, \\b \\f \\n \\r \\t escaped as such,
    other characters below U+0020 and every character above U+007E as lowercase \\uXXXX (surrogate
    pairs above U+FFFF). Floats are refused, so every number is an integer written in plain decimal.
    """
    _check_no_floats(value)
    return _dumps(value)


def _dumps(value) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode("ascii")


# RFC 8785 and Python's json agree byte for byte on what the gateway writes (strings escaped alike: `"`,
# `\\`, \\b \\f \\n \\r \\t and \\u00XX below U+0020, everything else as UTF-8; integers in decimal) except
# in three places: floats (never in an entry), integers beyond 2**53 (RFC 8785 refuses them) and the
# order of keys holding characters above U+FFFF (UTF-16 code units against code points). The C encoder
# does the common case in a tenth of the time rfc8785 takes; these two patterns send the rest to rfc8785.
# No circular-reference bookkeeping (half of the encoder's time on an entry): an entry is a tree (json_safe and
# the parsers make it one); a cycle would end in RecursionError, which jcs() hands to rfc8785 as before.
_JCS_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False,
                                check_circular=False)


def _sorted_text_encoder():
    """The C encoder _JCS_ENCODER.encode() builds afresh on every call (with the same settings), built once:
    called as encode_sorted(value, 0), it returns the text in chunks (one, in CPython 3.13). JSONEncoder.encode
    spends about as long making it, through two Python calls, as encoding a small claim takes."""
    if json.encoder.c_make_encoder is None:  # no C accelerator: the encoder's own (slower) way
        return lambda value, _level: (_JCS_ENCODER.encode(value),)
    enc = _JCS_ENCODER
    return json.encoder.c_make_encoder(None, enc.default, json.encoder.encode_basestring, None, enc.key_separator,
                                       enc.item_separator, enc.sort_keys, enc.skipkeys, enc.allow_nan)


encode_sorted = _sorted_text_encoder()  # raises TypeError, ValueError or RecursionError where encode() does
_ASTRAL = re.compile(rb"[\xf0-\xf4]")  # the lead byte of a 4-byte UTF-8 sequence: a character above U+FFFF
_LONG_NUMBER = re.compile(rb"(?:^|[:,\[])-?\d{16,}(?:[,}\]]|$)")  # an integer that may lie beyond 2**53


def jcs(value, ints_checked: bool = False) -> bytes:
    """RFC 8785 (JSON Canonicalization Scheme) bytes of a float-free value: what a version 2 or 3 entry hashes to.

    The same bytes as `rfc8785.dumps(value)` (tests/test_audit_chain.py checks it on every kind of entry
    and on generated values); rfc8785 itself does what the fast paths cannot vouch for. ints_checked: the
    caller knows every integer lies within 2**53 (json_safe() made the value), so that scan is skipped.
    Raises CanonicalJsonError (a ValueError) for what JCS cannot represent (floats, NaN, lone surrogates,
    huge integers).
    """
    data = sorted_json(value)
    if data is None:
        try:
            data = "".join(encode_sorted(value, 0)).encode("utf-8")
        except (UnicodeEncodeError, TypeError, ValueError, RecursionError):
            data = None
    if (data is None or (not data.isascii() and _ASTRAL.search(data))
            or (not ints_checked and _LONG_NUMBER.search(data))):
        try:
            return rfc8785.dumps(value)
        except rfc8785.CanonicalizationError as e:
            raise CanonicalJsonError(f"not representable in RFC 8785 JSON: {e}") from None
    return data


# orjson writes what the gateway hashes (text, integers, booleans, null, lists, objects with text keys) as
# Python's json writes it with the settings of _JCS_ENCODER (the same escapes, raw UTF-8, members sorted by code
# point), in a tenth of its time; it refuses what it cannot write that way (lone surrogates, integers beyond 64
# bits, keys that are not exact str, nesting deeper than 254), which then goes the slower ways. Floats, which
# it writes otherwise, never reach it: jcs() is for float-free values, and json_safe() and the record digest's
# claims make every float text (as they make enums and other objects text). Dates and dataclasses, which it
# would write, it is told to refuse, as json refuses them.
_ORJSON_OPTIONS = 0 if orjson is None else (
    orjson.OPT_SORT_KEYS | orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_DATACLASS)


def sorted_json(value) -> bytes | None:
    """The UTF-8 JSON of value with members sorted by code point, as _JCS_ENCODER writes it, or None where
    orjson cannot vouch for that (see _ORJSON_OPTIONS) or is not installed. Not yet RFC 8785: see jcs()."""
    if orjson is None:
        return None
    try:
        return orjson.dumps(value, option=_ORJSON_OPTIONS)
    except (orjson.JSONEncodeError, TypeError, ValueError, RecursionError):
        return None


def entry_bytes(body: dict) -> bytes:
    """The bytes an entry (without its "hash") is hashed over: JCS for versions 2 and 3, version 1's own form else."""
    return canonical_json(body) if body.get("v") is None else _jcs_checked(body)


def _jcs_checked(body: dict) -> bytes:
    _check_no_floats(body)
    return jcs(body)


def _check_no_floats(value) -> None:
    if isinstance(value, float):
        raise CanonicalJsonError(f"floats are not allowed in audit entries: {value!r}")
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise CanonicalJsonError(f"object keys must be strings: {k!r}")
            _check_no_floats(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            _check_no_floats(v)


def json_safe(value, depth: int = 0):
    """Metadata from other addons made fit for an entry: no floats, no bytes, no credential-named keys."""
    if depth > 16:
        return "<nested too deep>"
    kind = type(value)
    if kind is str or value is None or kind is bool:  # the common cases first: this runs for every entry
        return value
    if kind is dict:
        return _json_safe_dict(value, depth)
    if kind is int:
        return value if -JSON_SAFE_INT <= value <= JSON_SAFE_INT else str(value)
    if (kind is list or kind is tuple) and depth < 16:  # as for dicts: text, null and booleans without a call
        return [v if (type(v) is str or v is None or type(v) is bool) else json_safe(v, depth + 1) for v in value]
    if isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return value if -JSON_SAFE_INT <= value <= JSON_SAFE_INT else str(value)  # beyond JSON's exact integers
    if isinstance(value, float):
        # Integers only in canonical JSON: a fractional value is kept as its shortest decimal string.
        return int(value) if value.is_integer() and math.isfinite(value) else repr(value)
    if isinstance(value, dict):
        return {str(k): json_safe(v, depth + 1) for k, v in value.items() if not _names_credential(k)}
    if isinstance(value, (list, tuple, set, frozenset)):
        items = sorted(value, key=repr) if isinstance(value, (set, frozenset)) else value
        return [json_safe(v, depth + 1) for v in items]
    if isinstance(value, (bytes, bytearray)):
        return f"<{len(value)} bytes>"  # never the bytes themselves: they could be anything
    return f"<{type(value).__name__}>"


def _json_safe_dict(value: dict, depth: int) -> dict:
    """json_safe() of a dict: {str(k): json_safe(v)} without credential-named keys; text, null and booleans
    taken as they are without a call (json_safe returns them unchanged at this depth), text keys' verdicts
    looked up without one."""
    safe = {}
    inner = depth + 1
    shallow = inner <= 16  # deeper, json_safe() makes even text "<nested too deep>"
    for k, v in value.items():
        if type(k) is str:
            credential = _credential_names.get(k)
            if credential is None:
                credential = _names_credential(k)
        else:
            credential = _names_credential(k)
            k = str(k)
        if credential:
            continue
        kind = type(v)
        safe[k] = v if shallow and (kind is str or v is None or kind is bool) else json_safe(v, inner)
    return safe


_credential_names: dict[str, bool] = {}  # the same few metadata keys come by on every flow


def _names_credential(key) -> bool:
    name = str(key)
    known = _credential_names.get(name)
    if known is None:
        known = bool(_CREDENTIAL_KEY.search(name.lower()))
        if len(_credential_names) < 4096:
            _credential_names[name] = known
    return known


def parse_entry_line(line: bytes) -> dict:
    """One JSON Lines entry, strictly: an object, no duplicate keys, no floats, no NaN."""

    def no_duplicates(pairs):
        obj = {}
        for k, v in pairs:
            if k in obj:
                raise CanonicalJsonError(f"duplicate key {k!r}")
            obj[k] = v
        return obj

    def no_float(text):
        raise CanonicalJsonError(f"floats are not allowed: {text}")

    def no_constant(text):
        raise CanonicalJsonError(f"{text} is not allowed")

    try:
        value = json.loads(
            line.decode("utf-8"), object_pairs_hook=no_duplicates, parse_float=no_float, parse_constant=no_constant
        )
    except RecursionError:
        raise CanonicalJsonError(f"nested deeper than {MAX_ENTRY_DEPTH} levels") from None
    if not isinstance(value, dict):
        raise CanonicalJsonError("an entry must be a JSON object")
    if _nesting(value) > MAX_ENTRY_DEPTH:
        raise CanonicalJsonError(f"nested deeper than {MAX_ENTRY_DEPTH} levels")
    return value


def _nesting(value) -> int:
    """How deeply objects and arrays nest in value (iteratively: a hostile line cannot exhaust the stack)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, depth)
            if depth <= MAX_ENTRY_DEPTH:
                stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


def entry_hash(entry: dict) -> str:
    """SHA-256 (hex) of the canonical JSON of the entry without its own "hash" member.

    Versions 2 and 3 ("v"): RFC 8785 (JCS). Version 1 (no "v"): canonical_json()."""
    body = {k: v for k, v in entry.items() if k != "hash"}
    return hashlib.sha256(entry_bytes(body)).hexdigest()


def seal(body: dict, checked: bool = True) -> tuple[dict, bytes]:
    """The entry with its hash, and the line written for it: the hashed bytes with "hash" appended last.

    checked=False skips the float check for bodies built from json_safe() values (the writer's own).
    """
    digest, line = _sealed_line(body, checked)
    return dict(body, hash=digest), line


def _sealed_line(body: dict, checked: bool) -> tuple[str, bytes]:
    """The body's hash and its line (see seal), leaving the body as it is."""
    if body.get("v") is None:
        data = canonical_json(body) if checked else _dumps(body)
    else:
        data = _jcs_checked(body) if checked else jcs(body, ints_checked=True)
    digest = hashlib.sha256(data).hexdigest()
    return digest, b"".join((memoryview(data)[:-1], b',"hash":"', digest.encode("ascii"), b'"}\n'))


def sha256_hex(data: bytes | None, known: tuple | None = None) -> str | None:
    """SHA-256 (hex) of data; known: (some bytes, their digest), taken where data is those very bytes (a request
    body its intent entry hashed is not hashed again)."""
    if known is not None and known[0] is data:
        return known[1]
    return None if data is None else hashlib.sha256(data).hexdigest()


def utc_timestamp(epoch: float | None = None) -> str:
    """strftime("%Y-%m-%dT%H:%M:%S.%fZ") of datetime.fromtimestamp(epoch, timezone.utc), in a fraction of its time:
    the text up to the second is kept from the call before (entries come many a second), the microseconds
    rounded as fromtimestamp rounds them (half to even; C's modf, then round, as CPython's _PyTime does)."""
    global _last_second
    if epoch is None:
        epoch = time.time()
    fraction, whole = math.modf(epoch)
    micros = round(fraction * 1e6)
    if micros >= 1_000_000:
        micros -= 1_000_000
        whole += 1.0
    elif micros < 0 or not math.isfinite(epoch):  # before 1970 (or not a time at all): the plain way
        return _utc_timestamp_text(epoch)
    second = int(whole)
    last = _last_second
    if last[0] != second:
        last = _last_second = (second, _utc_timestamp_text(second)[:-7])  # "...:SS." of that second; one tuple,
        # replaced whole: a call from another thread sees an old or a new pair, never half of each
    return f"{last[1]}{micros:06d}Z"


_last_second: tuple[int | None, str] = (None, "")


def _utc_timestamp_text(epoch: float) -> str:
    moment = datetime.fromtimestamp(epoch, timezone.utc)
    return (f"{moment.year:04d}-{moment.month:02d}-{moment.day:02d}T{moment.hour:02d}:{moment.minute:02d}:"
            f"{moment.second:02d}.{moment.microsecond:06d}Z")


# ---- keys and signatures -------------------------------------------------------------------------


def raw_public_key(public_key: Ed25519PublicKey) -> bytes:
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(public_key: Ed25519PublicKey) -> str:
    """SHA-256 (hex) of the raw 32-byte Ed25519 public key."""
    return hashlib.sha256(raw_public_key(public_key)).hexdigest()


def public_key_record(public_key: Ed25519PublicKey) -> dict:
    return {"algorithm": "ed25519", "key_id": key_id(public_key),
            "public_key": base64.b64encode(raw_public_key(public_key)).decode("ascii")}


def public_key_from_record(record: dict) -> Ed25519PublicKey:
    if record.get("algorithm") != "ed25519":
        raise ValueError(f"unsupported key algorithm {record.get('algorithm')!r}")
    key = Ed25519PublicKey.from_public_bytes(base64.b64decode(record["public_key"], validate=True))
    if key_id(key) != record.get("key_id"):
        raise ValueError("key_id does not match the public key")
    return key


def checkpoint_message(signed_seq: int, signed_hash: str) -> bytes:
    return f"{CHECKPOINT_CONTEXT}:{signed_seq}:{signed_hash}".encode("ascii")


def rotation_message(old_key_id: str, new_key_id: str) -> bytes:
    return f"{ROTATION_CONTEXT}:{old_key_id}:{new_key_id}".encode("ascii")


def verify_signature(public_key: Ed25519PublicKey, signature_b64: str, message: bytes) -> bool:
    from cryptography.exceptions import InvalidSignature

    try:
        public_key.verify(base64.b64decode(signature_b64, validate=True), message)
        return True
    except (InvalidSignature, ValueError, TypeError):
        return False


def sign_b64(private_key: Ed25519PrivateKey, message: bytes) -> str:
    return base64.b64encode(private_key.sign(message)).decode("ascii")


def private_key_pem(private_key: Ed25519PrivateKey) -> bytes:
    return private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def public_key_pem(public_key: Ed25519PublicKey) -> bytes:
    return public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def load_public_key_pem(path: Path) -> Ed25519PublicKey:
    key = serialization.load_pem_public_key(Path(path).read_bytes())
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"{path} is not an Ed25519 public key")
    return key


def create_private_key_file(path: Path) -> Ed25519PrivateKey:
    """A fresh Ed25519 key in PKCS#8 PEM, mode 0600 (its directory 0700 if made here); never replaces an
    existing file (FileExistsError)."""
    private_dir(path.parent)
    key = Ed25519PrivateKey.generate()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = open_private_fd(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(private_key_pem(key))
            f.flush()
            os.fsync(f.fileno())
        os.link(tmp, path)  # atomic and exclusive: two gateways starting at once keep one key
    finally:
        tmp.unlink(missing_ok=True)
    return key


def load_private_key_file(path: Path) -> Ed25519PrivateKey:
    key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path} is not an Ed25519 private key")
    return key


def load_or_create_private_key(path: Path) -> tuple[Ed25519PrivateKey, bool]:
    """(key, created)."""
    try:
        return load_private_key_file(path), False
    except FileNotFoundError:
        pass
    try:
        return create_private_key_file(path), True
    except FileExistsError:
        return load_private_key_file(path), False


def write_atomically(path: Path, data: bytes) -> None:
    """Replace path with data in one step, the file 0600 (the public key too: it goes to auditors as a copy)."""
    write_private_atomically(path, data)


# ---- reading an existing log ---------------------------------------------------------------------


def audit_files(audit_dir: Path) -> list[Path]:
    """The log's files in chain order (their names start with the first entry's zero-padded seq)."""
    if not audit_dir.is_dir():
        return []
    return sorted(p for p in audit_dir.iterdir() if FILE_PATTERN.match(p.name))


def audit_file_name(first_seq: int, epoch: float) -> str:
    return f"audit-{first_seq:012d}-{datetime.fromtimestamp(epoch, timezone.utc):%Y%m%dT%H%M%SZ}.jsonl"


@dataclass
class Tail:
    """Where an existing log ends: what a (re)starting writer continues from."""

    seq: int = 0
    hash: str = GENESIS_HASH
    last: dict | None = None
    file: str | None = None
    partial_bytes: int = 0
    partial_sha256: str | None = None
    valid_size: int = 0

    @property
    def clean(self) -> bool:
        """The previous writer shut down cleanly: its last entry is the shutdown checkpoint."""
        if self.partial_bytes:
            return False
        return self.last is None or (self.last.get("kind") == "checkpoint" and self.last.get("reason") == "shutdown")

    def recovery_note(self) -> dict:
        return {"file": self.file, "last_seq": self.seq, "last_hash": self.hash, "valid_size": self.valid_size,
                "partial_bytes": self.partial_bytes, "partial_sha256": self.partial_sha256}


class BrokenLogError(Exception):
    pass


def read_tail(audit_dir: Path) -> Tail:
    """The last complete entry of the log, and any partial line after it (a crash cut) in the newest file."""
    cut: tuple[str, int, bytes] | None = None  # (file, valid size, partial bytes) of the newest non-empty file
    for path in reversed(audit_files(audit_dir)):
        data = path.read_bytes()
        if not data:
            continue
        end = data.rfind(b"\n") + 1  # bytes after the last newline are a partial line
        if cut is None:
            cut = (path.name, end, data[end:])
        if end == 0:
            continue  # nothing but a partial first line: the chain ends in the file before
        start = data.rfind(b"\n", 0, end - 1) + 1
        try:
            entry = parse_entry_line(data[start:end])
            if entry.get("hash") != entry_hash(entry) or not isinstance(entry.get("seq"), int):
                raise BrokenLogError("its hash does not match its content")
        except (ValueError, BrokenLogError) as e:
            raise BrokenLogError(f"the last entry of {path} is not intact ({e}); run `auditgate verify`") from None
        name, valid, partial = cut
        return Tail(seq=entry["seq"], hash=entry["hash"], last=entry, file=name, valid_size=valid,
                    partial_bytes=len(partial), partial_sha256=sha256_hex(partial) if partial else None)
    if cut is not None:
        name, valid, partial = cut
        return Tail(file=name, partial_bytes=len(partial), partial_sha256=sha256_hex(partial))
    return Tail()


# ---- the writer ----------------------------------------------------------------------------------


class AuditWriteError(OSError):
    """The log could not be written (disk full, unwritable, closed): the gateway must fail closed."""


@dataclass
class WriterSettings:
    checkpoint_entries: int = 100
    checkpoint_seconds: float = 10.0
    max_bytes: int = 64 * 1024 * 1024
    fsync: str = "checkpoint"  # "entry", "checkpoint" or "never"


@dataclass
class AuditWriter:
    """Appends sealed entries to <audit>/audit-*.jsonl, chaining each to the one before and signing the head.

    Single-threaded by design (the mitmproxy event loop). It never fsyncs on its own except when closing;
    `sync_wanted` tells the caller a checkpoint asks for one (the gateway does it in a thread).
    """

    directory: Path
    signing_key: Ed25519PrivateKey
    settings: WriterSettings = field(default_factory=WriterSettings)
    clock: callable = time.time
    instance: str = ""  # the gateway_instance that writes: in every entry, so merged logs tell their writers apart
    # The seq of the first flow entry whose flow record may still be on its way to its file (written after the
    # entry, by another process), or None: each checkpoint says it (records_pending_from), so that a crash right
    # after a checkpoint, which loses those records, is not taken for their removal (see verify).
    pending_records_from: Callable[[], int | None] | None = None

    def __post_init__(self) -> None:
        private_dir(self.directory)
        self.tail = read_tail(self.directory)
        self.seq, self.head = self.tail.seq, self.tail.hash
        self.key_id = key_id(self.signing_key.public_key())
        self.sync_wanted = False
        self._fd: int | None = None
        self._path: Path | None = None
        self._size = 0
        self._day_end = 0.0
        self._since_checkpoint = 0
        self._last_checkpoint = self.clock()
        self._needs_new_file = True  # every run starts a file of its own
        self._rotating_to: Ed25519PrivateKey | None = None  # a key rotation whose checkpoint is not written yet
        self._retired_fds: list[int] = []  # files rotated away from, not yet synced and closed
        # A run that follows a crash says so in its first entry, naming where the previous run stopped.
        self._recovery: dict | None = None if self.tail.clean else self.tail.recovery_note()

    @property
    def path(self) -> Path | None:
        return self._path

    @property
    def unsigned(self) -> int:
        return self._since_checkpoint

    def checkpoint_due(self) -> bool:
        return self._since_checkpoint > 0 and self.clock() - self._last_checkpoint >= self.settings.checkpoint_seconds

    # -- appending
    def append(self, kind: str, fields: dict, sanitized: bool = False) -> dict:
        """Seal and write one entry, then a checkpoint once N entries are unsigned. Raises AuditWriteError.

        Fields go through json_safe() (no floats, no credential-named keys) unless the caller already did.
        """
        self._finish_key_rotation()
        entry = self._write(kind, fields if sanitized else json_safe(fields), may_rotate=True)
        self._since_checkpoint += 1
        if self._since_checkpoint >= self.settings.checkpoint_entries:
            self.checkpoint("entries")
        return entry

    def checkpoint(self, reason: str, key: Ed25519PrivateKey | None = None) -> dict:
        """Sign the chain head (the last entry's seq and hash) and append the signature as an entry."""
        self._finish_key_rotation()
        return self._checkpoint(reason, key)

    def _checkpoint(self, reason: str, key: Ed25519PrivateKey | None = None) -> dict:
        key = key or self.signing_key
        fields = {
            "reason": reason,
            "signed_seq": self.seq,
            "signed_hash": self.head,
            "key_id": key_id(key.public_key()),
            "signature": sign_b64(key, checkpoint_message(self.seq, self.head)),
        }
        pending = self.pending_records_from() if self.pending_records_from is not None else None
        if type(pending) is int and 0 < pending <= self.seq:
            fields["records_pending_from"] = pending
        entry = self._write("checkpoint", fields, may_rotate=False)
        self._since_checkpoint = 0
        self._last_checkpoint = self.clock()
        self.sync_wanted = self.settings.fsync != "never"
        return entry

    def rotate_key(self, new_key: Ed25519PrivateKey) -> dict:
        """A key_rotation entry, vouched for by a checkpoint signed with the old key; the new key signs after."""
        self._finish_key_rotation()
        old_id, new_public = self.key_id, new_key.public_key()
        new_id = key_id(new_public)
        # Not append(): its own N-entries checkpoint could come between, and the old key signs only the next entry.
        entry = self._write("key_rotation", {
            "old_key_id": old_id,
            "new_key": public_key_record(new_public),
            "new_key_proof": sign_b64(new_key, rotation_message(old_id, new_id)),
        }, may_rotate=True)
        self._since_checkpoint += 1
        self._rotating_to = new_key
        self._finish_key_rotation()
        return entry

    def _finish_key_rotation(self) -> None:
        """The rotation entry's checkpoint, signed by the old key, then the new key; if a write failed in
        between, the next write finishes it first (the verifier accepts the old key only right there)."""
        if self._rotating_to is None:
            return
        self._checkpoint("key_rotation")
        new_key, self._rotating_to = self._rotating_to, None
        self.signing_key, self.key_id = new_key, key_id(new_key.public_key())

    def _write(self, kind: str, fields: dict, may_rotate: bool) -> dict:
        now = self.clock()
        if self._fd is None or self._needs_new_file or (may_rotate and self._rotation_due(now)):
            self._open_next(now)
        body = {"v": FORMAT_VERSION, "seq": self.seq + 1, "time": utc_timestamp(now), "kind": kind, "prev": self.head,
                "instance": self.instance, **fields}
        if self._recovery is not None:
            body["recovered"] = self._recovery
        digest, line = _sealed_line(body, checked=False)  # every value came through json_safe() or is our own
        self._write_line(line)
        self._recovery = None
        self.seq, self.head = body["seq"], digest
        body["hash"] = digest  # the body is this call's own: it becomes the entry (what seal() returns)
        return body

    def _write_line(self, line: bytes) -> None:
        if self._fd is None:
            raise AuditWriteError("the audit log is closed")
        good, written = self._size, 0
        try:
            while written < len(line):
                written += os.write(self._fd, line[written:])
        except OSError as e:
            # Take a partly written line back off, so that the file still ends on a whole entry.
            if written:
                try:
                    os.ftruncate(self._fd, good)
                except OSError:
                    self._needs_new_file = True
                    self._recovery = {"file": self._path.name, "last_seq": self.seq, "last_hash": self.head,
                                      "valid_size": good, "partial_bytes": written, "partial_sha256": None}
            raise AuditWriteError(e.errno, f"could not write the audit log {self._path}: {e.strerror or e}") from e
        self._size += written

    def _rotation_due(self, now: float) -> bool:
        return now >= self._day_end or self._size >= self.settings.max_bytes

    def _open_next(self, now: float) -> None:
        if self._fd is not None:
            if not self._needs_new_file and self._since_checkpoint:
                self._checkpoint("rotation")  # every file but the live one ends with a signed checkpoint
            # Synced and closed by whoever syncs (the gateway: in a thread, failing closed on an error).
            self._retired_fds.append(self._fd)
            self._fd = None
            self.sync_wanted = self.settings.fsync != "never" or self.sync_wanted
        path = self.directory / audit_file_name(self.seq + 1, now)
        try:
            fd = open_private_fd(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)  # 0600 whatever the umask
        except OSError as e:
            raise AuditWriteError(e.errno, f"could not open the audit log {path}: {e.strerror or e}") from e
        try:
            size = os.fstat(fd).st_size
        except OSError as e:
            os.close(fd)
            raise AuditWriteError(e.errno, f"could not open the audit log {path}: {e.strerror or e}") from e
        self._fd, self._path, self._size = fd, path, size
        self._day_end = (int(now) // 86400 + 1) * 86400  # the next UTC midnight: a new file each day
        self._needs_new_file = False

    # -- durability
    def dup_for_sync(self) -> int | None:
        """A descriptor a thread may fsync and close while this one keeps writing (or rotates).

        Raises AuditWriteError when no descriptor can be had (the process is out of them)."""
        self.sync_wanted = False
        if self._fd is None:
            return None
        try:
            return os.dup(self._fd)
        except OSError as e:
            raise AuditWriteError(e.errno, f"could not sync the audit log {self._path}: {e.strerror or e}") from e

    def take_retired(self) -> list[int]:
        """Descriptors of files rotated away from: the caller fsyncs (unless fsync=never) and closes them."""
        retired, self._retired_fds = self._retired_fds, []
        return retired

    def close(self) -> None:
        """Sign what is unsigned, sync and close. The gateway appends gateway_stop first, so a clean
        shutdown always ends on a checkpoint with reason "shutdown". Raises AuditWriteError when the last
        entries may not be on disk (a failed fsync), after closing everything."""
        errors: list[OSError] = []
        try:
            if self._fd is not None:
                self.checkpoint("shutdown")  # a run that ends on this was not cut short
        finally:
            for fd in [*self.take_retired(), *([self._fd] if self._fd is not None else [])]:
                error = sync_and_close(fd, self.settings.fsync != "never")
                if error is not None:
                    errors.append(error)
            self._fd = None
        if errors:
            e = errors[0]
            raise AuditWriteError(e.errno, f"could not sync the audit log in {self.directory}: {e.strerror or e}")


def sync_and_close(fd: int, sync: bool = True) -> OSError | None:
    """fsync (if asked) and close a descriptor; the fsync's error, if any (the descriptor is closed either way)."""
    error = None
    if sync:
        try:
            os.fsync(fd)
        except OSError as e:
            error = e
    try:
        os.close(fd)
    except OSError as e:
        error = error or e
    return error
