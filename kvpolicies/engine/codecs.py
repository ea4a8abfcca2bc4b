"""Storage codecs: how a kept entry's key and value are stored, and read back for the attention.

Why a stage of its own: eviction decides *which* entries stay; a codec decides *how* they are held (full precision,
integers with per-group scales, fewer key channels). The two compose: any policy with any codec, under one budget
in bytes, where an entry costs what the codec really stores (:meth:`Codec.entry_bytes`, scales and zero-points
included). The cache checks that claim against the codec's own tensors when it is built, and resident bytes are
read from the stored tensors, so "equal memory" stays a measured fact for every codec.

How a layer uses one (see :mod:`kvpolicies.engine.storage`): new tokens are encoded as they arrive and appended, in
the layer's layout, to the codec's stored tensors; their forward pass attends to them at full precision, as
transformers' ``QuantizedCache`` does at prefill. Before each later forward pass the layer decodes what it holds
into a working copy, which the attention and the policy's scoring read, and drops it once its attention and
eviction are done: between forward passes only the codec's tensors are resident. A decoded layer is transient
memory like an activation, paid one layer at a time; the one exception is an after-prefill stage, which reads every
layer at once and so holds every layer decoded while it chooses (the prompt at full precision, as without a
codec: the stage's peak is the prompt's either way).

A codec encodes each entry on its own (per-token quantization, channel pruning): the stored tensors are per entry,
``[..., n]`` for entries ``[..., head_dim]``, so eviction selects, packs and appends them exactly like keys.
"""

from __future__ import annotations

from typing import ClassVar

import torch


class Codec:
    """How entries are stored. Subclass it, set ``name``, and implement the three methods.

    ``encode`` and ``decode`` must be elementwise over entries: entry ``i``'s stored rows depend on entry ``i``
    alone, whatever the leading dimensions (``[batch, kv_heads, seq]`` while a layer is dense, ``[entries]`` once
    it is packed).
    """

    name: ClassVar[str] = ""
    lossless: ClassVar[bool] = False
    """True only when the stored tensors *are* the keys and values (full precision): the layer then stores them
    directly, with no encode or decode on the hot path."""

    def entry_bytes(self, head_dim: int, dtype: torch.dtype) -> int:
        """Bytes one entry (the key and the value of one token in one KV head) takes as stored, scales and
        zero-points included, for keys of ``head_dim`` channels in ``dtype``. The budget buys entries at this
        price; the cache checks it against :meth:`encode`'s tensors."""
        raise NotImplementedError

    def encode(self, keys: torch.Tensor, values: torch.Tensor) -> dict[str, torch.Tensor]:
        """The stored form of ``keys`` and ``values`` (``[..., head_dim]``): named tensors ``[..., n]`` with the same
        leading dimensions, any dtype and any ``n`` per name."""
        raise NotImplementedError

    def decode(self, stored: dict[str, torch.Tensor], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[..., head_dim]`` in ``dtype`` read back from what :meth:`encode` returned (possibly
        selected, packed and appended to since)."""
        raise NotImplementedError

    @classmethod
    def summary(cls) -> str:
        return (cls.__doc__ or "").strip().split("\n")[0]


class FullPrecision(Codec):
    """Keys and values as the model computed them (the default; no encode, no decode)."""

    name = "full"
    lossless = True

    def entry_bytes(self, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * head_dim * torch.empty((), dtype=dtype).element_size()

    def encode(self, keys: torch.Tensor, values: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"keys": keys, "values": values}

    def decode(self, stored: dict[str, torch.Tensor], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return stored["keys"].to(dtype), stored["values"].to(dtype)


def checked_entry_bytes(codec: Codec, head_dim: int, dtype: torch.dtype, device: torch.device, fault) -> int:
    """``codec.entry_bytes(head_dim, dtype)``, once :meth:`Codec.encode` and :meth:`Codec.decode` were seen to keep
    their contract on two entries: the declared price equals the bytes encode stores per entry, the stored tensors
    keep the entries' leading dimensions, and decode gives back keys and values of the right shape and dtype.
    ``fault(what)`` builds the error naming the plugin; what a codec raises is wrapped by the caller."""
    declared = codec.entry_bytes(head_dim, dtype)
    if not isinstance(declared, int) or isinstance(declared, bool) or declared < 1:
        raise fault(f"returned {declared!r} from entry_bytes(); it must return a positive whole number of bytes")
    # Fixed values, not random ones: building a cache must not move the random stream a sampled generation uses.
    keys = torch.linspace(-2, 2, 2 * head_dim, device=device).view(1, 1, 2, head_dim).to(dtype)
    values = keys.flip(-1) * 0.5
    stored = codec.encode(keys, values)
    if not isinstance(stored, dict) or not stored or not all(
            isinstance(name, str) and isinstance(t, torch.Tensor) for name, t in stored.items()):
        raise fault(f"returned {type(stored).__name__} from encode(); it must return a dict of named tensors")
    wrong = {name: list(t.shape) for name, t in stored.items() if t.ndim != 4 or t.shape[:3] != keys.shape[:3]}
    if wrong:
        raise fault(f"returned tensors of shapes {wrong} from encode() for entries of shape {list(keys.shape)}; "
                    "each stored tensor must keep the entries' leading dimensions and add one of its own, [..., n]")
    stored_bytes = sum(t[0, 0, 0].numel() * t.element_size() for t in stored.values())
    if stored_bytes != declared:
        raise fault(f"stores {stored_bytes} bytes per entry in encode() but declares {declared} in entry_bytes(); "
                    "the budget buys entries at the declared price, so the two must agree (count every stored "
                    "tensor: codes, scales, zero-points)")
    # As a dense layer holds entries ([batch, kv_heads, seq, n]), then as a packed one ([entries, n]).
    for shape, held in ((keys.shape, stored), (keys.shape[2:], {name: t[0, 0] for name, t in stored.items()})):
        decoded = codec.decode(held, dtype)
        if not (isinstance(decoded, tuple) and len(decoded) == 2 and all(
                isinstance(t, torch.Tensor) and t.shape == shape and t.dtype == dtype for t in decoded)):
            raise fault(f"returned {type(decoded).__name__} from decode() for entries of shape {list(shape)}; it "
                        f"must return (keys, values), each of that shape and dtype {dtype}, whatever the leading "
                        "dimensions (a packed layer holds [entries, n])")
    return declared
