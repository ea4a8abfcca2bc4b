"""When the prompt is compressed relative to its question: the two protocols of kvpress's leaderboard.

A long-context prompt is a *context* (documents, a haystack) followed by a *question*. A deployed cache is often
compressed before any question exists (a shared document, a multi-turn chat), which flatters no policy; compressing
with the question in view lets attention-based policies aim at the answer.

- ``query_aware``: context and question are prefilled together and the context is compressed with the question in
  view (SnapKV's window of last queries is then the question). Without a known split the whole prompt is the
  context: the only protocol for tasks that have no question.
- ``query_agnostic``: the context alone is prefilled and compressed, then the question is prefilled on the
  compressed cache, then the answer is generated. Needs the split.

In both, when the split is known, the budget is a fraction of the *context*; the question's entries and the
generated tokens are kept whole and not charged (kvpress leaves the question uncompressed), and results report the
context's entries apart from the whole cache's. So at one budget the two protocols keep the same number of context
entries and differ only in whether the policy saw the question: an attention-free policy whose scores do not look
at other entries (``l2norm``, ``keydiff``) keeps the same entries either way.

The split comes from the task: each of its docs names the text that starts the question (a
``kvp_question_marker`` field, which other models ignore); the question starts at the token holding the first
character of the marker's last occurrence in the prompt.
"""

from __future__ import annotations

from enum import Enum

from kvpolicies.errors import UsageError

QUESTION_MARKER = "kvp_question_marker"
"""The doc field by which a task names the text that starts its question."""


class Protocol(str, Enum):
    QUERY_AWARE = "query_aware"
    QUERY_AGNOSTIC = "query_agnostic"

    @classmethod
    def parse(cls, value: str | Protocol | None) -> Protocol:
        if value is None or value == "":
            return cls.QUERY_AWARE
        try:
            return cls(value)
        except ValueError:
            raise UsageError(f"unknown protocol {value!r}; use {' or '.join(p.value for p in cls)}") from None


def question_start(decode, ids: list[int], marker: str) -> int | None:
    """Index in ``ids`` of the token holding the first character of the last ``marker`` in the decoded prompt, or
    None if the prompt does not contain it.

    Works on text, not tokens: the marker's own tokens may merge with their neighbours differently in the prompt.
    ``decode`` turns a token list into text; prefixes are decoded in a binary search (about log2(n) decodes).
    """
    text = decode(ids)
    char = text.rfind(marker)
    if char < 0:
        return None
    low, high = 0, len(ids)  # the smallest k whose decoded prefix reaches past `char`
    while low < high:
        middle = (low + high) // 2
        if len(decode(ids[: middle + 1])) > char:
            high = middle
        else:
            low = middle + 1
    return low


def missing_split(task_hint: str = "") -> UsageError:
    return UsageError(
        "protocol=query_agnostic needs to know where the question starts, and this request's task does not say "
        f"(its docs have no {QUESTION_MARKER!r} field){task_hint}; use protocol=query_aware, or a task that "
        "names its question (kvp_ruler_*, kvp_passkey, kvp_passkey_text, kvp_niah)"
    )


def split_cache(model, cache, ids, starts: list[int], protocol: Protocol, chunk: int | None = None) -> int:
    """Set up ``cache`` for a prompt ``ids`` (``[batch, seq]``) whose questions start at ``starts`` (real tokens
    before each question); return how many leading tokens were prefilled here (the rest is for ``generate``).

    query_agnostic prefills the context alone (one sequence: contexts of a batch end at different places), which
    compresses it, ``chunk`` tokens at a time when given (so memory follows the budget, as in generation); both
    protocols then keep everything after the context whole and outside the budget.
    """
    import torch

    prefilled = 0
    if protocol is Protocol.QUERY_AGNOSTIC:
        if ids.shape[0] != 1:
            raise UsageError("query_agnostic compresses each context alone: run one sequence at a time")
        prefilled = starts[0]
        step = chunk or prefilled
        with torch.no_grad():
            for start in range(0, prefilled, step):  # no logits wanted: keep one position, not the vocabulary's
                model(ids[:, start : min(start + step, prefilled)], cache=cache, logits_to_keep=1)
    cache.context_lengths = list(starts)
    return prefilled
