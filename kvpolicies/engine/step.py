"""One forward pass as the layers of a compressed cache see it, computed once for all of them.

Why: every layer needs to know which of the pass's new tokens are real (padding of a left-padded batch is stored
by a dense layer as invalid, dropped by a packed one, and never counted as seen), and reading that from the device
costs a host-device sync. Read per layer, a padded prefill paid one sync per layer; read once per pass, it pays one.
Every layer also needs the same split between each sequence's context (what the budget is a fraction of) and what
follows it (a question, generated tokens: kept whole and not charged), so the pass carries it too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Step:
    """What one forward pass brings to every layer."""

    q_len: int
    """New tokens per sequence in this pass, padding included."""
    new_valid: torch.Tensor | None
    """``[batch, q_len]`` bool, True for real new tokens; None when all are real (a decoding step reads no mask)."""
    real: list[int]
    """Real new tokens per sequence, read from ``new_valid`` once for the whole pass."""
    appended: list[int]
    """Per sequence, the real tokens after its context once this pass is in (all 0 when the whole prompt is
    context): kept whole and not charged to the budget."""

    @classmethod
    def of(cls, batch: int, q_len: int, new_valid: torch.Tensor | None, seen: list[int] | None = None,
           context_lengths: list[int] | None = None) -> Step:
        """The pass of ``q_len`` new tokens after ``seen`` real ones per sequence, whose contexts end after
        ``context_lengths`` real tokens (None: every token is context)."""
        real = [q_len] * batch if new_valid is None else new_valid.sum(1).tolist()  # the pass's one host read
        seen = seen or [0] * batch
        if context_lengths is None:
            appended = [0] * batch
        else:
            appended = [max(s + r - c, 0) for s, r, c in zip(seen, real, context_lengths, strict=True)]
        # A copy: the attention's diagonal is a view of the model's mask, which must not outlive the pass.
        return cls(q_len, None if new_valid is None else new_valid.clone(), real, appended)

    @property
    def padded(self) -> bool:
        """Whether any new token of this pass is padding."""
        return min(self.real) < self.q_len
