"""KIVI (Liu et al., 2024, "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache"): keys quantized per
channel across a group of tokens, values per token, the newest tokens at full precision.

Why keys per channel: a few key channels carry large values across all tokens (outlier channels), so a scale per
token would spend its range on them and flatten every other channel; a scale per channel across ``GROUP``
consecutive tokens follows each channel's own range. Values have no such channels and are read as a weighted sum
over tokens, so per-token quantization (in groups of channels) bounds each token's error instead. The newest
``RESIDUAL`` to ``RESIDUAL + GROUP - 1`` tokens of each head stay at full precision (KIVI's residual), and a
group is quantized once it is older than them.

What we depart from, and why:

- Scales and minimums are float16, rounded outwards as in ``int8``/``int4`` (:mod:`kvpolicies_plugins.quantized`):
  the paper's kernels keep them in the model's dtype. Values are grouped by 32 channels (the largest divisor of
  ``head_dim`` up to 32), as the paper's value groups are.
- Keys and values share one residual: each head's newest ``RESIDUAL`` to ``RESIDUAL + GROUP - 1`` tokens stay at
  full precision for both (KIVI keeps fewer keys, those of its group not yet full, and exactly ``RESIDUAL``
  values), so that one entry is one key and one value at one price.
- Combined with eviction, what a cut shifts is regrouped and quantized again (see
  :mod:`kvpolicies.engine.residual`); KIVI alone never evicts. Compression at prefill evicts before anything is
  quantized, so the kept tokens are quantized once.

What an entry costs, at ``head_dim`` 64: ``kivi4`` 32 bytes of key codes, 8 of key scales and minimums (64
channels × 2 × 2 bytes over 32 tokens), 32 of value codes and 8 of value scales: 80 bytes, against 256 in bfloat16;
``kivi2`` 48. The full-precision residual costs a head up to 159 entries at full precision, which the budget sets
aside first (:class:`~kvpolicies.engine.budget.CacheShape`): on short prompts it is most of a small budget.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from kvpolicies import GroupedCodec, hookimpl
from kvpolicies.errors import UsageError
from kvpolicies_plugins.quantized import dequantize, groups_of, quantize

GROUP = 32
"""Consecutive tokens whose keys share a scale and minimum per channel (the paper's G)."""
RESIDUAL = 128
"""Newest tokens per head held at full precision, at least (the paper's R)."""


class Kivi(GroupedCodec):
    """Keys quantized per channel over 32 tokens, values per token, the newest 128 to 159 tokens at full precision."""

    bits: ClassVar[int] = 4
    group = GROUP
    residual = RESIDUAL

    def entry_bytes(self, head_dim: int, dtype: torch.dtype) -> int:
        if head_dim * self.bits % 8:
            raise UsageError(f"codec {self.name!r} packs {8 // self.bits} channels a byte, and this model's heads have "
                             f"{head_dim} channels; use a codec with more bits")
        if self.group * self.bits % 8:
            raise UsageError(f"codec {self.name!r} packs each key channel's codes along its group of {self.group} "
                             f"tokens, {8 // self.bits} a byte; use a group that is a multiple of {8 // self.bits}")
        if 4 * head_dim % self.group:
            raise UsageError(f"codec {self.name!r} keeps a float16 scale and minimum per key channel for every "
                             f"{self.group} tokens, {4 * head_dim} bytes for this model's {head_dim}-channel heads, "
                             "which is not a whole number of bytes per token; use int8 or int4")
        codes = head_dim * self.bits // 8
        key_scales = 4 * head_dim // self.group  # per channel, a scale and a minimum, over the group's tokens
        value_scales = 4 * groups_of(head_dim)  # per token, a scale and a minimum per group of channels
        return 2 * codes + key_scales + value_scales

    def encode(self, keys: torch.Tensor, values: torch.Tensor,
               fitted: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        key_codes, key_scales = quantize(keys.transpose(1, 2), self.bits, groups=1)  # [groups, channels, tokens]
        value_codes, value_scales = quantize(values, self.bits, groups_of(values.shape[-1]))
        return {"keys": key_codes, "key_scales": key_scales, "values": value_codes, "value_scales": value_scales}

    def decode(self, stored: dict[str, torch.Tensor], dtype: torch.dtype,
               fitted: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        keys = dequantize(stored["keys"], stored["key_scales"], self.bits, dtype).transpose(1, 2)
        return keys, dequantize(stored["values"], stored["value_scales"], self.bits, dtype)


class Kivi4(Kivi):
    """KIVI at 4 bits: keys per channel over 32 tokens, values per token, the newest 128 to 159 tokens in full."""

    name = "kivi4"
    bits = 4


class Kivi2(Kivi):
    """KIVI at 2 bits: keys per channel over 32 tokens, values per token, the newest 128 to 159 tokens in full."""

    name = "kivi2"
    bits = 2


@hookimpl
def register_codecs(register):
    register(Kivi4)
    register(Kivi2)
