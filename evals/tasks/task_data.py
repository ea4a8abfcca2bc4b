"""Shared loader for the kvp_* tasks: lm-eval calls it with the task's metadata (and any --metadata JSON)."""

from __future__ import annotations

import datasets

from kvpolicies_evals.data import PASSKEY_QUESTION, dataset_file
from kvpolicies_evals.metadata import loader_parameters

QUESTION_MARKERS = {
    "kvp_passkey": PASSKEY_QUESTION.split("?")[0],
    "kvp_passkey_text": PASSKEY_QUESTION.split("?")[0],
    "kvp_niah": "\n\nWhat is the special magic number for",
}
"""Where each generation task's question starts (its last occurrence in the prompt): the split between context and
question that ``protocol=query_agnostic`` needs. Carried on every doc as ``kvp_question_marker``."""


def load(task: str, options: dict) -> dict[str, datasets.Dataset]:
    # lm-eval merges model args and task metadata into ``options``: only our parameters are read, and checked.
    parameters = loader_parameters(task, options)
    path = dataset_file(task, **parameters)
    dataset = datasets.Dataset.from_json(str(path))
    if task in QUESTION_MARKERS:
        dataset = dataset.add_column("kvp_question_marker", [QUESTION_MARKERS[task]] * len(dataset))
    return {"test": dataset}
