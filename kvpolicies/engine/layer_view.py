"""What a policy may know about the attention layer it scores, read from the model in one place.

Model families name and shape their parts differently (``o_proj`` or ``out_proj``, RoPE over the whole head or part
of it, one RoPE for every layer or one per layer type). A policy that reached into the module itself would be
right on Llama and silently wrong elsewhere, so each fact has one reader here, and a model this reader does not
understand is an error that names the model, never a guess.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch

from kvpolicies.errors import ModelLoadError

OUTPUT_PROJECTIONS = ("o_proj", "out_proj", "dense", "c_proj")
"""Attribute names of the attention output projection across transformers' model families."""


@dataclass(frozen=True)
class Rotary:
    """The rotary position embedding of a layer: ``inv_freq[k]`` rotates dimension pairs ``(k, k + dim/2)`` of the
    first ``dim`` dimensions of each head (the ``rotate_half`` convention of the Llama family; a model that rotates
    interleaved pairs ``(2k, 2k + 1)``, like Cohere or GLM, is refused by :attr:`LayerView.rotary`); the rest of the
    head is not rotated."""

    inv_freq: torch.Tensor
    """``[dim / 2]`` float32 angular frequencies, scaling (llama3, yarn, ...) included."""
    dim: int


@dataclass(frozen=True)
class _RopeSource:
    """What a layer's RoPE frequencies are computed from: transformers' init function for ``rope_type`` (plain RoPE
    with ``theta`` over ``dim`` dimensions for ``"default"``), and the length past which the model switches
    frequencies (None: never)."""

    name: str
    config: Any
    rope_type: str
    layer_type: str | None
    dim: int
    theta: float
    switch_after: int | None

    def frequencies(self, seq_len: int | torch.Tensor | None) -> Rotary:
        """The frequencies transformers' init function gives for ``seq_len`` (None: at load time)."""
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        if self.rope_type == "default":
            inv_freq = 1.0 / (self.theta ** (torch.arange(0, self.dim, 2, dtype=torch.float) / self.dim))
        elif self.rope_type in ROPE_INIT_FUNCTIONS:
            inv_freq, _ = ROPE_INIT_FUNCTIONS[self.rope_type](self.config, None, seq_len=seq_len,
                                                              layer_type=self.layer_type)
        else:
            raise ModelLoadError(f"{self.name}: unknown rope type {self.rope_type!r}")
        return Rotary(inv_freq=inv_freq.float(), dim=2 * inv_freq.numel())  # what the frequencies rotate


