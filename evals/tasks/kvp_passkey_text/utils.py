"""Data of the kvp_passkey_text task, generated deterministically on first use (see kvpolicies_evals.data)."""

from kvpolicies_evals.tasks.task_data import load


def dataset(**options):
    return load("kvp_passkey_text", options)
