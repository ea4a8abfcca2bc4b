"""Files that appear whole or not at all: results, task data and plots are written through a staging file.

Why a staging file unique to each write: a reader (a leaderboard, a resumed sweep) must see the old file or the
whole new one, never half; two processes writing one path at once (two sweeps on one folder) must not write into
one staging file; and a write that fails (a full disk) must leave nothing behind.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO


@contextmanager
def staged(path: Path, mode: str = "wb", encoding: str | None = None) -> Iterator[IO]:
    """An open file in ``path``'s folder that replaces ``path`` in one rename when the block ends, and is removed
    when the block raises (anything: an interrupted generator of rows as much as a full disk).

    The file gets the permissions any file the user writes gets (``0o666`` less the umask), not the ``0o600`` of
    :func:`tempfile.mkstemp`, which would hide a shared folder's results from its other users.
    """
    handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    staging = Path(name)
    try:
        os.fchmod(handle, 0o666 & ~umask())
        with os.fdopen(handle, mode, encoding=encoding) as file:
            handle = -1  # closed with the file object from here on
            yield file
            file.flush()
            os.fsync(file.fileno())  # a full disk that delays allocation fails here, not after the rename
        os.replace(staging, path)
    except BaseException:
        if handle >= 0:
            os.close(handle)
        staging.unlink(missing_ok=True)
        raise


def umask() -> int:
    """This process's umask. Read from ``/proc`` where Linux gives it: otherwise reading it means setting it (and
    setting it straight back), and a file another thread creates in between would get no umask at all."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask
