"""What the pages' figures share: matplotlib, one set of files per model, and a plots folder that takes them.

A folder that cannot take the figures (a file in its place, no permission, a full disk) is a
:class:`~kvpolicies.experiments.results.ResultsError` naming it, never a traceback after the tables were computed.
"""

from __future__ import annotations

import re
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


def save(fig: Any, out_dir: Path, name: str, model: str, models: Collection[str]) -> Path:
    """Write ``fig``, one of ``model``'s figures, as ``name``.png in ``out_dir`` and close it; where the page has
    several ``models``, the figure is titled with its model and its file name starts with it."""
    import matplotlib.pyplot as plt

    path = out_dir / f"{_prefix(model, models)}{name}.png"
    try:
        if len(models) > 1:
            fig.suptitle(model)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    except OSError as error:
        raise _unwritable(out_dir, error) from None
    finally:
        plt.close(fig)
    return path


def _unwritable(out_dir: Path, error: OSError) -> ResultsError:
    why = (error.strerror or str(error)).lower()
    where = f" ({error.filename})" if error.filename and Path(error.filename) != out_dir else ""
    return ResultsError(f"cannot write plots to {out_dir}: {why}{where}; {FIX}")
