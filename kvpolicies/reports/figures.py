"""What the pages' figures share: matplotlib, one set of files per model, and a plots folder that takes them.

A folder that cannot take the figures (a file in its place, no permission, a full disk) is a
:class:`~kvpolicies.experiments.results.ResultsError` naming it, never a traceback after the tables were computed.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Collection
from pathlib import Path
from typing import Any

from kvpolicies.experiments.results import ResultsError

FIX = "choose a plots folder you can write to, or leave the plots out"


def pyplot() -> Any:
    """``matplotlib.pyplot`` drawing to files (no display needed)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("plots need matplotlib: pip install -e '.[plots]'") from None
    return plt


def _prefix(model: str, models: Collection[str]) -> str:
    """The start of a model's file names: none where the folder holds one model (the committed pages link those
    names), else the model's id as a file name (hub ids hold a slash), so that models are drawn apart."""
    return "" if len(models) <= 1 else re.sub(r"[^\w.-]", "_", model) + "_"


def plots_folder(out_dir: Path) -> Path:
    """``out_dir``, created if needed."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ResultsError(f"cannot write plots to {out_dir}: it is a file; {FIX}")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise _unwritable(out_dir, error) from None
    return out_dir


def save(fig: Any, out_dir: Path, name: str, model: str, models: Collection[str], note: str = "") -> Path:
    """Write ``fig``, one of ``model``'s figures, as ``name``.png in ``out_dir`` and close it; where the page has
    several ``models``, the figure is titled with its model and its file name starts with it. ``note``: what the
    figure must say about how it is drawn (error bars, points shifted), in small print under the panels."""
    import matplotlib.pyplot as plt
    import textwrap

    path = out_dir / f"{_prefix(model, models)}{name}.png"
    try:
        if len(models) > 1:
            fig.suptitle(model)
        if note:
            lines = textwrap.wrap(note, max(60, int(fig.get_figwidth() * 17)))
            fig.tight_layout(rect=(0, 0.035 * len(lines) + 0.01, 1, 1))
            fig.text(0.01, 0.01, "\n".join(lines), fontsize=7, ha="left", va="bottom")
        else:
            fig.tight_layout()
        _write(fig, path)
    except OSError as error:
        raise _unwritable(out_dir, error, path) from None
    finally:
        plt.close(fig)
    return path


def _write(fig: Any, path: Path) -> None:
    """Draw ``fig`` into ``path`` through a staging file, then one rename.

    Why: two sweeps or leaderboards may draw the same plots folder at once, and a page or a browser may read it
    meanwhile; each must see the old figure or the whole new one, and a drawing that fails (a full disk) must leave
    the old one, and nothing else, behind. The staging file lies in a hidden folder of its own in ``out_dir`` (one
    file system, so the rename is atomic; one folder per write, so two writers never share a file) and has the
    figure's own name, so matplotlib reads the format from it. It is created here, by ``open``, so it has the
    permissions of any file the user writes (``0o666`` less the umask), not :func:`tempfile.mkstemp`'s ``0o600``
    that would hide a shared folder's plots from its other users. It is created before drawing, so that a
    ``savefig`` that writes nothing (tests replace it to look at the figures) still leaves a file to rename.
    """
    staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        drawn = staging / path.name
        drawn.touch()
        fig.savefig(drawn, dpi=110)
        with drawn.open("r+b") as file:
            os.fsync(file.fileno())  # a full disk that delays allocation fails here, not after the rename
        os.replace(drawn, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _unwritable(out_dir: Path, error: OSError, figure: Path | None = None) -> ResultsError:
    """The error for a folder that cannot take the figures; it names the ``figure`` being written where the error
    names a file, not the staging file, which is gone by then."""
    why = (error.strerror or str(error)).lower()
    named = error.filename and Path(error.filename) != out_dir
    where = f" ({figure or error.filename})" if named else ""
    return ResultsError(f"cannot write plots to {out_dir}: {why}{where}; {FIX}")
