"""Each sample's outcome, read from lm-eval's logged samples, for the record (``ResultRecord.outcomes``).

Why check against the score: lm-eval aggregates a metric by a function of the task's choosing, and a page can only
recompute those it knows (a mean, a perplexity over words or bytes). Outcomes are kept when they give back the
score lm-eval reported, and only then, so an interval is always an interval on the number the page shows. RULER's
aggregation drops the samples of other lengths (their value is -1); those are dropped here too, and the check
says whether that was right.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

Statistic = Literal["mean", "weighted_perplexity", "bits_per_byte"]
"""How a score follows from its samples' outcomes: their mean, or, for a perplexity, from each document's
log-likelihood (``values``) and its words or bytes (``weights``), as lm-eval aggregates them."""

WEIGHTED: dict[str, Statistic] = {"word_perplexity": "weighted_perplexity", "byte_perplexity": "weighted_perplexity",
                                  "bits_per_byte": "bits_per_byte"}
"""lm-eval's loglikelihood_rolling metrics, whose per-document items are (log-likelihood, words or bytes)."""
OTHER_LENGTH = -1.0
"""RULER's value for a metric of a length the sample was not built for (its aggregation leaves them out)."""


def score_of(statistic: Statistic, values: Sequence[float], weights: Sequence[float] | None = None) -> float:
    """The score ``values`` (and ``weights``) give, as lm-eval's aggregation computes it."""
    if statistic == "mean":
        return math.fsum(values) / len(values)
    rate = math.fsum(values) / math.fsum(weights)  # mean log-likelihood per word (or byte)
    return math.exp(-rate) if statistic == "weighted_perplexity" else -rate / math.log(2)


def per_sample(samples: Sequence[dict[str, Any]], metric: str) -> list[tuple[int, Any]]:
    """``(doc_id, item)`` of ``metric`` (lm-eval's ``name,filter``) in each logged sample of its filter."""
    name, _, kept = metric.partition(",")
    return [(int(sample["doc_id"]), sample[name]) for sample in samples
            if name in sample and sample.get("filter", kept) == kept]


def outcomes(samples: Sequence[dict[str, Any]], metric: str, score: float) -> dict[str, Any] | None:
    """The record's outcomes of ``metric`` (``ResultRecord.outcomes``), or None if the logged samples do not give
    back ``score`` by a statistic known here."""
    items = per_sample(samples, metric)
    if not items:
        return None
    name = metric.partition(",")[0]
    if name in WEIGHTED:
        if not all(isinstance(item, (tuple, list)) and len(item) == 2 and _finite(*item) for _, item in items):
            return None
        docs = [doc for doc, _ in items]
        values, weights = [float(item[0]) for _, item in items], [float(item[1]) for _, item in items]
        if min(weights) < 0 or not math.fsum(weights) or not _gives(WEIGHTED[name], values, weights, score):
            return None
        return {"statistic": WEIGHTED[name], "doc_ids": docs, "values": values, "weights": weights}
    if not all(isinstance(item, (int, float)) and not isinstance(item, bool) and _finite(item) for _, item in items):
        return None
    for kept in (items, [(doc, item) for doc, item in items if item != OTHER_LENGTH]):
        if kept and _gives("mean", [float(item) for _, item in kept], None, score):
            return {"statistic": "mean", "doc_ids": [doc for doc, _ in kept], "values": [float(v) for _, v in kept]}
    return None


def stderrs(samples: Sequence[dict[str, Any]], metrics: dict[str, float]) -> dict[str, float]:
    """lm-eval's standard error (its ``mean_stderr``) of each metric that is the mean of its samples' values."""
    from lm_eval.api.metrics import mean_stderr

    found = {}
    for metric, score in metrics.items():
        kept = outcomes(samples, metric, score)
        if kept is not None and kept["statistic"] == "mean" and len(kept["values"]) > 1:
            found[metric] = float(mean_stderr(kept["values"]))
    return found


def _gives(statistic: Statistic, values: list[float], weights: list[float] | None, score: float) -> bool:
    return math.isclose(score_of(statistic, values, weights), score, rel_tol=1e-9, abs_tol=1e-12)


def _finite(*numbers: Any) -> bool:
    return all(isinstance(x, (int, float)) and math.isfinite(x) for x in numbers)
