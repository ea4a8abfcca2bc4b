"""Shared loader for the kvp_* tasks: lm-eval calls it with the task's metadata (and any --metadata JSON)."""

from __future__ import annotations

import datasets

from kvpolicies_evals.data import dataset_file

PARAMETERS = {
    "kvp_passkey": ("lengths", "depths", "per_cell", "seed"),
    "kvp_passkey_text": ("lengths", "depths", "per_cell", "seed"),
    "kvp_niah": ("lengths", "depths", "per_cell", "seed"),
    "kvp_ppl": ("lengths", "per_length", "seed"),
}


def load(task: str, options: dict) -> dict[str, datasets.Dataset]:
    # lm-eval merges model args and task metadata into ``options``: only our parameters are read.
    parameters = {key: options[key] for key in PARAMETERS[task] if key in options}
    path = dataset_file(task, **parameters)
    return {"test": datasets.Dataset.from_json(str(path))}
