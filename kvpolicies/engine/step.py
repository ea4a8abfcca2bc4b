"""One forward pass as the layers of a compressed cache see it, computed once for all of them.

Why: every layer needs to know which of the pass's new tokens are real (padding of a left-padded batch is stored
by a dense layer as invalid, dropped by a packed one, and never counted as seen), and reading that from the device
costs a host-device sync. Read per layer, a padded prefill paid one sync per layer; read once per pass, it pays one.
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

    @classmethod
    def of(cls, batch: int, q_len: int, new_valid: torch.Tensor | None) -> Step:
        real = [q_len] * batch if new_valid is None else new_valid.sum(1).tolist()  # the pass's one host read
        # A copy: the attention's diagonal is a view of the model's mask, which must not outlive the pass.
        return cls(q_len, None if new_valid is None else new_valid.clone(), real)

    @property
    def padded(self) -> bool:
        """Whether any new token of this pass is padding."""
        return min(self.real) < self.q_len
