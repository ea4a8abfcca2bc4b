"""lm-eval's own RULER, offline: the same samples lm-eval's code makes from the same text and tokenizer, all 13
tasks built with the network cut, and one scored through ``kvpolicies lm-eval``.

Slow: the samples are sized with the embedded model's tokenizer (converted once), and lm-eval's RULER builds a
6-million-word list when it is imported.
"""

from __future__ import annotations

import importlib
import json
import random
import socket

import numpy as np
import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tokenizer() -> str:
    from kvpolicies.integrations.models import resolve_source

    return resolve_source(None)[0]  # the embedded model's folder: its tokenizer sizes the samples


@pytest.fixture
def offline(monkeypatch):
    """No network: any connection attempt fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("RULER tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def seeded(function, *args, **kwargs):
    """lm-eval's RULER draws from the global random generators, which lm-eval's evaluator seeds before building
    tasks (0 and 1234): do the same, so two generations can be compared."""
    random.seed(0)
    np.random.seed(1234)
    return function(*args, **kwargs)


def docs(result: dict) -> list[dict]:
    """The samples, without the question marker our tasks add for protocol=query_agnostic."""
    return [{key: value for key, value in doc.items() if key != "kvp_question_marker"}
            for doc in result["test"].to_list()]


def ruler_module(name: str):
    from kvpolicies_evals import ruler

    ruler.install()
    return importlib.import_module(f"lm_eval.tasks.ruler.{name}")


def test_essay_samples_equal_lm_evals_own_from_the_hub_copy_of_the_same_text(monkeypatch, tokenizer, offline):
    """lm-eval's own ``get_haystack`` reading a hub dataset that holds RULER's essay file as one row gives the same
    haystack, and so the same samples, as our offline reader: only the fetch is replaced."""
    from kvpolicies_evals import ruler

    options = {"max_seq_lengths": [4096], "pretrained": tokenizer}
    ours = docs(seeded(ruler.generate, "niah_single_2", options))
    prepare_niah, niah_utils = ruler_module("prepare_niah"), ruler_module("niah_utils")
    text = json.loads(ruler.data_file("PaulGrahamEssays.json").read_text(encoding="utf-8"))["text"]
    online = ruler.ONLINE["get_haystack"]
    monkeypatch.setattr(prepare_niah.datasets, "load_dataset", lambda *args, **kwargs: {"text": [text]})
    monkeypatch.setattr(prepare_niah, "get_haystack", online)
    monkeypatch.setattr(niah_utils, "get_haystack", online)
    try:
        assert online("essay") == list(ruler.essay_words())
        theirs = docs(seeded(niah_utils.niah_single_2, max_seq_lengths=[4096], tokenizer=tokenizer))
    finally:
        online.cache_clear()
    assert len(ours) == len(theirs) == 500
    assert ours == theirs
    assert all(3800 < doc["length"] <= 4096 for doc in ours)


def test_qa_samples_equal_lm_evals_own_from_the_downloaded_files(monkeypatch, tokenizer, offline):
    """lm-eval's own download of SQuAD, answered with the file RULER ships, gives the same samples."""
    from kvpolicies_evals import ruler

    options = {"max_seq_lengths": [4096], "pretrained": tokenizer}
    ours = docs(seeded(ruler.generate, "qa_squad", options))
    qa_utils = ruler_module("qa_utils")
    url = qa_utils.read_squad.__wrapped__.__defaults__[0]

    class Response:
        def __init__(self, asked: str) -> None:
            assert asked == url
            self.payload = json.loads(ruler.data_file("squad.json").read_text(encoding="utf-8"))

        def raise_for_status(self) -> None:
            pass

        def json(self):
            return self.payload

    monkeypatch.setattr(qa_utils, "download_json", ruler.ONLINE["download_json"])
    monkeypatch.setattr(qa_utils.requests, "get", lambda asked, **kwargs: Response(asked))
    qa_utils.read_squad.cache_clear()
    try:
        theirs = docs(seeded(qa_utils.get_squad, max_seq_lengths=[4096], tokenizer=tokenizer))
    finally:
        qa_utils.read_squad.cache_clear()
        ruler.ONLINE["download_json"].cache_clear()
    assert ours == theirs and len(ours) == 500


def test_cwe_samples_do_not_depend_on_what_ran_before_in_the_process(tokenizer, offline):
    from kvpolicies_evals import ruler

    options = {"max_seq_lengths": [4096], "pretrained": tokenizer}
    first = docs(seeded(ruler.generate, "cwe", options))
    ruler._GENERATED.clear()  # build again, not the copy kept for a repeat
    again = docs(seeded(ruler.generate, "cwe", options))
    assert first == again


def test_a_repeated_build_is_the_first_builds_samples_and_leaves_the_generators_as_it_did(tokenizer, offline):
    from kvpolicies_evals import ruler

    options = {"max_seq_lengths": [4096], "pretrained": tokenizer}
    ruler._GENERATED.clear()
    first = seeded(ruler.generate, "niah_single_1", options)
    after_first = (random.random(), np.random.rand())
    again = seeded(ruler.generate, "niah_single_1", options)
    assert again["test"] is first["test"] and (random.random(), np.random.rand()) == after_first
    ruler._GENERATED.clear()
    assert docs(seeded(ruler.generate, "niah_single_1", options)) == docs(first)  # what a fresh build gives
    random.seed(1)  # other generator states: a fresh build, since lm-eval's draws would differ
    other = ruler.generate("niah_single_1", options)
    assert other["test"] is not first["test"] and docs(other) != docs(first)


def test_every_ruler_task_builds_offline_through_lm_evals_task_manager(tokenizer, offline):
    from lm_eval.tasks import TaskManager, get_task_dict

    from kvpolicies_evals import ruler
    from tests.helpers import TASKS

    manager = TaskManager(include_path=TASKS, metadata={"pretrained": tokenizer, "max_seq_lengths": [4096]})
    tasks = list(_leaves(seeded(get_task_dict, ["kvp_ruler"], manager)))
    assert {task.config.task for task in tasks} == {f"kvp_ruler_{name}" for name in ruler.TASKS}
    for task in tasks:
        samples = task.test_docs()
        assert len(samples) == 500
        assert max(samples["length"]) <= 4096 + 50  # fwe counts its 50 answer tokens in, as upstream
        for doc in samples.select(range(5)):  # the question marker finds the question, after the context
            assert len(doc["input"]) * 0.5 < doc["input"].rfind(doc["kvp_question_marker"])


def _leaves(tree):
    if isinstance(tree, dict):
        for value in tree.values():
            yield from _leaves(value)
    elif isinstance(tree, (list, tuple)):
        for value in tree:
            yield from _leaves(value)
    else:
        yield tree
