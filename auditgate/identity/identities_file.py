"""identities.yaml, read once for every addon that needs it and re-read once when it changes.

Caller authentication, group authorization and the approvers' page all read the same snapshot, so
the tokens, issuers and grants in force can never disagree between them, even for a moment.

    identities = identities_file(rules_dir)   # the one reader of that file in this process
    snapshot = identities.current()           # re-reads the file if it changed (checked once a second)
    snapshot = await identities.refreshed()   # the same, with the file read and parsed off the event loop
    snapshot.authenticator, snapshot.authorization
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path

from auditgate.core.config import ConfigError
from auditgate.core.file_watch import ChangedFile
from auditgate.identity.authenticator import CallerAuthenticator
from auditgate.identity.grants import Authorization, authorization_from
from auditgate.identity.service_tokens import IDENTITIES_FILE, read_identities_file

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class IdentitiesSnapshot:
    authenticator: CallerAuthenticator
    authorization: Authorization | None  # None: no 'authorization' section, every caller may use every upstream
    generation: int  # grows with every successful reload

    def describe(self) -> str:
        issuers = ", ".join(self.authenticator.issuers) or "none"
        grants = "no authorization section" if self.authorization is None else (
            f"{len(self.authorization.grants)} grant(s)")
        return f"{len(self.authenticator.service_tokens)} service token(s); OIDC issuers: {issuers}; {grants}"


class IdentitiesFile:
    """One identities.yaml: the snapshot in force, replaced when the file changes and the new one is valid."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = directory / IDENTITIES_FILE
        self._watch = ChangedFile(self.path)
        self._rebuilding = asyncio.Lock()
        self._snapshot = self._read(None, 1)  # ConfigError: the start (or option change) fails

    def _read(self, previous: IdentitiesSnapshot | None, generation: int) -> IdentitiesSnapshot:
        file = read_identities_file(self.directory)
        # An issuer whose settings did not change keeps its cached keys across a reload.
        authenticator = CallerAuthenticator.from_file(file, previous.authenticator if previous else None)
        return IdentitiesSnapshot(authenticator, authorization_from(file), generation)

    def current(self) -> IdentitiesSnapshot:
        """The snapshot in force; an edited file is read at most once a second, for every reader at once."""
        if self._watch.changed():
            self.reload()
        return self._snapshot

    async def refreshed(self) -> IdentitiesSnapshot:
        """current(), with an edited file read and parsed in a thread: the proxy's event loop, which carries
        every flow, does not wait on the disk or the YAML parser. The request that noticed the change
        waits for the new snapshot; flows meanwhile use the one in force. One rebuild at a time."""
        if not self._watch.changed():
            return self._snapshot
        async with self._rebuilding:
            previous = self._snapshot
            try:
                snapshot = await asyncio.to_thread(self._read, previous, previous.generation + 1)
            except ConfigError as e:
                logger.error("keeping the identities in force: %s", e)
                return self._snapshot
            if self._snapshot is previous:  # nothing newer was swapped in meanwhile (a strict reload)
                self._adopt(snapshot)
            return self._snapshot

    def reload_if_changed_strictly(self) -> None:
        """Re-read the file now if it changed; an invalid file raises ConfigError (a start, not a reload)."""
        if self._watch.changed(now=True):
            self._snapshot = self._read(self._snapshot, self._snapshot.generation + 1)

    def reload(self) -> IdentitiesSnapshot:
        """Read the file now; an invalid file keeps the snapshot in force (and says why)."""
        try:
            snapshot = self._read(self._snapshot, self._snapshot.generation + 1)
        except ConfigError as e:
            logger.error("keeping the identities in force: %s", e)
            return self._snapshot
        self._adopt(snapshot)
        return snapshot

    def _adopt(self, snapshot: IdentitiesSnapshot) -> None:
        self._snapshot = snapshot
        snapshot.authenticator.prefetch_if_running()
        logger.info("identities reloaded: %s", snapshot.describe())


_open: dict[Path, IdentitiesFile] = {}


def identities_file(directory: Path) -> IdentitiesFile:
    """The one reader of <directory>/identities.yaml in this process; ConfigError if the file is invalid.

    Asking again (another addon configuring, or a restart of the options) re-checks the file at once
    rather than within the second, so a file edited just before is never missed.
    """
    key = directory.expanduser().absolute()
    existing = _open.get(key)
    if existing is None:
        existing = _open[key] = IdentitiesFile(key)
    else:
        existing.reload_if_changed_strictly()
    return existing
