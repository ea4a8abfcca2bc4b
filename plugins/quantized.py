"""Integer codecs: every kept entry stored as ``bits``-bit integers in groups of channels, each group with its own
scale and minimum (asymmetric quantization per token, as FlexGen and KIVI's values do).

Why per token: an entry is then encoded alone, so eviction selects, packs and appends its codes like any key, and
a policy's choice never re-quantizes what it keeps. Keys quantized per token lose more than per channel on models
with outlier key channels (KIVI's finding); the grouping bounds the damage to one group of channels.

What an entry costs, keys and values each: ``head_dim × bits / 8`` bytes of codes plus a float16 scale and minimum
per group of ``GROUP`` channels (of the largest divisor of ``head_dim`` up to ``GROUP`` when 32 does not divide it:
20 for Phi-2's 80; the whole head when that divisor is below 8). At ``head_dim`` 64, ``int4`` stores an entry in 80 bytes and ``int8`` in 144, against 256 in
bfloat16 and 512 in float32: the same budget in bytes keeps 3.2 and 1.8 times as many entries in bfloat16.

The float16 scale and minimum are rounded outwards (the minimum down, the step up), so a group's range is always
covered and every value comes back within half a step; values beyond float16's ±65504 are clamped to it.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from kvpolicies import Codec, hookimpl
from kvpolicies.errors import UsageError

GROUP = 32
"""Channels that share one scale and minimum, at most."""
SMALLEST_GROUP = 8
"""Below this, a head is one group: a scale and minimum for every few channels would cost more than they save."""
HALF_MAX = 65504.0
"""The largest finite float16."""


def groups_of(head_dim: int) -> int:
    """Groups of channels per head: ``head_dim`` over its largest divisor up to ``GROUP``, or one group when that
    divisor is below ``SMALLEST_GROUP`` (74 channels: one group, not 37 of 2)."""
    size = max(size for size in range(1, GROUP + 1) if head_dim % size == 0)
    return head_dim // size if size >= SMALLEST_GROUP else 1


class Quantized(Codec):
    """Keys and values as ``bits``-bit integers, a float16 scale and minimum per group of channels and token."""

    bits: ClassVar[int] = 8

    def entry_bytes(self, head_dim: int, dtype: torch.dtype) -> int:
        if head_dim * self.bits % 8:
            raise UsageError(f"codec {self.name!r} packs {8 // self.bits} channels a byte, and this model's heads have "
                             f"{head_dim} channels; use a codec with more bits (int8)")
        codes = head_dim * self.bits // 8
        scales = 2 * groups_of(head_dim) * 2  # a scale and a minimum per group, float16
        return 2 * (codes + scales)

    def encode(self, keys: torch.Tensor, values: torch.Tensor) -> dict[str, torch.Tensor]:
        groups = groups_of(keys.shape[-1])
        key_codes, key_scales = quantize(keys, self.bits, groups)
        value_codes, value_scales = quantize(values, self.bits, groups)
        return {"keys": key_codes, "key_scales": key_scales, "values": value_codes, "value_scales": value_scales}

    def decode(self, stored: dict[str, torch.Tensor], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return (dequantize(stored["keys"], stored["key_scales"], self.bits, dtype),
                dequantize(stored["values"], stored["value_scales"], self.bits, dtype))


def quantize(x: torch.Tensor, bits: int, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes [..., n · bits / 8] uint8, scales [..., 2 · groups] float16)`` of ``x`` ``[..., n]``, quantized in
    ``groups`` groups of consecutive elements of its last dimension, each with its own scale and minimum."""
    grouped = x.float().clamp(-HALF_MAX, HALF_MAX).unflatten(-1, (groups, -1))
    low, high = grouped.amin(-1, keepdim=True), grouped.amax(-1, keepdim=True)
    # Stored in float16, and quantized with the stored values so that decoding inverts exactly: the minimum
    # rounded down and the step up, so that low + step · (levels - 1) still reaches the group's maximum.
    levels = 2**bits - 1
    low = _outwards(low, down=True)
    scale = _outwards(((high - low) / levels).clamp(min=2**-14, max=HALF_MAX), down=False)
    codes = ((grouped - low) / scale).round_().clamp_(0, levels).to(torch.uint8).flatten(-2)
    return _packed(codes, bits), torch.cat([scale, low], dim=-1).flatten(-2).half()


def dequantize(codes: torch.Tensor, scales: torch.Tensor, bits: int, dtype: torch.dtype) -> torch.Tensor:
    """What :func:`quantize` returned, read back as ``[..., n]`` in ``dtype``.

    Computed in float32 in one buffer, in place: a whole layer is read back every forward pass, so each float32
    temporary is twice the bfloat16 working copy (``x * scale + low`` and a clamp made three of them)."""
    groups = scales.shape[-1] // 2
    values = _unpacked(codes, bits).float().unflatten(-1, (groups, -1))
    scale, low = scales.float().unflatten(-1, (groups, 2)).unbind(-1)
    values = values.mul_(scale[..., None]).add_(low[..., None]).flatten(-2)
    if dtype.is_floating_point:  # half a step past float16's largest value would be inf in float16
        values = values.clamp_(torch.finfo(dtype).min, torch.finfo(dtype).max)
    return values.to(dtype)


def _packed(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """``8 / bits`` codes a byte, the first of each run of them in the lowest bits."""
    if bits == 8:
        return codes
    parts = codes.unflatten(-1, (-1, 8 // bits))
    packed = parts[..., 0].clone()
    for i in range(1, 8 // bits):
        packed |= parts[..., i] << (bits * i)
    return packed


def _unpacked(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """What :func:`_packed` packed, one code a byte again."""
    if bits == 8:
        return codes
    mask = 2**bits - 1
    return torch.stack([(codes >> (bits * i)) & mask for i in range(8 // bits)], dim=-1).flatten(-2)


def _outwards(x: torch.Tensor, down: bool) -> torch.Tensor:
    """``x`` (float32) rounded to float16 towards -inf (``down``) or +inf, returned as float32."""
    half = x.half()
    beyond = half.float() > x if down else half.float() < x
    towards = torch.full_like(half, float("-inf") if down else float("inf"))
    return torch.where(beyond, torch.nextafter(half, towards), half).clamp(-HALF_MAX, HALF_MAX).float()


class Int8(Quantized):
    """Keys and values as 8-bit integers, a float16 scale and minimum per 32 channels and token."""

    name = "int8"
    bits = 8


class Int4(Quantized):
    """Keys and values as 4-bit integers (two a byte), a float16 scale and minimum per 32 channels and token."""

    name = "int4"
    bits = 4


@hookimpl
def register_codecs(register):
    register(Int8)
    register(Int4)
