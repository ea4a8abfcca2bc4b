"""A results folder that several sweeps can fill at once: each cell is claimed before it is computed, and a finished
result is never replaced by a failure.

Why claims and not one lock per folder: two sweeps on one folder (two GPU nodes sharing a file system, or a second
sweep started by mistake) should share the work, not wait for each other. A claim is an exclusive ``flock`` on a
hidden file ``.KEY.claim`` beside the cell's result: the kernel drops it when its process ends, however it ends
(killed, out of memory, the node rebooted), so a crashed sweep never leaves a cell held, and the next run computes
it. A sweep that finds a cell claimed skips it: the other sweep writes it.

Why the file is read again once claimed: a sweep decides what to run when it starts, and another sweep may have
finished the cell since. And why a failure never replaces a finished result: a sweep that does not honour claims
(an older kvpolicies, a file system without locks) must still not turn a good result into an out-of-memory error.
"""

from __future__ import annotations

import errno
import fcntl
import os
import sys
from pathlib import Path

from kvpolicies.experiments.grid import Cell
from kvpolicies.experiments.results import ResultRecord, ResultsError, cannot_write, read_record, write_record

UNSUPPORTED = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS}
"""What ``flock`` raises on a file system that has no locks (some network mounts)."""
ATTEMPTS = 20
"""Tries to claim a cell whose claim file keeps changing under us before it counts as held elsewhere."""


class ResultsStore:
    """The result files of one folder, one per cell key (``KEY.json``), and the claims this process holds on them.

    Use it as a context manager: leaving it releases every claim still held.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self._held: dict[str, int] = {}
        """Claims held by this process: cell key -> the open claim file's descriptor."""
        self._warned = False

    def __enter__(self) -> ResultsStore:
        return self

    def __exit__(self, *exc: object) -> None:
        for key in list(self._held):
            self.release(key)

    def path(self, cell: Cell) -> Path:
        return self.folder / f"{cell.key()}.json"

    def finished(self, cell: Cell) -> ResultRecord | None:
        """The cell's ``ok`` record, if its file holds one of this very cell: a file whose record has another key
        (copied or renamed by hand) is not this cell's result, however valid, and the cell is computed again."""
        path = self.path(cell)
        try:
            record = read_record(path)
        except (OSError, ValueError):
            return None
        return record if record.status == "ok" and record.key == path.stem else None

    def claim(self, cell: Cell) -> bool:
        """Claim ``cell`` for this process; False if another process holds it. Claiming a cell this process holds
        already is a no-op (a cell retried on another Ray worker keeps its claim). A claim file that cannot be
        created (a full disk, a folder gone read-only) raises :class:`ResultsError`.

        Why the attempts are bounded: each retry means the file changed under us (its holder released it, or a
        network file system answered with a stale handle); a cell still contested after :data:`ATTEMPTS` tries is
        left to the other sweep, as a held one is."""
        key = cell.key()
        if key in self._held:
            return True
        path = self.folder / f".{key}.claim"
        for _ in range(ATTEMPTS):
            try:
                handle = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
            except OSError as error:
                if error.errno == errno.ESTALE:
                    continue
                raise ResultsError(cannot_write(path, 0, error, "results")) from None
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(handle)
                return False
            except OSError as error:
                if error.errno not in UNSUPPORTED:
                    os.close(handle)
                    if error.errno == errno.ESTALE:
                        continue
                    raise ResultsError(cannot_write(path, 0, error, "results")) from None
                self._warn_unlocked()  # a file system without locks: sweep on, as before claims existed
            except BaseException:
                os.close(handle)
                raise
            if self._same_file(path, handle):
                try:  # who holds it, for a person looking at the folder; a full disk must not stop the claim
                    os.ftruncate(handle, 0)
                    os.write(handle, f"{os.getpid()}\n".encode())
                except OSError:
                    pass
                self._held[key] = handle
                return True
            os.close(handle)
        return False

    @staticmethod
    def _same_file(path: Path, handle: int) -> bool:
        """Whether ``handle`` is still the file at ``path``: the holder before us removes the file as it releases,
        and a lock on a removed file claims nothing."""
        try:
            return os.stat(path).st_ino == os.fstat(handle).st_ino
        except OSError:  # removed meanwhile, or a stale handle on a network file system: try again
            return False

    def _warn_unlocked(self) -> None:
        if not self._warned:
            self._warned = True
            print(f"kvpolicies: warning: {self.folder} does not support file locks (flock): two sweeps on it may "
                  "compute the same cell twice (a failure is still not written over a result finished before it)",
                  file=sys.stderr)

    def release(self, key: str) -> None:
        """Give up the claim on ``key`` (removing its file first, so that no one locks a file about to go)."""
        handle = self._held.pop(key, None)
        if handle is None:
            return
        try:
            (self.folder / f".{key}.claim").unlink(missing_ok=True)
        except OSError:  # a folder gone read-only: a claim file left behind is unlocked, so it holds nothing
            pass
        finally:
            os.close(handle)

    def write(self, cell: Cell, record: ResultRecord) -> ResultRecord:
        """Write ``record`` as the cell's result and release the claim; returns what the file holds now. A failure
        never replaces a finished result of the same cell: the finished one stays and is returned. A write that
        fails raises :class:`~kvpolicies.experiments.results.ResultsError` and keeps the claim, so that no other
        sweep computes the cell again while this one still holds its record."""
        if record.status != "ok" and (kept := self.finished(cell)) is not None:
            self.release(cell.key())
            return kept
        write_record(self.path(cell), record)
        self.release(cell.key())
        return record
