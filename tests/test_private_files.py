"""Files 0600 and directories 0700 whatever the umask: the helper (auditgate/core/private_files.py) and each writer
that uses it, run under a umask of 022 (the default that made them 0644/0755 before)."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

import pytest
from mitmproxy import exceptions
from mitmproxy.addons import save, savehar
from mitmproxy.test import taddons, tflow

from addons.audit_log import AuditLog
from addons.flow_recorder import FlowRecorder
from auditgate.audit.chain import AuditWriter, create_private_key_file
from auditgate.audit.evidence import write_evidence_pack
from auditgate.core.private_files import (
    copy_private_tree,
    open_private,
    private_dir,
    tighten,
    tighten_tree,
    write_private_atomically,
)
from auditgate.core.shipped import SHIPPED_RULES, copy_shipped_rules
from auditgate.identity.service_tokens import IDENTITIES_FILE, add_service_token
from auditgate.recording.writer import FlowFileWriter, flow_record


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def modes_below(root: Path) -> dict[str, int]:
    """Every file and directory below root (root too), by path relative to it, with its mode."""
    return {str(p.relative_to(root)) or ".": mode(p) for p in [root, *sorted(root.rglob("*"))]}


def assert_private(root: Path) -> None:
    loose = {name: oct(m) for name, m in modes_below(root).items()
             if m != (0o700 if (root / name).is_dir() else 0o600)}
    assert not loose, f"not 0600/0700 under {root}: {loose}"


@pytest.fixture(autouse=True)
def umask_022():
    """The test process runs under 022 here, whatever it had; the child processes it starts inherit it."""
    before = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(before)


# ---- the helper ----------------------------------------------------------------------------------------------


def test_private_dir_makes_missing_directories_0700_and_leaves_existing_ones(tmp_path):
    existing = tmp_path / "existing"
    existing.mkdir()
    assert mode(existing) == 0o755  # what the umask gives a plain mkdir
    made = private_dir(existing / "a" / "b")
    assert made == existing / "a" / "b"
    assert (mode(existing), mode(existing / "a"), mode(existing / "a" / "b")) == (0o755, 0o700, 0o700)
    assert private_dir(made) == made  # again: nothing to do
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError):
        private_dir(tmp_path / "file")


@pytest.mark.parametrize("open_mode", ["wb", "ab", "xb", "w", "a"])
def test_open_private_creates_0600_files(tmp_path, open_mode):
    path = tmp_path / "f"
    with open_private(path, open_mode) as f:
        f.write(b"data" if "b" in open_mode else "data")
    assert mode(path) == 0o600 and path.read_bytes() == b"data"


def test_open_private_appends_to_an_existing_loose_file_and_makes_it_0600(tmp_path):
    path = tmp_path / "old.mitm"
    path.write_bytes(b"before;")
    assert mode(path) == 0o644
    with open_private(path, "ab") as f:
        assert f.tell() == len(b"before;")  # as open(path, "ab"): positioned at the end
        f.write(b"after")
    assert path.read_bytes() == b"before;after" and mode(path) == 0o600
    with pytest.raises(ValueError):
        open_private(path, "rb")  # only for writing


def test_write_private_atomically_replaces_a_loose_file_with_a_private_one(tmp_path):
    path = tmp_path / "public-key.pem"
    path.write_text("old")
    write_private_atomically(path, "new text")
    assert path.read_text() == "new text" and mode(path) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["public-key.pem"]  # no temporary file left


def test_write_private_atomically_leaves_the_old_file_when_the_write_fails(tmp_path):
    path = tmp_path / "f"
    path.write_text("old")

    class Unwritable:  # bytes() of it fails inside the write
        pass

    with pytest.raises(TypeError):
        write_private_atomically(path, Unwritable())
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]


def test_copy_private_tree_copies_contents_not_modes(tmp_path):
    assert mode(SHIPPED_RULES / "policy.yaml") & 0o044  # the package data is readable by all
    target = copy_private_tree(SHIPPED_RULES, tmp_path / "rules")
    assert_private(target)
    shipped = sorted(p.name for p in SHIPPED_RULES.iterdir() if p.is_file())
    assert sorted(p.name for p in target.iterdir()) == shipped
    assert all((target / name).read_bytes() == (SHIPPED_RULES / name).read_bytes() for name in shipped)
    with pytest.raises(FileExistsError):
        copy_private_tree(SHIPPED_RULES, target)


def test_tighten_tree_removes_group_and_other_bits_keeps_the_owners_and_skips_links(tmp_path):
    root = tmp_path / "records"
    (root / "flows" / "sub").mkdir(parents=True)
    (root / "flows" / "a.mitm").write_bytes(b"a")
    (root / "flows" / "read-only").write_bytes(b"r")
    os.chmod(root / "flows" / "read-only", 0o444)
    os.chmod(root / "flows" / "sub", 0o555)
    outside = tmp_path / "outside.txt"
    outside.write_text("not the gateway's")
    (root / "flows" / "link").symlink_to(outside)
    changed = tighten_tree(root)
    assert sorted(str(p.relative_to(root)) for p in changed) == [".", "flows", "flows/a.mitm", "flows/read-only",
                                                                   "flows/sub"]
    assert (mode(root), mode(root / "flows"), mode(root / "flows" / "a.mitm")) == (0o700, 0o700, 0o600)
    assert mode(root / "flows" / "read-only") == 0o400 and mode(root / "flows" / "sub") == 0o500
    assert mode(outside) == 0o644  # the link was not followed
    assert tighten_tree(root) == []  # nothing left to do
    os.chmod(root / "flows" / "sub", 0o700)


def test_a_shared_directory_is_refused_as_a_root_but_tightened_below_one(tmp_path):
    shared = tmp_path / "shared"  # gateway_records=/tmp would be this: not the gateway's to close
    shared.mkdir()
    os.chmod(shared, 0o1777)
    with pytest.raises(PermissionError, match="sticky"):
        tighten(shared)
    with pytest.raises(PermissionError, match="sticky"):
        tighten_tree(shared)
    assert mode(shared) == 0o1777
    # A fresh tmpfs mounted at <records>/audit is 1777 too: the gateway's by its name.
    records = tmp_path / "records"
    (records / "audit").mkdir(parents=True)
    os.chmod(records / "audit", 0o1777)
    assert tighten_tree(records) == [records, records / "audit"]
    assert mode(records / "audit") == 0o1700
    os.chmod(records / "audit", 0o1777)
    assert tighten_tree(records / "audit", root_shared_ok=True) == [records / "audit"]


# ---- the writers -------------------------------------------------------------------------------------------


def test_the_flow_file_writer_process_writes_0600_files(tmp_path):
    directory = private_dir(tmp_path / "records" / "flows")
    flow = tflow.tflow(resp=True)
    writer = FlowFileWriter()
    writer.start()  # a real child process: it inherits the umask of 022
    try:
        writer.submit([(str(directory / "flows-1.mitm"), flow.id, flow_record(flow))])
        writer.probe(str(directory))
        assert writer.flush(30)
    finally:
        writer.close()
    assert_private(tmp_path / "records")
    assert [p.name for p in directory.iterdir()] == ["flows-1.mitm"]  # the probe's file is gone


def test_the_audit_writer_and_its_key_files_are_private(tmp_path):
    key = create_private_key_file(tmp_path / "certs" / "audit-signing-key.pem")
    writer = AuditWriter(tmp_path / "records" / "audit", key)
    writer.append("flow", {"flow_id": "x"})
    writer.close()
    assert_private(tmp_path / "records")
    assert_private(tmp_path / "certs")


def test_the_evidence_pack_is_private(tmp_path):
    key = create_private_key_file(tmp_path / "certs" / "k.pem")
    writer = AuditWriter(tmp_path / "records" / "audit", key)
    writer.append("flow", {"flow_id": "x"})
    writer.close()
    write_evidence_pack(tmp_path / "records", tmp_path / "out" / "pack")
    assert sorted(p.name for p in (tmp_path / "out" / "pack").iterdir()) == ["evidence.json", "report.html",
                                                                                "report.md"]
    assert_private(tmp_path / "out")


def test_rules_made_from_the_shipped_defaults_and_identities_written_are_private(tmp_path):
    rules = copy_shipped_rules(tmp_path / "rules")
    add_service_token(rules, "alice", ["agents"])
    assert_private(rules)
    # An identities.yaml an older release (or an editor) left 0644 is 0600 once the gateway rewrites it.
    os.chmod(rules / IDENTITIES_FILE, 0o644)
    add_service_token(rules, "bob", ["agents"])
    assert mode(rules / IDENTITIES_FILE) == 0o600
    assert sorted(p.name for p in rules.iterdir()) == sorted(p.name for p in SHIPPED_RULES.iterdir() if p.is_file())


# ---- the addons: what an earlier run left loose is tightened at start, and said ------------------------------


def _loose_earlier_run(tmp_path: Path) -> None:
    """Records, audit log and key directory as a gateway from before this change left them under umask 022."""
    for directory in ("records/flows", "records/audit", "conf"):
        (tmp_path / directory).mkdir(parents=True)
    (tmp_path / "records" / "flows" / "flows-20250101T000000Z-1-0001.mitm").write_bytes(b"")
    key = create_private_key_file(tmp_path / "conf" / "audit-signing-key.pem")
    writer = AuditWriter(tmp_path / "records" / "audit", key)
    writer.append("flow", {"flow_id": "x"})
    writer.close()
    (tmp_path / "conf" / "mitmproxy-ca-cert.pem").write_text("a certificate")
    for path in [tmp_path / "records", *(tmp_path / "records").rglob("*"), tmp_path / "conf",
                 *(tmp_path / "conf").iterdir()]:
        os.chmod(path, 0o755 if path.is_dir() else 0o644)


def test_loose_files_of_an_earlier_run_are_made_private_at_start_and_logged(tmp_path, caplog):
    _loose_earlier_run(tmp_path)
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "upstreams.yaml").write_text("upstreams: []\n")
    recorder, log = FlowRecorder(), AuditLog()
    with caplog.at_level(logging.WARNING, logger="auditgate"), taddons.context(recorder, log) as tctx:
        tctx.configure(recorder, gateway_records=str(tmp_path / "records"), gateway_rules=str(rules))
        tctx.configure(log, gateway_records=str(tmp_path / "records"), gateway_rules=str(rules),
                       confdir=str(tmp_path / "conf"))
        log.done()
        recorder.done()
    assert_private(tmp_path / "records")
    assert_private(tmp_path / "conf")
    said = "\n".join(r.getMessage() for r in caplog.records)
    assert "audit signing key" in said and "was readable by other users: made it 0600" in said
    assert "made records private" in said and "flows-20250101T000000Z-1-0001.mitm" in said
    assert "made audit files private" in said and "made the key directory private" in said


def test_mitmproxys_own_flow_writers_are_refused_while_serving(tmp_path):
    recorder = FlowRecorder()
    with taddons.context(save.Save(), savehar.SaveHar(), recorder) as tctx:
        tctx.configure(recorder, gateway_records=str(tmp_path / "records"), server=False,
                       save_stream_file=str(tmp_path / "copy.mitm"))  # reading files offline (-n): allowed
        with pytest.raises(exceptions.OptionsError, match="refuses save_stream_file="):
            tctx.configure(recorder, server=True)
        tctx.configure(recorder, save_stream_file=None)
        with pytest.raises(exceptions.OptionsError, match="refuses hardump="):
            tctx.configure(recorder, server=True, hardump=str(tmp_path / "copy.har"))
        assert not tctx.options.server and not tctx.options.hardump  # the refused change was rolled back
