"""What lm-eval logs that is ours to correct or silence: hints that are wrong for our tasks, and warnings about what
kvpolicies itself does on purpose.

- lm-eval warns for every task built from a function (``custom_dataset``), every time it is built, that "custom
  kwargs can be passed to ``--metadata``", with RULER's ``max_seq_lengths`` as the example. For our ``kvp_*`` tasks
  that example is wrong (they take ``lengths``) and a sweep repeats it for every cell: each task's hint is said once
  per process, with the task's own keys.
- A sweep hands the model it loaded for a task's first cell to the next cells (weights load once per model), and
  HFLM warns, twice per cell, that ``pretrained`` is not a name; that is ours, and dropped.

Installed by the commands that run lm-eval (``kvpolicies lm-eval``, sweeps and their Ray workers), never by the cell
runner: a log line is no part of a result, so this module stays out of every cell's code version.
"""

from __future__ import annotations

import logging

CUSTOM_KWARGS = ": Custom kwargs can be passed to `--metadata`"
OURS_ON_PURPOSE = (
    "`pretrained` model kwarg is not of type `str`",
    "Passed an already-initialized model through `pretrained`",
)


class TaskHints(logging.Filter):
    """lm-eval's ``--metadata`` hint, once per task, with the keys the task really takes."""

    def __init__(self) -> None:
        super().__init__()
        self.said: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        task, found, _ = message.partition(CUSTOM_KWARGS)
        if not found:
            return True
        if task in self.said:
            return False
        self.said.add(task)
        hint = hint_for(task)
        if hint is not None:
            record.msg, record.args = hint, ()
        record.levelno, record.levelname = logging.INFO, "INFO"  # how to pass parameters: a hint, not a warning
        return True


class OnPurpose(logging.Filter):
    """Drops HFLM's warnings about a loaded model passed as ``pretrained``, which sweeps do on purpose."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(OURS_ON_PURPOSE)


def hint_for(task: str) -> str | None:
    """Our own hint for one of our tasks (None: lm-eval's is right, or the task is not ours)."""
    from kvpolicies_evals.metadata import schema

    kind = schema(task)
    if kind is None or kind.LENGTHS == "max_seq_lengths":  # RULER's: lm-eval's example is right
        return None
    return (f"{task}: its data parameters go in --metadata as JSON, e.g. --metadata='{{\"{kind.LENGTHS}\": [2048]}}' "
            f"(README.md, 'Evaluating with lm-evaluation-harness'); it accepts {kind.accepts()}")


_installed: list[logging.Filter] = []


def quiet_lm_eval() -> None:
    """Install both filters on lm-eval's loggers, once per process."""
    if _installed:
        return
    hints, on_purpose = TaskHints(), OnPurpose()
    logging.getLogger("lm_eval.api.task").addFilter(hints)
    logging.getLogger("lm_eval.models.huggingface").addFilter(on_purpose)
    _installed.extend([hints, on_purpose])
