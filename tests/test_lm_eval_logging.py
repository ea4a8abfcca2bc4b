"""What lm-eval logs that is ours: its wrong --metadata hint for our tasks, and warnings about what we do on purpose."""

from __future__ import annotations

import logging

import pytest

from kvpolicies.integrations.lm_eval_logging import OnPurpose, TaskHints

HINT = ("{}: Custom kwargs can be passed to `--metadata` in console (as json string) or to the TaskManager.\n"
        "For example --metadata='{{\"max_seq_lengths\":[4096, 8192]}}'. For details see task Readme.")


@pytest.fixture
def logger(caplog):
    logger = logging.getLogger("tests.lm_eval_logging")
    filters = [TaskHints(), OnPurpose()]
    for one in filters:
        logger.addFilter(one)
    caplog.set_level(logging.INFO, logger=logger.name)
    yield logger
    for one in filters:
        logger.removeFilter(one)


def test_our_tasks_get_their_own_keys_once_and_rulers_keep_lm_evals_hint(logger, caplog):
    for task in ("kvp_passkey", "kvp_passkey", "kvp_ppl", "kvp_ruler_niah_single_1", "kvp_ruler_niah_single_1"):
        logger.warning(HINT.format(task))
    said = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert len(said) == 3 and all(level == "INFO" for level, _ in said)
    passkey, ppl, ruler = (message for _, message in said)
    assert passkey.startswith("kvp_passkey: its data parameters go in --metadata") and '{"lengths": [2048]}' in passkey
    assert "depths" in passkey and "per_cell" in passkey and "max_seq_lengths" not in passkey
    assert "per_length" in ppl
    assert ruler == HINT.format("kvp_ruler_niah_single_1")  # right for RULER: kept as lm-eval says it


def test_hflms_warnings_on_a_model_passed_loaded_are_dropped_and_others_kept(logger, caplog):
    logger.warning("`pretrained` model kwarg is not of type `str`. Many other model arguments may be ignored.")
    logger.warning("Passed an already-initialized model through `pretrained`, assuming single-process call")
    logger.warning("something else entirely")
    assert [r.getMessage() for r in caplog.records] == ["something else entirely"]
