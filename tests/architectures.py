"""What the tests expect of the architecture matrix (:mod:`kvpolicies.experiments.architectures`, whose models they
share with ``kvpolicies selfcheck --architectures``), shared by ``test_architectures.py`` and the ``--models-table``
report."""

from __future__ import annotations

import pytest

from kvpolicies.experiments.architectures import (  # noqa: F401 (the matrix, as the tests import it)
    ARCHITECTURES,
    COMMON,
    UNSUPPORTED,
    WINDOW,
    build,
    prompt,
)

ALL_WINDOWED = {"mistral-sliding-window"}
"""Every layer windowed: with windows held whole (``windows="keep"``) nothing outside them exists to evict, so
budgets below the model's own cache are refused (tested); sharing the budget (the default), they are cut like any
layer."""

REFUSED = {("cohere-interleaved-rope", "expected_attention"): "rotates interleaved dimension pairs"}
"""(architecture, policy) pairs refused with a ModelLoadError at the first eviction, and what the error says."""

WHOLE = {"l2norm": {"uncompressed_layers": []}}
"""Options that let a 2-layer model compress (l2norm's default keeps layers 0 and 1 whole)."""



@pytest.fixture(scope="module", params=sorted(ARCHITECTURES))
def architecture(request) -> str:
    """Each family of the matrix in turn (a test module imports this and ``model`` to run on all of them)."""
    return request.param


@pytest.fixture(scope="module")
def model(architecture):
    """The family's tiny random-weight model, built once per module."""
    return build(ARCHITECTURES[architecture])
