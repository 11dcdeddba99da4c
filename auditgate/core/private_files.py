"""Files 0600 and directories 0700 for everything the gateway writes, whatever the umask.

Records hold prompts and replies, the audit log names callers, key files are secrets: none of it is for
other users of the machine. A mode given to ``open``/``mkdir`` is only what the umask leaves of it, so
each file is created with 0600 and ``fchmod``-ed to exactly that, each directory the gateway creates is
``chmod``-ed to 0700, and what an earlier run (or an older release, under a looser umask) left behind is
tightened with ``tighten`` (group and other bits removed, the owner's kept) and reported to the caller,
who says so in the log.

Standard library only: ``auditgate verify`` and ``auditgate evidence`` run without mitmproxy or PyYAML.
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path
from typing import IO

PRIVATE_FILE = 0o600
PRIVATE_DIRECTORY = 0o700
OTHERS = 0o077  # group and other bits: none may be set on what the gateway writes

_OPEN_FLAGS = {
    "wb": os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
    "ab": os.O_WRONLY | os.O_CREAT | os.O_APPEND,
    "xb": os.O_WRONLY | os.O_CREAT | os.O_EXCL,
    "w": os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
    "a": os.O_WRONLY | os.O_CREAT | os.O_APPEND,
    "x": os.O_WRONLY | os.O_CREAT | os.O_EXCL,
}


def private_dir(path: Path | str) -> Path:
    """Create directory `path` and its missing parents as 0700 (each chmod-ed: mkdir's mode is masked by the
    umask). Directories that exist already are left as they are (``tighten`` them where they are the
    gateway's own); one another process creates meanwhile is left too."""
    path = Path(path)
    missing = []
    directory = path
    while not directory.exists():
        missing.append(directory)
        if directory.parent == directory:
            break
        directory = directory.parent
    for created in reversed(missing):
        try:
            created.mkdir(mode=PRIVATE_DIRECTORY)
        except FileExistsError:
            continue
        os.chmod(created, PRIVATE_DIRECTORY)
    if not path.is_dir():
        raise NotADirectoryError(f"{path} is not a directory")
    return path


def open_private_fd(path: Path | str, flags: int) -> int:
    """``os.open`` with O_CREAT's mode 0600 and the file ``fchmod``-ed to 0600 (an existing file too: the
    caller is about to write into it). O_CLOEXEC is always added."""
    fd = os.open(path, flags | os.O_CLOEXEC, PRIVATE_FILE)
    try:
        if stat.S_IMODE(os.fstat(fd).st_mode) != PRIVATE_FILE:
            os.fchmod(fd, PRIVATE_FILE)
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_private(path: Path | str, mode: str = "wb", **kwargs) -> IO:
    """``open(path, mode)`` for writing ("wb", "ab", "xb", or their text forms), the file 0600 from its first
    byte. Extra keyword arguments go to ``os.fdopen`` (buffering, encoding...)."""
    try:
        flags = _OPEN_FLAGS[mode]
    except KeyError:
        raise ValueError(f"open_private writes only: mode must be one of {sorted(_OPEN_FLAGS)}, not {mode!r}") from None
    fd = open_private_fd(path, flags)
    try:
        return os.fdopen(fd, mode, **kwargs)
    except BaseException:
        os.close(fd)
        raise


def write_private_atomically(path: Path | str, data: bytes | str, *, fsync: bool = True) -> None:
    """Replace `path` with `data` (str as UTF-8) in one step: written to a hidden 0600 file beside it, synced,
    renamed over it. Readers see the old file or the new one; the new one is 0600 whatever the old was."""
    path = Path(path)
    if isinstance(data, str):
        data = data.encode("utf-8")
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")  # O_EXCL, 0600
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), PRIVATE_FILE)  # exactly 0600: mkstemp's mode passed through the umask
            f.write(data)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def copy_private(source: Path | str, target: Path | str) -> None:
    """Copy a file's bytes to a new file `target` (which must not exist), 0600."""
    with open(source, "rb") as src, open_private(target, "xb") as dst:
        while chunk := src.read(1024 * 1024):
            dst.write(chunk)


def copy_private_tree(source: Path | str, target: Path | str) -> Path:
    """A private copy of directory `source` at `target` (which must not exist): directories 0700, files 0600.
    Unlike ``shutil.copytree`` the source's modes are not copied. Symbolic links are followed (package data)."""
    source, target = Path(source), Path(target)
    target.mkdir(mode=PRIVATE_DIRECTORY)  # raises if it exists, as copytree does
    os.chmod(target, PRIVATE_DIRECTORY)
    for entry in sorted(source.iterdir()):
        if entry.name == "__pycache__":
            continue
        if entry.is_dir():
            copy_private_tree(entry, target / entry.name)
        else:
            copy_private(entry, target / entry.name)
    return target


def tighten(path: Path | str, *, shared_ok: bool = False) -> bool:
    """Remove the group and other bits of one file or directory (the owner's bits stay); True if it had any.

    Symbolic links are left alone (chmod would follow them out of the gateway's directories). What is not
    the gateway's to change raises PermissionError instead: something another user owns (root could chmod
    it, and should not) and, unless `shared_ok`, a directory with the sticky bit: a directory named as the
    records or key directory that is shared like /tmp. (`shared_ok` is for directories that are the
    gateway's by their name, such as <records>/flows: a fresh tmpfs mounted there is 1777.)"""
    info = os.lstat(path)
    mode = info.st_mode
    if stat.S_ISLNK(mode) or not mode & OTHERS:
        return False
    if mode & stat.S_ISVTX and not shared_ok:
        raise PermissionError(f"{path} is a shared directory (sticky bit, like /tmp); the gateway needs a "
                              "directory of its own")
    if info.st_uid != os.geteuid():
        raise PermissionError(f"{path} belongs to another user (uid {info.st_uid}) and other users can read it; "
                              "the gateway's files must be its own and private")
    os.chmod(path, stat.S_IMODE(mode) & ~OTHERS)
    return True


def tighten_tree(root: Path | str, *, root_shared_ok: bool = False) -> list[Path]:
    """``tighten`` root and everything below it (not following links); the paths it had to change.

    Below root, sticky directories are the gateway's to tighten; root itself only with `root_shared_ok`.
    Raises OSError (with the path) when one cannot be changed: a file of another user in the gateway's
    directory is for the operator to fix.
    """
    root = Path(root)
    changed = [root] if tighten(root, shared_ok=root_shared_ok) else []
    if not root.is_dir() or root.is_symlink():
        return changed
    for directory, dirs, files in os.walk(root, followlinks=False):
        for name in [*dirs, *files]:
            path = Path(directory, name)
            try:
                if tighten(path, shared_ok=True):
                    changed.append(path)
            except FileNotFoundError:  # removed meanwhile (a rotated temporary file)
                continue
    return changed


def describe_tightened(changed: list[Path], root: Path | str, limit: int = 5) -> str:
    """A log line's worth: how many were made private under root, and the first few of them."""
    names = []
    for path in changed[:limit]:
        try:
            names.append(str(path.relative_to(root)) if path != Path(root) else str(root))
        except ValueError:
            names.append(str(path))
    more = f" and {len(changed) - limit} more" if len(changed) > limit else ""
    return f"{len(changed)} under {root} ({', '.join(names)}{more})"
