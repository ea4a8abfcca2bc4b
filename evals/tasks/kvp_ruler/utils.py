"""lm-eval's own RULER functions, offline (see kvpolicies_evals.ruler): the task YAMLs here name these."""

from lm_eval.tasks.ruler.common_utils import aggregate_metrics, process_results, process_results_part

from kvpolicies_evals.ruler import (
    cwe,
    fwe,
    niah_multikey_1,
    niah_multikey_2,
    niah_multikey_3,
    niah_multiquery,
    niah_multivalue,
    niah_single_1,
    niah_single_2,
    niah_single_3,
    qa_hotpot,
    qa_squad,
    vt,
)

__all__ = [
    "aggregate_metrics", "process_results", "process_results_part", "cwe", "fwe", "niah_multikey_1",
    "niah_multikey_2", "niah_multikey_3", "niah_multiquery", "niah_multivalue", "niah_single_1", "niah_single_2",
    "niah_single_3", "qa_hotpot", "qa_squad", "vt",
]