class LayerView:
    """Facts about one attention layer: its output projection and its RoPE (read once, on first use)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module
        self._long_rotary: Rotary | None = None

    @property
    def name(self) -> str:
        return type(self.module).__name__

    @cached_property
    def output_projection(self) -> torch.Tensor:
        """The output matrix ``W_o``, ``[hidden, heads × head_dim]``: head ``j`` writes ``W_o[:, j·d:(j+1)·d] v``."""
        for attribute in OUTPUT_PROJECTIONS:
            layer = getattr(self.module, attribute, None)
            if isinstance(layer, torch.nn.Linear):
                return layer.weight
        raise ModelLoadError(
            f"{self.name} has no output projection under any of {', '.join(OUTPUT_PROJECTIONS)}; a policy that "
            "reads it (criticalkv) cannot run on this model"
        )

    @cached_property
    def rotary(self) -> Rotary:
        """This layer's RoPE as the model builds it at load time: default or scaled rope types, partial rotary, and
        per-layer-type parameters (local and global layers with different RoPE). It is the RoPE of every forward
        up to the model's original length; past it, longrope and dynamic NTK switch frequencies, so a policy that
        knows the length asks :meth:`rotary_at`."""
        return self._rope.frequencies(None)

    def rotary_at(self, seq_len: int) -> Rotary:
        """The RoPE the model applies in a forward whose positions reach ``seq_len - 1`` (the longest sequence of the
        batch: the model picks one set of frequencies for the whole forward, from its largest position).

        Mirrors transformers' ``dynamic_rope_update``: longrope uses its long factors once ``seq_len`` exceeds
        ``original_max_position_embeddings`` (short ones up to it); dynamic NTK recomputes its base for ``seq_len``
        past ``max_position_embeddings`` and uses the plain frequencies below; other rope types ignore the length.
        One difference, by design: after a longer forward, the model's dynamic NTK module keeps that forward's
        frequencies for shorter ones still past the original length (state of the module, not of this sequence);
        here the answer depends on ``seq_len`` alone, which is what the model does while a sequence grows.
        """
        rope = self._rope
        if rope.switch_after is None or seq_len <= rope.switch_after:
            return self.rotary
        if rope.rope_type == "longrope":  # one set for every length past the original, built as the model does
            if self._long_rotary is None:
                self._long_rotary = rope.frequencies(rope.switch_after + 1)
            return self._long_rotary
        return rope.frequencies(torch.tensor(seq_len))  # a tensor, as the model passes it: the same float32 rounding

    @cached_property
    def _rope(self) -> _RopeSource:
        """Where this layer's RoPE comes from, read once from the module and its config."""
        self._check_rotate_half()
        config = getattr(self.module, "config", None)
        if config is None:
            raise ModelLoadError(f"{self.name} carries no config, so its RoPE cannot be read")
        head_dim = getattr(self.module, "head_dim", None) or getattr(config, "head_dim", None) or (
            config.hidden_size // config.num_attention_heads)
        parameters = dict(getattr(config, "rope_parameters", None) or {})
        layer_types = getattr(config, "layer_types", None)
        layer_idx = getattr(self.module, "layer_idx", None)
        layer_type = layer_types[layer_idx] if layer_types and layer_idx is not None else None
        if layer_type in parameters:
            parameters = dict(parameters[layer_type])  # RoPE per layer type (Gemma 3)
        else:
            layer_type = None
        if any(isinstance(value, dict) for value in parameters.values()):
            raise ModelLoadError(f"{self.name}: rope parameters nested under {sorted(parameters)}, which are not this "
                                 "model's layer types; kvpolicies cannot tell which RoPE this layer uses")
        factor = parameters.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0))
        rope_type = parameters.get("rope_type", "default")
        switch_after = None  # the length past which transformers' dynamic_rope_update changes the frequencies
        if rope_type == "longrope":
            switch_after = int(parameters["original_max_position_embeddings"])
        elif "dynamic" in rope_type:
            switch_after = int(config.max_position_embeddings)
        return _RopeSource(
            name=self.name, config=config, rope_type=rope_type, layer_type=layer_type, dim=int(head_dim * factor),
            theta=parameters.get("rope_theta", getattr(config, "rope_theta", 10000.0)), switch_after=switch_after)

    def _check_rotate_half(self) -> None:
        """Refuse a model whose RoPE pairs dimensions differently from ``rotate_half``: read from the ``rotate_half``
        its own modeling code applies, tried on a probe vector (names alone do not tell: Cohere's ``rotate_half``
        rotates interleaved pairs)."""
        code = sys.modules.get(type(self.module).__module__)
        rotate_half = getattr(code, "rotate_half", None)
        if rotate_half is None or hasattr(code, "apply_rotary_pos_emb_interleave"):
            raise ModelLoadError(f"{self.name}: cannot tell how this model applies RoPE (its modeling code has no "
                                 "rotate_half, or de-interleaves first); a policy that reads RoPE cannot run on it")
        if not torch.equal(rotate_half(torch.arange(4.0)), torch.tensor([-2.0, -3.0, 0.0, 1.0])):
            raise ModelLoadError(f"{self.name} rotates interleaved dimension pairs (0, 1), (2, 3), ...; kvpolicies "
                                 "reads RoPE in the rotate-half convention of the Llama family, so a policy that "
                                 "reads RoPE (expected_attention) cannot run on this model")
